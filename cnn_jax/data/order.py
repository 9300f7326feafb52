"""The training data order: a pure function of (data key, global step), for exact resume.

Epoch e = step // steps_per_epoch visits the examples in the order
`jax.random.permutation(jax.random.fold_in(data_key, e), N)`; batch i of the epoch is
perm[i * B:(i + 1) * B], and the last N % B examples of each permutation are not used that epoch
(drop remainder). Everything here is jit-able with a traced `step`, so the device-resident
feeder gathers its batch inside the compiled train step.

Cost: a permutation sorts N random keys. `batch_indices` redoes that on every call, which is
nothing on an accelerator but tens of ms on a CPU for N = 60,000 (benchmarks/input_pipeline.py).
A train loop can instead compute `epoch_permutation` once per epoch and pass it to the compiled
step, which takes its batch with `batch_from_permutation`: the same indices, no per-step sort.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnn_jax.errors import DataError


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (drop remainder); DataError when the split is smaller than a batch."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if num_examples < batch_size:
        raise DataError(
            f"the training split has {num_examples} examples, fewer than one batch of "
            f"{batch_size}; use a smaller batch size"
        )
    return num_examples // batch_size


def epoch_permutation(data_key: jax.Array, epoch, num_examples: int) -> jax.Array:
    """int32 [num_examples]: the order of the examples in `epoch` (traceable)."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)


def batch_indices(data_key: jax.Array, step, *, num_examples: int, batch_size: int) -> jax.Array:
    """int32 [batch_size]: indices of the examples of global training step `step` (traceable)."""
    spe = steps_per_epoch(num_examples, batch_size)
    perm = epoch_permutation(data_key, jnp.asarray(step) // spe, num_examples)
    return batch_from_permutation(perm, step, batch_size=batch_size)


def batch_from_permutation(perm: jax.Array, step, *, batch_size: int) -> jax.Array:
    """int32 [batch_size]: batch `step` of the epoch whose permutation is `perm` (traceable);
    equals `batch_indices(data_key, step, ...)` when perm = epoch_permutation(data_key,
    step // steps_per_epoch, N)."""
    spe = steps_per_epoch(perm.shape[0], batch_size)
    return jax.lax.dynamic_slice_in_dim(perm, (jnp.asarray(step) % spe) * batch_size, batch_size)
