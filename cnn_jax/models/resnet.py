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

from cnn_jax.layers import BatchNorm, Conv, Dtype, ModuleDef, Pool, check_images


class ResNetBlock(nn.Module):
    """Basic block: 3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, + shortcut, ReLU.

    x: [N, H, W, C] -> [N, H/strides, W/strides, filters].
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
        # Zero-initialised last BN scale: each block starts as the identity (Goyal et al., 2017),
        # as in the Flax ImageNet example.
        y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn2")(y)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters, (1, 1), self.strides, padding="VALID", name="downsample_conv"
            )(residual)
            residual = self.norm(name="downsample_bn")(residual)
        return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
    """Bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (4x filters) with BN, + shortcut, ReLU.

    x: [N, H, W, C] -> [N, H/strides, W/strides, 4 * filters].
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (1, 1), padding="VALID", name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters * self.expansion, (1, 1), padding="VALID", name="conv3")(y)
        y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn3")(y)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters * self.expansion,
                (1, 1),
                self.strides,
                padding="VALID",
                name="downsample_conv",
            )(residual)
            residual = self.norm(name="downsample_bn")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNet: stem -> 4 stages of blocks (widths 64, 128, 256, 512 x `num_filters`/64) -> GAP -> FC.

    x: [N, H, W, C] -> float32 logits [N, num_classes].

    The ImageNet stem is 7x7/2 conv -> BN -> ReLU -> 3x3/2 max pool (H, W / 4). `cifar_stem=True`
    uses a 3x3 stride-1 conv and no max pool, the usual stem for 32x32 images (ResNet-18 then has
    11,173,962 parameters with 10 classes). All sizes from 1x1 up run, since every conv is padded;
    the global average pool makes the head size-independent.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    num_filters: int = 64
    cifar_stem: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "ResNet")
        x = x.astype(self.dtype)
        conv = functools.partial(
            self.conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(
            self.norm, use_running_average=not train, dtype=self.dtype, param_dtype=self.param_dtype
        )
        if self.cifar_stem:
            x = conv(self.num_filters, (3, 3), padding=1, name="conv1")(x)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=3, name="conv1")(x)
        x = self.act(norm(name="bn1")(x))
        if not self.cifar_stem:
            x = Pool("max", 3, 2, padding=1, name="maxpool")(x)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = self.block_cls(
                    self.num_filters * 2**stage,
                    strides=strides,
                    conv=conv,
                    norm=norm,
                    act=self.act,
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
