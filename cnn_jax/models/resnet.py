"""ResNet-18/34/50/101/152 (He et al., 2015), after the Flax ImageNet example, torchvision-compatible.

Parameter names follow torchvision (conv1, bn1, layer1_0/conv1, ..., layer1_0/downsample_conv, fc)
and padding is explicit (3 for 7x7, 1 for 3x3) so feature maps align with PyTorch's; counts match
torchvision exactly. Bottleneck blocks stride in the 3x3 conv ("ResNet v1.5"), as torchvision does.
"""

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
    has_field,
    make_norm,
    norm_class,
)


def _norm(norm: Callable[..., nn.Module] | None, x: jax.Array, name: str, zero_init=False):
    """norm(name=name)(x), or x when norm is None. zero_init: start the norm's scale at 0 -- each
    block then starts as the identity (Goyal et al., 2017, as in the Flax ImageNet example) -- when
    the norm has a `scale_init` (BatchNorm, GroupNorm, LayerNorm do)."""
    if norm is None:
        return x
    if zero_init and has_field(norm, "scale_init"):
        return norm(scale_init=nn.initializers.zeros_init(), name=name)(x)
    return norm(name=name)(x)


class ResNetBlock(nn.Module):
    """Basic block: 3x3 conv -> norm -> act -> 3x3 conv -> norm, + shortcut, act.

    x: [N, H, W, C] -> [N, H/strides, W/strides, filters]. `conv` and `norm` come bound (dtype, no
    bias, `make_norm`); `norm` None means no normalisation.
    """

    filters: int
    conv: ModuleDef
    norm: Callable[..., nn.Module] | None
    act: Callable[[jax.Array], jax.Array]
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = self.act(_norm(self.norm, y, "bn1"))
        y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
        y = _norm(self.norm, y, "bn2", zero_init=True)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters, (1, 1), self.strides, padding="VALID", name="downsample_conv"
            )(residual)
            residual = _norm(self.norm, residual, "downsample_bn")
        return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
    """Bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (4x filters), each with norm, + shortcut, act.

    x: [N, H, W, C] -> [N, H/strides, W/strides, 4 * filters]. Blocks as in `ResNetBlock`.
    """

    filters: int
    conv: ModuleDef
    norm: Callable[..., nn.Module] | None
    act: Callable[[jax.Array], jax.Array]
    strides: int = 1
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (1, 1), padding="VALID", name="conv1")(x)
        y = self.act(_norm(self.norm, y, "bn1"))
        y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(y)
        y = self.act(_norm(self.norm, y, "bn2"))
        y = self.conv(self.filters * self.expansion, (1, 1), padding="VALID", name="conv3")(y)
        y = _norm(self.norm, y, "bn3", zero_init=True)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters * self.expansion,
                (1, 1),
                self.strides,
                padding="VALID",
                name="downsample_conv",
            )(residual)
            residual = _norm(self.norm, residual, "downsample_bn")
        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNet: stem -> 4 stages of blocks (widths 64, 128, 256, 512 x `num_filters`/64) -> GAP -> FC.

    x: [N, H, W, C] -> float32 logits [N, num_classes].

    The ImageNet stem is 7x7/2 conv -> BN -> ReLU -> 3x3/2 max pool (H, W / 4). `cifar_stem=True`
    uses a 3x3 stride-1 conv and no max pool, the usual stem for 32x32 images (ResNet-18 then has
    11,173,962 parameters with 10 classes). All sizes from 1x1 up run, since every conv is padded;
    the global average pool makes the head size-independent. Swappable blocks (Flax-examples
    style): `conv`, `norm` (default BatchNorm; GroupNorm, LayerNorm, a name, or None for none; the
    last norm of each block starts with zero scale when it has a `scale_init`), `act` and `pool`.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    num_filters: int = 64
    cifar_stem: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    act: Activation = "relu"
    conv: ModuleDef = Conv
    norm: NormLike = BatchNorm
    pool: ModuleDef = Pool

    def __post_init__(self) -> None:
        activation_fn(self.act)
        norm_class(self.norm)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "ResNet")
        x = x.astype(self.dtype)
        conv = functools.partial(
            self.conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = make_norm(self.norm, train, dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation_fn(self.act)
        if self.cifar_stem:
            x = conv(self.num_filters, (3, 3), padding=1, name="conv1")(x)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=3, name="conv1")(x)
        x = act(_norm(norm, x, "bn1"))
        if not self.cifar_stem:
            x = self.pool("max", 3, 2, padding=1, name="maxpool")(x)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = self.block_cls(
                    self.num_filters * 2**stage,
                    strides=strides,
                    conv=conv,
                    norm=norm,
                    act=act,
                    name=f"layer{stage + 1}_{block}",
                )(x)
        x = x.mean(axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        return x.astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckResNetBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckResNetBlock)
