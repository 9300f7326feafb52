"""LeNet-5 (LeCun et al., 1998), the guides' first CNN."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import ConfigError
from cnn_jax.layers import (
    POOLINGS,
    Activation,
    Conv,
    ConvBlock,
    DenseHead,
    Dtype,
    ModuleDef,
    NormLike,
    Pool,
    activation_fn,
    check_choice,
    check_images,
    norm_class,
)


class LeNet5(nn.Module):
    """conv 6@5x5 -> pool 2x2 -> conv 16@5x5 -> pool 2x2 -> FC 120 -> FC 84 -> logits.

    x: [N, H, W, C] -> float32 logits [N, num_classes].

    `first_padding` decides how the first conv treats the border, and so the input size that gives
    the classic 5x5x16 = 400 features:
      * "SAME" (default): for 28x28 MNIST-sized input, the classic "pad 28 to 32" (61,706 parameters
        on 28x28x1 with 10 classes).
      * "VALID": the original 32x32 input (also 61,706 parameters on 32x32x1 with 10 classes).
    Other sizes work too; only the first FC layer's width changes. The classic model uses tanh and
    average pooling (subsampling without the trainable coefficients); `act="relu"`,
    `pooling="max"` give the modern variant ("sum" is subsampling's sum). `hidden_features` are the
    widths of the fully connected layers before the logits, LeCun's (120, 84) by default. The
    ujjwalkarn guide's network (Adam Harley's digit visualisation): 32x32 input,
    `first_padding="VALID"`, `pooling="max"`, `hidden_features=(120, 100)` (63,802 parameters with
    10 classes). Swappable blocks: `conv`, `norm` (None: none, the classic model; else after each
    conv), `act` (also the head's) and `pool`.
    """

    num_classes: int = 10
    act: Activation = "tanh"
    pooling: str = "avg"
    first_padding: str = "SAME"
    hidden_features: Sequence[int] = (120, 84)
    conv: ModuleDef = Conv
    norm: NormLike = None
    pool: ModuleDef = Pool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        activation_fn(self.act)
        norm_class(self.norm)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("first_padding", self.first_padding, ("SAME", "VALID"))
        widths = self.hidden_features
        if (
            isinstance(widths, (str, bytes))
            or not isinstance(widths, Sequence)
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)
        ):
            raise ConfigError(
                f"hidden_features={widths!r} is not valid; expected a sequence of ints >= 1 (the "
                "hidden layer widths, e.g. (120, 84); () for none)"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "LeNet5")
        x = x.astype(self.dtype)
        block = functools.partial(
            ConvBlock,
            kernel_size=5,
            act=self.act,
            norm=self.norm,
            pooling=self.pooling,
            conv=self.conv,
            pool=self.pool,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = block(6, padding=self.first_padding, name="block1")(x, train)
        x = block(16, padding="VALID", name="block2")(x, train)
        return DenseHead(
            self.num_classes,
            hidden_features=tuple(self.hidden_features),
            act=self.act,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="head",
        )(x, train)


__all__ = ["LeNet5"]
