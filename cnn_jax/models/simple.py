"""The guides' small ConvNet and the MLP baseline they compare it with."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import ShapeError
from cnn_jax.layers import (
    Activation,
    Conv,
    ConvBlock,
    DenseHead,
    Dtype,
    ModuleDef,
    NormLike,
    Pool,
    activation_fn,
    check_images,
    norm_class,
)


class SimpleConvNet(nn.Module):
    """A few (3x3 conv -> [norm] -> act -> 2x2 max pool) blocks, then a dense head; 4 classes by
    default.

    x: [N, H, W, C] -> float32 logits [N, num_classes]. Each block halves H and W, so the input
    needs H, W >= 2 ** len(features) (8 for the default three blocks). Swappable blocks: `conv`,
    `norm` (None by default; e.g. "batch"), `act` (also the head's) and `pool`.
    """

    num_classes: int = 4
    features: Sequence[int] = (32, 64, 128)
    hidden_features: Sequence[int] = (128,)
    dropout_rate: float = 0.5
    act: Activation = "relu"
    conv: ModuleDef = Conv
    norm: NormLike = None
    pool: ModuleDef = Pool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        activation_fn(self.act)
        norm_class(self.norm)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "SimpleConvNet")
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features, start=1):
            x = ConvBlock(
                width,
                kernel_size=3,
                padding="SAME",
                act=self.act,
                norm=self.norm,
                pooling="max",
                conv=self.conv,
                pool=self.pool,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block{i}",
            )(x, train)
        return DenseHead(
            self.num_classes,
            self.hidden_features,
            act=self.act,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="head",
        )(x, train)


class MLP(nn.Module):
    """Multi-layer perceptron baseline: flatten -> hidden Dense + act -> logits.

    x: [N, ...] (images are flattened) -> float32 logits [N, num_classes].
    """

    num_classes: int = 10
    hidden_features: Sequence[int] = (512, 256)
    dropout_rate: float = 0.0
    act: Activation = "relu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        activation_fn(self.act)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim < 2:
            raise ShapeError(
                f"MLP expects a batch [N, ...]; got an input of shape {tuple(x.shape)}"
            )
        x = jnp.asarray(x, self.dtype)
        return DenseHead(
            self.num_classes,
            self.hidden_features,
            act=self.act,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="head",
        )(x, train)
