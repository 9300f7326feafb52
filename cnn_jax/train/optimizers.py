"""Optax optimizers and learning-rate schedules chosen by `config.optimizer`.

Steps are optimizer updates (one per global batch, whatever `train.grad_accum_steps` is).
"""

from __future__ import annotations

import functools
from collections.abc import Collection

import jax
import ml_collections
import optax
from flax import traverse_util

from cnn_jax.errors import ConfigError


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_epochs`, then constant, cosine (to 0) or step decay.

    `step_boundaries` are fractions of `total_steps`; at each the rate is multiplied by
    `step_factor`.
    """
    opt = config.optimizer
    peak = float(opt.learning_rate)
    warmup_steps = round(opt.warmup_epochs * steps_per_epoch)
    if warmup_steps >= total_steps and opt.warmup_epochs > 0:
        raise ConfigError(
            f"config key 'optimizer.warmup_epochs' has invalid value {opt.warmup_epochs!r}; "
            f"expected fewer warmup steps ({warmup_steps}) than training steps ({total_steps})"
        )
    decay_steps = total_steps - warmup_steps
    if opt.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=max(decay_steps, 1))
    elif opt.schedule == "step":
        boundaries = {
            round(f * total_steps) - warmup_steps: float(opt.step_factor)
            for f in sorted(opt.step_boundaries)
        }
        boundaries = {b: f for b, f in boundaries.items() if b > 0}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    else:
        raise ConfigError(
            f"config key 'optimizer.schedule' has invalid value {opt.schedule!r}; "
            "expected one of ('constant', 'cosine', 'step')"
        )
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, main], boundaries=[warmup_steps])


def decay_mask(params):
    """True for the leaves weight decay applies to: kernels (ndim > 1), not biases or norm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def param_labels(params, head_paths: Collection[str]):
    """'head' for the parameters whose '/'-joined path (e.g. 'fc/kernel') is in `head_paths`,
    'backbone' for the others: the labels of `optax.multi_transform`."""
    flat = traverse_util.flatten_dict(params, sep="/")
    labels = {path: "head" if path in head_paths else "backbone" for path in flat}
    return traverse_util.unflatten_dict(labels, sep="/")


def make_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    total_steps: int,
    *,
    head_paths: Collection[str] | None = None,
) -> optax.GradientTransformation:
    """The full update rule: clip by global norm -> (L2 decay) -> SGD/Adam, or decoupled AdamW.

    SGD and Adam take weight decay as an L2 term added to the gradient
    (`optax.add_decayed_weights`); AdamW decouples it. Either way it is masked off biases and
    normalisation scales.

    Fine-tuning (`head_paths`: the head's parameter paths, `cnn_jax.pretrained.finetune`):
    `optimizer.freeze_backbone` applies the rule to the head alone (clipped by the head's own
    norm) and `optax.set_to_zero` to every other parameter, which then never changes;
    `optimizer.backbone_lr_scale` s < 1 clips all gradients together, then scales the
    backbone's updates by s (its learning rate times s, weight decay included).
    """
    opt = config.optimizer
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    clip = []
    if opt.grad_clip_norm > 0:
        clip.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    freeze, scale = bool(opt.freeze_backbone), float(opt.backbone_lr_scale)
    if not freeze and scale == 1.0:
        return optax.chain(*clip, *_update_rule(config, schedule))
    if not head_paths:
        raise ConfigError(
            "optimizer.freeze_backbone and optimizer.backbone_lr_scale need the model's head "
            "(head_paths, from cnn_jax.pretrained.finetune.head_paths)"
        )
    labels = functools.partial(param_labels, head_paths=frozenset(head_paths))
    if freeze:
        transforms = {
            "head": optax.chain(*clip, *_update_rule(config, schedule)),
            "backbone": optax.set_to_zero(),
        }
        return optax.multi_transform(transforms, labels)
    transforms = {
        "head": optax.chain(*_update_rule(config, schedule)),
        "backbone": optax.chain(*_update_rule(config, schedule), optax.scale(scale)),
    }
    return optax.chain(*clip, optax.multi_transform(transforms, labels))


def _update_rule(config: ml_collections.ConfigDict, schedule) -> list:
    """The transforms of (L2 decay ->) SGD / Adam, or AdamW, with the learning rate `schedule`."""
    opt = config.optimizer
    parts = []
    if opt.name in ("sgd", "adam") and opt.weight_decay > 0:
        parts.append(optax.add_decayed_weights(float(opt.weight_decay), mask=decay_mask))
    if opt.name == "sgd":
        momentum = float(opt.momentum) or None  # None: plain SGD, no momentum buffer
        parts.append(optax.sgd(schedule, momentum=momentum, nesterov=bool(opt.nesterov)))
    elif opt.name == "adam":
        parts.append(optax.adam(schedule, b1=float(opt.b1), b2=float(opt.b2)))
    elif opt.name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=float(opt.b1),
                b2=float(opt.b2),
                weight_decay=float(opt.weight_decay),
                mask=decay_mask,
            )
        )
    else:
        raise ConfigError(
            f"config key 'optimizer.name' has invalid value {opt.name!r}; "
            "expected one of ('sgd', 'adam', 'adamw')"
        )
    return parts
