"""Shared helpers for the model-zoo tests (imported as `model_helpers`; tests/models is on sys.path)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def abstract_variables(model, shape, dtype=jnp.float32, train=False):
    """Variable shapes of `model` on `[N, H, W, C]` inputs, via `jax.eval_shape` (no allocation)."""
    return jax.eval_shape(lambda: model.init(RNGS, jnp.zeros(shape, dtype), train=train))


def numpy_variables(model, shape, seed=0):
    """Real variables filled with NumPy He-normal kernels (BN scale/var 1, biases/means 0).

    Much faster than `model.init` on CPU, where jitting the random init of a big model compiles for
    longer than the forward pass; the forward tests only need sensible finite weights.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * std, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, shape))
