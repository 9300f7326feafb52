"""AlexNet (Krizhevsky et al., 2012) in torchvision's single-tower layout."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.layers import (
    Activation,
    AdaptiveAvgPool,
    Conv,
    DenseHead,
    Dtype,
    ModuleDef,
    NormLike,
    Pool,
    activation_fn,
    check_images,
    conv_norm_act,
    norm_class,
)


class AlexNet(nn.Module):
    """torchvision's AlexNet: 61,100,840 parameters at 224x224x3 with 1000 classes.

    x: [N, H, W, C] -> float32 logits [N, num_classes].

    conv1 64@11x11/4 -> maxpool 3/2 -> conv2 192@5x5 -> maxpool 3/2 -> conv3 384@3x3 -> conv4 256@3x3
    -> conv5 256@3x3 -> maxpool 3/2 -> adaptive avg pool 6x6 -> dropout, FC 4096 -> dropout, FC 4096
    -> logits. No local response normalisation (torchvision drops it too). Swappable blocks: `conv`,
    `norm` (None by default; else after each conv, named norm1..norm5), `act` (also the head's) and
    `pool`.

    The ImageNet stem needs at least 63x63 input. `cifar_stem=True` makes conv1 a 3x3 stride-1 conv
    (padding 1) for 28x28 / 32x32 images; the adaptive pool then brings any size to 6x6.
    """

    num_classes: int = 1000
    cifar_stem: bool = False
    head_features: Sequence[int] = (4096, 4096)
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
        check_images(x, "AlexNet")
        x = x.astype(self.dtype)
        conv = functools.partial(conv_norm_act, self, train=train)
        pool = functools.partial(self.pool, "max", 3, 2)
        if self.cifar_stem:
            x = conv(x, 1, 64, (3, 3), padding=1)
        else:
            x = conv(x, 1, 64, (11, 11), strides=4, padding=2)
        x = pool(name="pool1")(x)
        x = conv(x, 2, 192, (5, 5), padding=2)
        x = pool(name="pool2")(x)
        x = conv(x, 3, 384, (3, 3), padding=1)
        x = conv(x, 4, 256, (3, 3), padding=1)
        x = conv(x, 5, 256, (3, 3), padding=1)
        x = pool(name="pool5")(x)
        x = AdaptiveAvgPool((6, 6), name="avgpool")(x)
        return DenseHead(
            self.num_classes,
            self.head_features,
            act=self.act,
            dropout_rate=self.dropout_rate,
            dropout_before_hidden=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(x, train)
