"""Fine-tuning: a new training run that starts from a weights file, with a new head for the
dataset's classes and, optionally, a frozen or slower backbone.

The config keys (`cnn_jax.config.default_config`):

  model.pretrained           the weights file; read when a run starts from step 0, ignored when
                             it resumes from its own checkpoints
  model.pretrained_format    auto (by the file name) | torchvision (.safetensors, .pth of a twin,
                             `cnn_jax.pretrained.TWINS`) | keras (.h5 of Keras' VGG-16 / VGG-19)
                             | cnn_jax (.npz from `cnn-jax export`, any model of the zoo);
                             see `cnn_jax.pretrained.sources`
  optimizer.freeze_backbone  train the head only (`optax.set_to_zero` for every other
                             parameter); BatchNorm then normalises with its running averages
                             and never updates them (`with_inference_batch_norm`)
  optimizer.backbone_lr_scale  the backbone's learning rate as a fraction of the head's

The head is found, not named: the parameters whose shapes depend on the number of classes
(`head_paths`, e.g. ResNet's `fc`, VGG's `classifier/logits`). Every other variable of the model
must be in the file with its shape; the one exception is the first convolution of an RGB model
used on greyscale images, whose kernel is summed over its 3 input channels (a grey image is the
RGB image with R = G = B, so the sum sees it as the RGB network saw it).

BatchNorm's running variance: Flax (this zoo) updates it with the biased batch variance
(divided by n = batch x height x width values per channel), PyTorch with the unbiased one
(n - 1). This zoo keeps Flax's (the zoo's BatchNorm is Flax's, and the difference fades with n):
after one update (momentum 0.1) the two differ by 0.1 * var / (n - 1), e.g. 0.3% of the running
variance at n = 98 (a batch of 2 on 7x7 maps of variance 4; tests/train/test_finetune.py checks
it against torch) and below 1e-5 at n = 100,352 (a batch of 32 on 56x56 maps).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnn_jax.errors import ConfigError, DataError
from cnn_jax.layers import has_field, norm_class
from cnn_jax.pretrained import sources

# ----------------------------------------------------------------------------------------------
# The model's side: its head, its variable shapes, BatchNorm in inference mode
# ----------------------------------------------------------------------------------------------


def _variable_shapes(model: nn.Module, image_shape) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat path (collection first) -> shape and dtype of every variable; nothing computed."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    return traverse_util.flatten_dict(dict(shapes))


def head_paths(model: nn.Module, image_shape) -> frozenset[str]:
    """The '/'-joined parameter paths of the model's head ('fc/kernel', 'fc/bias'): those whose
    shapes change with `num_classes`. image_shape: (H, W, C) of one example."""
    if not has_field(type(model), "num_classes"):
        raise ConfigError(f"model {type(model).__name__} has no num_classes, so no head to replace")
    one = _variable_shapes(model.clone(num_classes=1), image_shape)
    two = _variable_shapes(model.clone(num_classes=2), image_shape)
    head = frozenset(
        "/".join(path[1:]) for path in one if path[0] == "params" and one[path] != two[path]
    )
    if not head:
        raise ConfigError(f"no parameter of {type(model).__name__} depends on num_classes")
    return head


class InferenceBatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` that always normalises with its running averages and never updates them,
    whatever `use_running_average` the model binds for training: a frozen backbone's BatchNorm
    (the same variables as `nn.BatchNorm`)."""

    def __post_init__(self) -> None:
        # Models bind use_running_average=not train (`layers.make_norm`); a frozen layer
        # overrides it here, where the dataclass is still being built.
        object.__setattr__(self, "use_running_average", True)
        super().__post_init__()


def with_inference_batch_norm(model: nn.Module) -> nn.Module:
    """`model` with its BatchNorm (its `norm` field, a BatchNorm class or partial of one) as
    `InferenceBatchNorm`, keeping its settings; a model without BatchNorm is returned as is."""
    if not has_field(type(model), "norm"):
        return model
    norm, keywords = norm_class(model.norm), {}
    while isinstance(norm, functools.partial):
        keywords = {**norm.keywords, **keywords}
        norm = norm.func
    if not (isinstance(norm, type) and issubclass(norm, nn.BatchNorm)):
        return model
    return model.clone(norm=functools.partial(InferenceBatchNorm, **keywords))


# ----------------------------------------------------------------------------------------------
# The weights a new run starts from
# ----------------------------------------------------------------------------------------------


def backbone_variables(
    loaded: dict, model: nn.Module, image_shape, head: frozenset[str], source: str = "the weights"
) -> dict:
    """The variables of `loaded` that `model` keeps when fine-tuned: every variable but the head
    (`head`, '/'-joined parameter paths), as float32 nested dicts shaped like the model's.

    A 3-input-channel first convolution is summed over its channels for a greyscale model. Raises
    `DataError` naming the variables the model has and `loaded` lacks, those `loaded` has and
    the model does not, and every shape that differs (`source` names the file).
    """
    want = _variable_shapes(model, image_shape)
    got = traverse_util.flatten_dict(loaded)
    is_head = lambda path: path[0] == "params" and "/".join(path[1:]) in head
    kept, missing, mismatched = {}, [], []
    for path, spec in sorted(want.items(), key=lambda item: (item[0][0] != "params", item[0])):
        if is_head(path):
            continue
        if path not in got:
            missing.append("/".join(path))
            continue
        array = np.asarray(got[path])
        if array.shape != spec.shape and _is_rgb_kernel_for_grey(array.shape, spec.shape):
            array = array.sum(axis=2, keepdims=True)  # grey = R = G = B
        if array.shape != spec.shape:
            mismatched.append(f"{'/'.join(path)} is {array.shape}, the model's {spec.shape}")
            continue
        kept[path] = array.astype(spec.dtype)
    unexpected = sorted("/".join(p) for p in got if p not in want and not is_head(p))
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"not in the model {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shapes differ: {_listed(mismatched, quote=False)}")
    if problems:
        without = f" (without its head {_listed(sorted(head))})" if head else ""
        raise DataError(
            f"{source} do not fit model {type(model).__name__}{without}: {'; '.join(problems)}"
        )
    return traverse_util.unflatten_dict(kept)


def _is_rgb_kernel_for_grey(shape: tuple, wanted: tuple) -> bool:
    return (
        len(shape) == 4
        and shape[2] == 3
        and wanted[2] == 1
        and shape[:2] + shape[3:] == (wanted[:2] + wanted[3:])
    )


def _listed(names: list[str], limit: int = 6, quote: bool = True) -> str:
    shown = ", ".join(repr(n) if quote else n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prepare(
    config, model: nn.Module, image_shape, *, resuming: bool
) -> tuple[nn.Module, frozenset[str] | None, dict | None]:
    """What fine-tuning changes in a training run: (model, head paths, starting variables).

    model: the model to train: with `InferenceBatchNorm` when the backbone is frozen. head:
    the head's parameter paths for `optimizers.make_optimizer`, None when no key needs them.
    starting variables: from `model.pretrained` without the head, for a run that starts at step
    0 (None when resuming or without a file); `train.state.create_train_state(variables=...)`
    initialises the rest. Reads and checks the file before anything is written.
    """
    opt = config.optimizer
    wants_head = bool(config.model.pretrained) or opt.freeze_backbone or opt.backbone_lr_scale != 1
    head = head_paths(model, image_shape) if wants_head else None
    if opt.freeze_backbone:
        model = with_inference_batch_norm(model)
    start = None
    if config.model.pretrained and not resuming:
        path = config.model.pretrained
        loaded, _ = sources.read_variables(
            path, config.model.name, config.model.pretrained_format, "model.pretrained_format"
        )
        start = backbone_variables(
            loaded, model, image_shape, head, source=f"the weights of {str(path)!r}"
        )
    return model, head, start
