"""GoogLeNet / Inception v1 (Szegedy et al., 2014) in torchvision's BatchNorm layout, no aux heads."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import ShapeError
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

# torchvision's BasicConv2d: BatchNorm with eps 1e-3 (the "batch" name gives PyTorch's default 1e-5).
GoogLeNetBatchNorm = functools.partial(BatchNorm, epsilon=1e-3)


class BasicConv(nn.Module):
    """conv (no bias) -> norm (skipped when None) -> act.

    `conv` is called as `conv(features, kernel, strides=, padding=, use_bias=False, name="conv")`;
    `norm` is ready to call as `norm(name="bn")` (bound by `make_norm`).
    """

    features: int
    kernel_size: int
    conv: ModuleDef
    norm: Callable[..., nn.Module] | None
    act: Callable[[jax.Array], jax.Array]
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, H, W, C] -> [N, H', W', features]."""
        pad = self.kernel_size // 2
        x = self.conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.strides,
            padding=pad,
            use_bias=False,
            name="conv",
        )(x)
        if self.norm is not None:
            x = self.norm(name="bn")(x)
        return self.act(x)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: [N, H, W, C] -> [N, H, W, sum of widths].

    branch1: 1x1; branch2: 1x1 -> 3x3; branch3: 1x1 -> 3x3 (torchvision uses 3x3 where the paper has
    5x5, and we keep it so weights and counts match); branch4: 3x3 max pool -> 1x1. `basic_conv` is
    a `BasicConv` with its conv, norm and act bound; `pool` a Pool-like class.
    """

    ch1x1: int
    ch3x3_reduce: int
    ch3x3: int
    ch5x5_reduce: int
    ch5x5: int
    pool_proj: int
    basic_conv: ModuleDef
    pool: ModuleDef = Pool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.basic_conv
        branch1 = conv(self.ch1x1, 1, name="branch1")(x)
        branch2 = conv(self.ch3x3_reduce, 1, name="branch2_reduce")(x)
        branch2 = conv(self.ch3x3, 3, name="branch2")(branch2)
        branch3 = conv(self.ch5x5_reduce, 1, name="branch3_reduce")(x)
        branch3 = conv(self.ch5x5, 3, name="branch3")(branch3)
        branch4 = self.pool("max", 3, 1, padding=1, ceil_mode=True, name="branch4_pool")(x)
        branch4 = conv(self.pool_proj, 1, name="branch4")(branch4)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


# (ch1x1, ch3x3_reduce, ch3x3, ch5x5_reduce, ch5x5, pool_proj) per inception module.
INCEPTION_WIDTHS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


# ImageNet's per-channel mean and std (RGB), the normalisation torchvision's weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_to_half_range(x: jax.Array) -> jax.Array:
    """torchvision's GoogLeNet `transform_input`: x = (image - mean) / std per RGB channel becomes
    (image - 0.5) / 0.5, computed as torchvision does (x * (std / 0.5) + (mean - 0.5) / 0.5).
    x: [N, H, W, 3]."""
    if x.shape[-1] != 3:
        raise ShapeError(
            f"transform_input=True expects RGB images [N, H, W, 3]; got shape {tuple(x.shape)}"
        )
    scale = jnp.asarray([s / 0.5 for s in IMAGENET_STD], jnp.float32)
    shift = jnp.asarray([(m - 0.5) / 0.5 for m in IMAGENET_MEAN], jnp.float32)
    return x.astype(jnp.float32) * scale + shift


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet without auxiliary classifiers: 6,624,904 parameters at 224x224x3/1000.

    x: [N, H, W, C] -> float32 logits [N, num_classes].

    conv1 7x7/2 -> maxpool -> conv2 1x1 -> conv3 3x3 -> maxpool -> inception 3a, 3b -> maxpool ->
    4a..4e -> maxpool -> 5a, 5b -> global avg pool -> dropout 0.2 -> FC. Max pools round up
    (`ceil_mode=True`) as torchvision's do. `cifar_stem=True` makes conv1 3x3 stride 1 and drops the
    two stem max pools, for 28x28 / 32x32 images. Swappable blocks: `conv`, `norm` (default
    BatchNorm with torchvision's eps 1e-3; None for none), `act` and `pool`.

    `transform_input=True` is torchvision's option of the same name (on with its ImageNet
    weights): RGB input normalised with ImageNet's mean and std is re-normalised per channel to
    (x - 0.5) / 0.5 of the [0, 1] image, what those weights were trained on.
    """

    num_classes: int = 1000
    cifar_stem: bool = False
    transform_input: bool = False
    dropout_rate: float = 0.2
    act: Activation = "relu"
    conv: ModuleDef = Conv
    norm: NormLike = GoogLeNetBatchNorm
    pool: ModuleDef = Pool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        activation_fn(self.act)
        norm_class(self.norm)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "GoogLeNet")
        if self.transform_input:
            x = imagenet_to_half_range(x)
        x = x.astype(self.dtype)
        basic_conv = functools.partial(
            BasicConv,
            conv=functools.partial(self.conv, dtype=self.dtype, param_dtype=self.param_dtype),
            norm=make_norm(self.norm, train, dtype=self.dtype, param_dtype=self.param_dtype),
            act=activation_fn(self.act),
        )
        inception = functools.partial(Inception, basic_conv=basic_conv, pool=self.pool)
        pool = functools.partial(self.pool, "max", 3, 2, ceil_mode=True)

        if self.cifar_stem:
            x = basic_conv(64, 3, name="conv1")(x)
        else:
            x = basic_conv(64, 7, strides=2, name="conv1")(x)
            x = pool(name="pool1")(x)
        x = basic_conv(64, 1, name="conv2")(x)
        x = basic_conv(192, 3, name="conv3")(x)
        if not self.cifar_stem:
            x = pool(name="pool2")(x)
        for name in ("3a", "3b"):
            x = inception(*INCEPTION_WIDTHS[name], name=f"inception{name}")(x)
        x = pool(name="pool3")(x)
        for name in ("4a", "4b", "4c", "4d", "4e"):
            x = inception(*INCEPTION_WIDTHS[name], name=f"inception{name}")(x)
        x = self.pool("max", 2, 2, ceil_mode=True, name="pool4")(x)
        for name in ("5a", "5b"):
            x = inception(*INCEPTION_WIDTHS[name], name=f"inception{name}")(x)
        x = x.mean(axis=(1, 2))
        if self.dropout_rate > 0.0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        return x.astype(jnp.float32)
