"""Pure per-batch train and eval steps: loss, gradients, optimizer update, metrics.

These functions know nothing about devices: `compile.py` compiles them with
`jax.jit` over a mesh (global view; `axis_name=None`) or `jax.pmap` (per-device view;
`axis_name='batch'`, gradients and BatchNorm statistics averaged with `lax.pmean`).

A batch here is already preprocessed: {'image': float [B, H, W, C], 'label': int32 [B]} and,
for evaluation, 'mask': float32 [B] (1 for real examples, 0 for padding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Sharding

from cnn_jax.train.state import TrainState, variables_of

Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy. logits: [B, K] float; labels: int [B] -> [B] float32."""
    logits = logits.astype(jnp.float32)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def correct_top_k(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(top-1, top-5) hits per example as float32 [B] each.

    Top-5 counts the label as found when fewer than 5 classes score strictly higher (with
    fewer than 5 classes it is always 1).
    """
    logits = logits.astype(jnp.float32)
    top1 = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)
    return top1, (rank < 5).astype(jnp.float32)


def _mean_over_devices(tree, axis_name: str | None):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    grad_accum_steps: int = 1,
    axis_name: str | None = None,
    microbatch_sharding: Sharding | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
    """Builds `train_step(state, batch) -> (state, metrics)`.

    metrics: {'loss', 'accuracy', 'top5_accuracy'} as float32 scalars averaged over the
    (global) batch; 'loss' is the optimised objective (label smoothing included).

    With `grad_accum_steps = k` the batch [B, ...] is cut into k micro-batches of B/k examples
    (micro-batch j holds examples j, j+k, j+2k, ..., so each device keeps its share of every
    micro-batch) processed one after another under `lax.scan`; their mean gradient is the
    full-batch gradient, applied in one update. BatchNorm statistics are then updated
    micro-batch by micro-batch. `microbatch_sharding`, if given, pins the [k, B/k, ...]
    micro-batch stack to it (jit back end: `P(None, 'data')`).
    """

    def loss_and_grads(params, batch_stats, images, labels, dropout_rng):
        def loss_fn(p):
            variables = variables_of(p, batch_stats)
            logits, new_vars = model.apply(
                variables,
                images,
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=["batch_stats"],
            )
            loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
            return loss, (logits, new_vars.get("batch_stats", {}))

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        top1, top5 = correct_top_k(logits, labels)
        metrics = {"loss": loss, "accuracy": jnp.mean(top1), "top5_accuracy": jnp.mean(top5)}
        return grads, new_stats, metrics

    def accumulated(params, batch_stats, images, labels, dropout_rng):
        k = grad_accum_steps

        def split(x):
            x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
            if microbatch_sharding is not None:
                x = jax.lax.with_sharding_constraint(x, microbatch_sharding)
            return x

        def body(carry, micro):
            grad_sum, stats, metric_sum = carry
            j, x, y = micro
            grads, stats, metrics = loss_and_grads(
                params, stats, x, y, jax.random.fold_in(dropout_rng, j)
            )
            add = lambda a, b: a + b
            return (
                jax.tree.map(add, grad_sum, grads),
                stats,
                jax.tree.map(add, metric_sum, metrics),
            ), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        zero_metrics = {
            n: jnp.zeros((), jnp.float32) for n in ("loss", "accuracy", "top5_accuracy")
        }
        (grad_sum, stats, metric_sum), _ = jax.lax.scan(
            body, (zeros, batch_stats, zero_metrics), (jnp.arange(k), split(images), split(labels))
        )
        scale = lambda t: jax.tree.map(lambda g: g / k, t)
        return scale(grad_sum), stats, scale(metric_sum)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:  # a different dropout mask on every device
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
        compute = loss_and_grads if grad_accum_steps == 1 else accumulated
        grads, new_stats, metrics = compute(
            state.params, state.batch_stats, batch["image"], batch["label"], dropout_rng
        )
        grads = _mean_over_devices(grads, axis_name)
        new_stats = _mean_over_devices(new_stats, axis_name)
        metrics = _mean_over_devices(metrics, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


EVAL_SUMS = ("loss_sum", "correct", "correct_top5", "count")


def make_eval_step(
    model: nn.Module, *, axis_name: str | None = None
) -> Callable[[dict, dict], Metrics]:
    """Builds `eval_step(variables, batch) -> sums` over the real (mask = 1) examples.

    variables: {'params', 'batch_stats'} (`TrainState.variables()`; no optimizer needed).
    sums: {'loss_sum', 'correct', 'correct_top5', 'count'} float32 scalars (summed over
    devices under pmap). BatchNorm uses its running averages; the loss is plain cross-entropy.
    """

    def eval_step(variables: dict, batch: dict) -> Metrics:
        logits = model.apply(variables, batch["image"], train=False)
        labels = batch["label"]
        mask = batch.get("mask")
        if mask is None:
            mask = jnp.ones(labels.shape, jnp.float32)
        loss = cross_entropy(logits, labels)
        top1, top5 = correct_top_k(logits, labels)
        sums = {
            "loss_sum": jnp.sum(loss * mask),
            "correct": jnp.sum(top1 * mask),
            "correct_top5": jnp.sum(top5 * mask),
            "count": jnp.sum(mask),
        }
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
    """Eval sums -> {'loss', 'accuracy', 'top5_accuracy', 'count'} as Python floats."""
    count = float(sums["count"])
    denom = max(count, 1.0)
    return {
        "loss": float(sums["loss_sum"]) / denom,
        "accuracy": float(sums["correct"]) / denom,
        "top5_accuracy": float(sums["correct_top5"]) / denom,
        "count": count,
    }
