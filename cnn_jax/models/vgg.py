"""VGG-11/13/16/19 (Simonyan & Zisserman, 2014), with and without BatchNorm, torchvision layout."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.layers import (
    Activation,
    AdaptiveAvgPool,
    BatchNorm,
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

STAGE_WIDTHS = (64, 128, 256, 512, 512)


class VGG(nn.Module):
    """Five stages of 3x3 convs (+ norm) + act, each ending in a 2x2 max pool, then a head.

    x: [N, H, W, C] -> float32 logits [N, num_classes]; H, W >= 32 (five halvings).

    `stage_convs` is the number of convs per stage (VGG-16: 2, 2, 3, 3, 3). Convs keep their bias
    even with BatchNorm, as in torchvision (VGG-16-BN: 138,365,992 parameters). Swappable blocks:
    `conv`, `norm` (None for VGG-n, BatchNorm for VGG-n-BN), `act` (also the head's) and `pool`.

    `head`:
      * "imagenet" (default): adaptive avg pool to 7x7, then FC-6 4096 -> ReLU -> dropout -> FC-7 4096
        -> ReLU -> dropout -> FC-8 logits (`head_features` sets the FC-6/FC-7 widths). Matches
        torchvision's parameter counts at any input size.
      * "cifar": global average pool of the last 512-channel map (a plain flatten at 32x32, where it
        is 1x1) -> `head_features` hidden layers (default none) -> logits: the small head of the usual
        CIFAR VGGs; VGG-16-BN then has about 14.7 M parameters.
    """

    stage_convs: Sequence[int]
    num_classes: int = 1000
    head: str = "imagenet"
    head_features: Sequence[int] | None = None  # None: (4096, 4096) for "imagenet", () for "cifar"
    dropout_rate: float = 0.5
    act: Activation = "relu"
    conv: ModuleDef = Conv
    norm: NormLike = None
    pool: ModuleDef = Pool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_choice("head", self.head, ("imagenet", "cifar"))
        activation_fn(self.act)
        norm_class(self.norm)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "VGG")
        x = x.astype(self.dtype)
        for stage, (width, num_convs) in enumerate(zip(STAGE_WIDTHS, self.stage_convs), start=1):
            x = ConvBlock(
                width,
                num_convs=num_convs,
                kernel_size=3,
                padding=1,
                act=self.act,
                norm=self.norm,
                pooling="max",
                conv=self.conv,
                pool=self.pool,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block{stage}",
            )(x, train)
        if self.head == "imagenet":
            x = AdaptiveAvgPool((7, 7), name="avgpool")(x)
            hidden = (4096, 4096) if self.head_features is None else self.head_features
        else:
            x = x.mean(axis=(1, 2))
            hidden = () if self.head_features is None else self.head_features
        return DenseHead(
            self.num_classes,
            hidden,
            act=self.act,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(x, train)


VGG11 = functools.partial(VGG, stage_convs=(1, 1, 2, 2, 2))
VGG13 = functools.partial(VGG, stage_convs=(2, 2, 2, 2, 2))
VGG16 = functools.partial(VGG, stage_convs=(2, 2, 3, 3, 3))
VGG19 = functools.partial(VGG, stage_convs=(2, 2, 4, 4, 4))
VGG11BN = functools.partial(VGG11, norm=BatchNorm)
VGG13BN = functools.partial(VGG13, norm=BatchNorm)
VGG16BN = functools.partial(VGG16, norm=BatchNorm)
VGG19BN = functools.partial(VGG19, norm=BatchNorm)
