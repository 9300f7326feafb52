"""The pure steps compiled for devices: `compile_jit` (one program over a mesh; the default) and
`compile_pmap` (one program per device). Both return a `Compiled` with the same functions, so
the loop, the feeders and the benchmark never ask which one they have.

A batch reaching these functions is uint8 images plus int32 labels (and a float32 'mask' for
evaluation), already laid out for the devices by `Compiled.put_batch` or gathered there by
`Compiled.take`; preprocessing (resize, augmentation, normalisation) runs inside the compiled
step, with the augmentation key `fold_in(aug_key, step)`, so the data a step sees is a pure
function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from cnn_jax import parallel
from cnn_jax.data.order import epoch_permutation
from cnn_jax.train import steps as steps_lib
from cnn_jax.train.feeders import PreprocessFn
from cnn_jax.train.state import create_train_state

PMAP_AXIS = "batch"
TRAIN_SUMS = ("loss", "accuracy", "top5_accuracy")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the compiled functions close over besides the model and the optimizer."""

    data_key: jax.Array  # uint32[2]: epoch permutations (`cnn_jax.data.order`)
    aug_key: jax.Array  # uint32[2]: augmentation of step s uses fold_in(aug_key, s)
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    compiler_options: dict[str, Any] | None = None  # jit only (`fast_paths.compiler_options`)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Compiled steps and the data placement that goes with them.

    train(state, sums, batch) -> (state, sums): one step; `sums` accumulates the step's metrics
        (`zero_sums()`), with 'first_bad_step' the first step whose loss was not finite (-1).
    train_group(state, sums, batches, count) -> (state, sums): the first `count` of a tuple of
        batches, one step each, in one `lax.fori_loop` (`count` is traced: one program for any
        count up to len(batches)).
    evaluate(variables, sums, batch) -> sums: masked eval sums (`steps.EVAL_SUMS`) added to sums.
    take(split, perm, start, size) -> batch: the global batch split[perm[start:start + size]] of
        a split held on the devices, laid out like `put_batch`'s.
    permutation(epoch, num_examples) -> perm: the epoch's order, on the devices.
    init_state(image_shape, rng[, variables]) -> state (`create_train_state`); replicate(host
    tree) -> devices; put_batch(this process's part of a global batch) -> devices; host(device
    tree) -> one logical copy.
    """

    name: str
    devices: list
    train: Callable
    train_group: Callable
    evaluate: Callable
    take: Callable
    permutation: Callable
    init_state: Callable
    replicate: Callable
    put_batch: Callable
    host: Callable

    def zero_sums(self, names=TRAIN_SUMS) -> dict:
        sums = {k: np.zeros((), np.float32) for k in names}
        if names == TRAIN_SUMS:
            sums["first_bad_step"] = np.asarray(-1, np.int32)
        return self.replicate(sums)


def _accumulate(sums: dict, metrics: dict, step: jax.Array) -> dict:
    """Adds a step's metrics; records the first step whose loss is NaN/inf (-1 while finite)."""
    new = {k: sums[k] + metrics[k] for k in TRAIN_SUMS}
    bad = sums["first_bad_step"]
    new["first_bad_step"] = jnp.where((bad < 0) & ~jnp.isfinite(metrics["loss"]), step, bad)
    return new


def _step_bodies(model, tx, preprocess, settings, *, axis_name, constrain, microbatch_sharding):
    """The traced bodies both back ends compile: (train, train_group, evaluate)."""
    train_step = steps_lib.make_train_step(
        model,
        tx,
        label_smoothing=settings.label_smoothing,
        grad_accum_steps=settings.grad_accum_steps,
        axis_name=axis_name,
        microbatch_sharding=microbatch_sharding,
    )
    eval_step = steps_lib.make_eval_step(model, axis_name=axis_name)

    def augmented(images, step):
        """The step's augmentation of the global batch, whoever holds which part of it: under
        pmap each device takes its rows of the global draw, so both back ends see the same
        data at every device count."""
        key = jax.random.fold_in(settings.aug_key, step)
        if axis_name is None:
            return preprocess(images, key, True)
        local = images.shape[0]
        part = (jax.lax.axis_index(axis_name) * local, local * jax.lax.axis_size(axis_name))
        return preprocess(images, key, True, part=part)

    def train(state, sums, batch):
        images = constrain(augmented(batch["image"], state.step))
        step = state.step
        state, metrics = train_step(state, {"image": images, "label": batch["label"]})
        return state, _accumulate(sums, metrics, step)

    def train_group(state, sums, batches, count):
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        body = lambda i, carry: train(*carry, jax.tree.map(lambda x: x[i], stacked))
        return jax.lax.fori_loop(0, count, body, (state, sums))

    def evaluate(variables, sums, batch):
        images = constrain(preprocess(batch["image"], jax.random.PRNGKey(0), False))
        part = eval_step(variables, {**batch, "image": images})
        return jax.tree.map(jnp.add, sums, part)

    return train, train_group, evaluate


def compile_jit(
    model: nn.Module,
    tx: optax.GradientTransformation,
    preprocess: PreprocessFn,
    settings: StepSettings,
    devices=None,
) -> Compiled:
    """One global program over a 1-D mesh: parameters replicated, batches split along 'data'.
    Multi-host: every process runs the same program on the global arrays."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = parallel.make_mesh(devices)
    replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
    micro = None
    if settings.grad_accum_steps > 1:
        micro = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))
    train, train_group, evaluate = _step_bodies(
        model,
        tx,
        preprocess,
        settings,
        axis_name=None,
        constrain=lambda x: jax.lax.with_sharding_constraint(x, sharded),
        microbatch_sharding=micro,
    )
    jit = functools.partial(
        jax.jit, out_shardings=replicated, compiler_options=settings.compiler_options
    )

    @functools.partial(jax.jit, static_argnums=3, out_shardings=sharded)
    def take(split, perm, start, size):
        idx = jax.lax.dynamic_slice_in_dim(perm, start, size)
        return jax.tree.map(lambda a: a[idx], split)

    @functools.partial(jax.jit, static_argnums=1, out_shardings=replicated)
    def permutation(epoch, num_examples):
        return epoch_permutation(settings.data_key, epoch, num_examples).astype(jnp.int32)

    def replicate(tree):
        """Host values every process holds in full -> global replicated arrays."""
        put = lambda v: jax.make_array_from_callback(np.shape(v), replicated, lambda i: v[i])
        return jax.tree.map(lambda v: put(np.asarray(v)), tree)

    return Compiled(
        name="jit",
        devices=devices,
        train=jit(train, donate_argnums=(0, 1)),
        train_group=jit(train_group, donate_argnums=(0, 1)),
        evaluate=jit(evaluate, donate_argnums=(1,)),
        take=lambda split, perm, start, size: take(split, perm, np.int32(start), size),
        permutation=lambda epoch, n: permutation(np.int32(epoch), n),
        init_state=lambda shape, rng, variables=None: create_train_state(
            model, tx, shape, rng, replicated, variables=variables
        ),
        replicate=replicate,
        put_batch=lambda batch: jax.tree.map(
            lambda v: jax.make_array_from_process_local_data(sharded, np.asarray(v)), batch
        ),
        host=lambda tree: tree,  # already one logical copy
    )


def compile_pmap(
    model: nn.Module,
    tx: optax.GradientTransformation,
    preprocess: PreprocessFn,
    settings: StepSettings,
    devices=None,
) -> Compiled:
    """`jax.pmap` over the devices with axis 'batch'; state and outputs are stacked per device.

    Differences from `jit` (both from per-device execution): BatchNorm normalises with each
    device's own batch statistics (running averages are then averaged over devices), and
    dropout draws per-device random numbers (`fold_in(key, device_index)`). Augmentation is the
    same as jit's (each device takes its rows of the global batch's draw). Without BatchNorm and
    dropout, both give the same updates up to float32 rounding. `jax.pmap` takes no compiler
    options.
    """
    devices = list(jax.devices() if devices is None else devices)
    local_devices = [d for d in devices if d.process_index == jax.process_index()]
    train, train_group, evaluate = _step_bodies(
        model,
        tx,
        preprocess,
        settings,
        axis_name=PMAP_AXIS,
        constrain=lambda x: x,
        microbatch_sharding=None,
    )
    pmap = functools.partial(jax.pmap, axis_name=PMAP_AXIS, devices=devices)

    def take(split, perm, start, size):  # per device: this device's part of the global batch
        local = size // len(devices)
        offset = start + jax.lax.axis_index(PMAP_AXIS) * local
        idx = jax.lax.dynamic_slice_in_dim(perm, offset, local)
        return jax.tree.map(lambda a: a[idx], split)

    take_fn = pmap(take, static_broadcasted_argnums=3)
    perm_fn = pmap(
        lambda epoch, n: epoch_permutation(settings.data_key, epoch, n).astype(jnp.int32),
        static_broadcasted_argnums=1,
    )

    def replicate(tree):
        return flax.jax_utils.replicate(tree, devices=local_devices)

    def put_batch(batch):
        """Process-local batch [B_local, ...] -> [local devices, B_local / devices, ...]."""
        d = len(local_devices)
        return {k: np.asarray(v).reshape(d, -1, *np.shape(v)[1:]) for k, v in batch.items()}

    return Compiled(
        name="pmap",
        devices=devices,
        train=pmap(train, donate_argnums=(0, 1)),
        train_group=pmap(train_group, donate_argnums=(0, 1)),
        evaluate=pmap(evaluate, donate_argnums=(1,)),
        take=lambda split, perm, start, size: take_fn(
            split, perm, replicate(np.int32(start)), size
        ),
        permutation=lambda epoch, n: perm_fn(replicate(np.int32(epoch)), n),
        init_state=lambda shape, rng, variables=None: replicate(
            create_train_state(model, tx, shape, rng, variables=variables)
        ),
        replicate=replicate,
        put_batch=put_batch,
        host=lambda tree: jax.tree.map(lambda x: x[0], tree),  # equal on every device
    )


BACKENDS = {"jit": compile_jit, "pmap": compile_pmap}
