"""The train state: everything that changes during training, as one pytree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util
from jax.sharding import Sharding

PyTree = Any


@struct.dataclass
class TrainState:
    """Step counter, float32 parameters, BatchNorm statistics, optimizer state and RNG key.

    `rng` is a raw uint32[2] key; the dropout key of step s is `fold_in(rng, s)`, so the state
    alone (no hidden host RNG) determines every later step. The model and optimizer are not
    part of the state: they are static and closed over by the compiled step functions.
    """

    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: PyTree
    batch_stats: PyTree  # {} for models without BatchNorm
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2]

    def variables(self) -> dict:
        """The model variables for `model.apply`: {'params': ..., 'batch_stats': ...}."""
        return variables_of(self.params, self.batch_stats)


def variables_of(params: PyTree, batch_stats: PyTree) -> dict:
    """{'params', 'batch_stats'} without an empty 'batch_stats' collection."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def with_variables(variables: dict, given: dict | None) -> dict:
    """`variables` with every leaf that `given` has replaced by `given`'s (same paths and shapes,
    e.g. pretrained weights without a head); the leaves `given` lacks keep their values."""
    if not given:
        return variables
    flat = traverse_util.flatten_dict(variables)
    flat.update(traverse_util.flatten_dict(given))
    return traverse_util.unflatten_dict(flat)


def _init_fn(
    model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...]
) -> Callable[..., TrainState]:
    def init(rng: jax.Array, start: dict | None = None) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params_rng, dropout_rng = jax.random.split(init_rng)
        dummy = jnp.zeros((1, *image_shape), jnp.float32)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
        variables = with_variables(variables, start)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=state_rng,
        )

    return init


def abstract_train_state(
    model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...]
) -> TrainState:
    """Shapes and dtypes of the state (`jax.ShapeDtypeStruct` leaves), computing nothing."""
    with jax.threefry_partitionable(False):  # as in create_train_state
        return jax.eval_shape(_init_fn(model, tx, image_shape), jax.random.PRNGKey(0))


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    rng: jax.Array,
    sharding: Sharding | None = None,
    *,
    variables: dict | None = None,
) -> TrainState:
    """Initialises the state with a jitted init whose outputs land directly in `sharding`.

    image_shape: (H, W, C) of one example. rng: a uint32[2] key. With a replicated
    `NamedSharding`, every device (of every process) receives the same parameters, created
    in place rather than on one device and copied. `variables` ({'params'[, 'batch_stats']},
    possibly partial, e.g. pretrained weights without the head) replace the initialised
    leaves they have (`with_variables`); the optimizer state is initialised from the result.
    """
    init = _init_fn(model, tx, image_shape)
    # The replicated init needs no partitionable random bits, and XLA:CPU compiles the
    # classic threefry several times faster (LeNet-5: ~2 s instead of ~7 s).
    with jax.threefry_partitionable(False):
        if sharding is None:
            return jax.jit(init)(rng, variables)
        shardings = jax.tree.map(lambda _: sharding, jax.eval_shape(init, rng, variables))
        return jax.jit(init, out_shardings=shardings)(rng, variables)
