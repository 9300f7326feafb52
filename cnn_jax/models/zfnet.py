"""ZFNet (Zeiler & Fergus, 2013): AlexNet with a 7x7 stride-2 first conv and a stride-2 conv2."""

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


class ZFNet(nn.Module):
    """ZFNet ("model 1" of the paper), single tower. x: [N, H, W, C] -> float32 logits [N, classes].

    conv1 96@7x7/2 -> maxpool 3/2 -> conv2 256@5x5/2 -> maxpool 3/2 -> conv3 384@3x3 -> conv4 384@3x3
    -> conv5 256@3x3 -> maxpool 3/2 -> adaptive avg pool 6x6 -> FC 4096 -> FC 4096 -> logits, with
    ReLU and dropout 0.5 after each hidden FC. At 224x224 the maps are 110, 55, 26, 13, 13, 6 as in
    the paper: conv1 pads 1 and the pools round up (Caffe / PyTorch `ceil_mode=True`). The paper's
    contrast normalisation is left out (as torchvision does for AlexNet). 62,357,608 parameters at
    224x224x3 with 1000 classes (our count; there is no torchvision reference).

    The ImageNet stem needs at least 47x47 input; `cifar_stem=True` makes conv1 a 3x3 stride-1 conv
    (padding 1) for 28x28 / 32x32 images. Swappable blocks: `conv`, `norm` (None by default; else
    after each conv, named norm1..norm5), `act` (also the head's) and `pool`.
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
        check_images(x, "ZFNet")
        x = x.astype(self.dtype)
        conv = functools.partial(conv_norm_act, self, train=train)
        pool = functools.partial(self.pool, "max", 3, 2, ceil_mode=True)
        if self.cifar_stem:
            x = conv(x, 1, 96, (3, 3), padding=1)
        else:
            x = conv(x, 1, 96, (7, 7), strides=2, padding=1)
        x = pool(name="pool1")(x)
        x = conv(x, 2, 256, (5, 5), strides=2, padding=0)
        x = pool(name="pool2")(x)
        x = conv(x, 3, 384, (3, 3), padding=1)
        x = conv(x, 4, 384, (3, 3), padding=1)
        x = conv(x, 5, 256, (3, 3), padding=1)
        x = pool(name="pool5")(x)
        x = AdaptiveAvgPool((6, 6), name="avgpool")(x)
        return DenseHead(
            self.num_classes,
            self.head_features,
            act=self.act,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(x, train)
