"""DenseNet-121 (Huang et al., 2016) in torchvision's layout (7,978,856 parameters at 224/1000)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.layers import (
    Activation,
    BatchNorm,
    Conv,
    Dtype,
    ModuleDef,
    NormLike,
    Pool,
    activation_fn,
    check_images,
    make_norm,
    norm_class,
)


def _norm_act(norm, act, x: jax.Array, name: str) -> jax.Array:
    """act(norm(name=name)(x)); act(x) when norm is None."""
    return act(x if norm is None else norm(name=name)(x))


class DenseLayer(nn.Module):
    """norm -> act -> 1x1 conv (bn_size * growth) -> norm -> act -> 3x3 conv (growth), concatenated.

    x: [N, H, W, C] -> [N, H, W, C + growth_rate]. `conv` and `norm` come bound (`make_norm`;
    None: no normalisation).
    """

    growth_rate: int
    bn_size: int
    drop_rate: float
    conv: ModuleDef
    norm: Callable[..., nn.Module] | None
    act: Callable[[jax.Array], jax.Array] = nn.relu
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _norm_act(self.norm, self.act, x, "norm1")
        y = self.conv(self.bn_size * self.growth_rate, (1, 1), padding="VALID", name="conv1")(y)
        y = _norm_act(self.norm, self.act, y, "norm2")
        y = self.conv(self.growth_rate, (3, 3), padding=1, name="conv2")(y)
        if self.drop_rate > 0.0:
            y = nn.Dropout(self.drop_rate, deterministic=not self.train)(y)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    """norm -> act -> 1x1 conv -> 2x2 avg pool: [N, H, W, C] -> [N, H/2, W/2, features]."""

    features: int
    conv: ModuleDef
    norm: Callable[..., nn.Module] | None
    act: Callable[[jax.Array], jax.Array] = nn.relu
    pool: ModuleDef = Pool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _norm_act(self.norm, self.act, x, "norm")
        x = self.conv(self.features, (1, 1), padding="VALID", name="conv")(x)
        return self.pool("avg", 2, 2, name="pool")(x)


class DenseNet(nn.Module):
    """DenseNet-BC: stem -> dense blocks joined by halving transitions -> BN -> ReLU -> GAP -> FC.

    x: [N, H, W, C] -> float32 logits [N, num_classes].

    The ImageNet stem (7x7/2 conv, 3x3/2 max pool) plus three transitions divide H, W by 32, so it
    needs at least 29x29 input. `cifar_stem=True` uses a 3x3 stride-1 conv and no max pool (28x28
    and 32x32 images then end at 3x3 and 4x4). `block_config`, `growth_rate`, `num_init_features`
    and `bn_size` give the other DenseNets (and tiny ones for tests). Swappable blocks: `conv`,
    `norm` (default BatchNorm; None for none), `act` and `pool`.
    """

    num_classes: int = 1000
    block_config: Sequence[int] = (6, 12, 24, 16)
    growth_rate: int = 32
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    cifar_stem: bool = False
    act: Activation = "relu"
    conv: ModuleDef = Conv
    norm: NormLike = BatchNorm
    pool: ModuleDef = Pool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        activation_fn(self.act)
        norm_class(self.norm)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "DenseNet")
        x = x.astype(self.dtype)
        conv = functools.partial(
            self.conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = make_norm(self.norm, train, dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation_fn(self.act)
        if self.cifar_stem:
            x = conv(self.num_init_features, (3, 3), padding=1, name="conv0")(x)
        else:
            x = conv(self.num_init_features, (7, 7), (2, 2), padding=3, name="conv0")(x)
        x = _norm_act(norm, act, x, "norm0")
        if not self.cifar_stem:
            x = self.pool("max", 3, 2, padding=1, name="pool0")(x)

        features = self.num_init_features
        for block, num_layers in enumerate(self.block_config, start=1):
            for layer in range(1, num_layers + 1):
                x = DenseLayer(
                    self.growth_rate,
                    self.bn_size,
                    self.drop_rate,
                    conv,
                    norm,
                    act,
                    train,
                    name=f"denseblock{block}_layer{layer}",
                )(x)
            features += num_layers * self.growth_rate
            if block != len(self.block_config):
                features //= 2
                x = Transition(features, conv, norm, act, self.pool, name=f"transition{block}")(x)

        x = _norm_act(norm, act, x, "norm5")
        x = x.mean(axis=(1, 2))
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier"
        )(x)
        return x.astype(jnp.float32)


DenseNet121 = functools.partial(
    DenseNet, block_config=(6, 12, 24, 16), growth_rate=32, num_init_features=64, bn_size=4
)
