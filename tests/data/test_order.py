"""The training order contract: a pure function of (data key, step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.data import (
    batch_from_permutation,
    batch_indices,
    epoch_permutation,
    steps_per_epoch,
)
from cnn_jax.errors import DataError

KEY = jax.random.PRNGKey(42)


def test_epoch_permutation_is_the_documented_formula():
    for epoch in range(3):
        expected = jax.random.permutation(jax.random.fold_in(KEY, epoch), 50)
        assert np.array_equal(epoch_permutation(KEY, epoch, 50), expected)
    assert not np.array_equal(epoch_permutation(KEY, 0, 50), epoch_permutation(KEY, 1, 50))
    assert sorted(np.asarray(epoch_permutation(KEY, 5, 50)).tolist()) == list(range(50))


def test_batch_indices_walk_each_epoch_in_order():
    n, b = 50, 8  # 6 steps per epoch, 2 examples unused each epoch
    assert steps_per_epoch(n, b) == 6
    for step in range(20):
        epoch, i = divmod(step, 6)
        perm = np.asarray(epoch_permutation(KEY, epoch, n))
        got = np.asarray(batch_indices(KEY, step, num_examples=n, batch_size=b))
        assert np.array_equal(got, perm[i * b : (i + 1) * b])
    epoch0 = np.concatenate([batch_indices(KEY, s, num_examples=n, batch_size=b) for s in range(6)])
    assert len(set(epoch0.tolist())) == 48  # no repeats within an epoch


def test_batch_indices_jit_with_traced_step():
    fn = jax.jit(lambda step: batch_indices(KEY, step, num_examples=50, batch_size=8))
    for step in (0, 5, 6, 13):
        assert np.array_equal(
            fn(jnp.int32(step)), batch_indices(KEY, step, num_examples=50, batch_size=8)
        )


def test_batch_from_a_precomputed_permutation_is_the_same_batch():
    fn = jax.jit(lambda perm, step: batch_from_permutation(perm, step, batch_size=8))
    for step in (0, 5, 6, 13, 17):
        perm = epoch_permutation(KEY, step // 6, 50)
        want = batch_indices(KEY, step, num_examples=50, batch_size=8)
        assert np.array_equal(fn(perm, jnp.int32(step)), want)


def test_split_smaller_than_a_batch():
    with pytest.raises(DataError, match="fewer than one batch"):
        steps_per_epoch(5, 8)
