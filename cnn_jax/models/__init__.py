"""The model zoo: `get_model(name, num_classes=..., **options)` and `available()`.

Every model is a `flax.linen.Module` called as `model.apply(variables, x, train=...)` with
`x: float [N, H, W, C]` and returns float32 logits `[N, num_classes]`. Models with BatchNorm keep a
`batch_stats` collection (pass `mutable=['batch_stats']` when training); models with dropout need a
'dropout' rng when `train=True`. Options are the model's dataclass fields, e.g. `dtype`,
`param_dtype`, `cifar_stem`, and the swappable building blocks every convolutional family takes
(Flax-examples style, e.g. `get_model("resnet18", num_classes=10, norm=nn.GroupNorm, act=nn.gelu)`):

  * `conv`: a Conv-like module class (default `layers.Conv`), used for every convolution;
  * `norm`: a normalisation class or partial (`nn.GroupNorm`, `nn.LayerNorm`, ...), a name in
    `layers.NORMS` ("batch", "group", "layer"), or None for none (`layers.make_norm` binds it);
  * `act`: an activation callable or a name in `layers.ACTIVATIONS` ("relu", "tanh", ...);
  * `pool`: a Pool-like module class (default `layers.Pool`), called as
    `pool(kind, window, strides, padding, name=...)`.

The MLP takes `act` only. Names make the options JSON-friendly (`act="relu"`, `norm="group"`);
`cnn_jax.fast_paths.modules()` gives faster CPU `conv`/`pool` classes with the same variables.

Too-small inputs raise `cnn_jax.errors.ShapeError` naming the first layer whose output would be
empty. The check uses static shapes while the model is traced, before that layer runs: under
`jax.jit` / `jax.eval_shape` (how init and training run) nothing is computed at all; when called
eagerly, only the layers before the offending one have run.

This package imports only jax, flax and numpy (never tensorflow, tfds or orbax), so other projects
can use it alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax.errors import ConfigError
from cnn_jax.models.alexnet import AlexNet
from cnn_jax.models.densenet import DenseNet, DenseNet121
from cnn_jax.models.googlenet import GoogLeNet
from cnn_jax.models.lenet import LeNet5
from cnn_jax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50, ResNet101, ResNet152
from cnn_jax.models.simple import MLP, SimpleConvNet
from cnn_jax.models.vgg import (
    VGG,
    VGG11,
    VGG11BN,
    VGG13,
    VGG13BN,
    VGG16,
    VGG16BN,
    VGG19,
    VGG19BN,
)
from cnn_jax.models.zfnet import ZFNet

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "simple_convnet": SimpleConvNet,
    "mlp": MLP,
    "alexnet": AlexNet,
    "zfnet": ZFNet,
    "vgg11": VGG11,
    "vgg11_bn": VGG11BN,
    "vgg13": VGG13,
    "vgg13_bn": VGG13BN,
    "vgg16": VGG16,
    "vgg16_bn": VGG16BN,
    "vgg19": VGG19,
    "vgg19_bn": VGG19BN,
    "googlenet": GoogLeNet,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "densenet121": DenseNet121,
}

# Dataclass fields that are not user options.
_NOT_OPTIONS = frozenset({"parent", "name", "num_classes"})


def available() -> list[str]:
    """Names accepted by `get_model`, sorted."""
    return sorted(_MODELS)


def model_options(name: str) -> list[str]:
    """The option names `get_model(name, ...)` accepts besides `num_classes`, sorted."""
    constructor = _lookup(name)
    fixed: set[str] = set()
    while isinstance(constructor, functools.partial):  # VGG16BN = partial(partial(VGG, ...), ...)
        fixed.update(constructor.keywords)
        constructor = constructor.func
    fields = {field.name for field in dataclasses.fields(constructor) if field.init}
    return sorted(fields - fixed - _NOT_OPTIONS)


def get_model(name: str, *, num_classes: int, **options: Any) -> nn.Module:
    """Build the model called `name` (see `available()`) with `num_classes` outputs.

    `dtype` / `param_dtype` may be given as dtypes or names ("bfloat16"). Raises `ConfigError` for an
    unknown name, an unknown option or a bad `num_classes`.
    """
    constructor = _lookup(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option(s) {', '.join(map(repr, unknown))}; valid options: "
            f"{', '.join(valid)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} is not valid; expected an int >= 1")
    for key in ("dtype", "param_dtype"):
        if key in options:
            options[key] = _as_dtype(key, options[key])
    return constructor(num_classes=num_classes, **options)


def _lookup(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown model {name!r}; available models: {', '.join(available())}"
        ) from None


def _as_dtype(key: str, value: Any) -> Any:
    try:
        return jnp.dtype(value)
    except TypeError:
        raise ConfigError(
            f"{key}={value!r} is not a dtype; expected e.g. 'float32' or 'bfloat16'"
        ) from None


__all__ = [
    "MLP",
    "VGG",
    "AlexNet",
    "DenseNet",
    "GoogLeNet",
    "LeNet5",
    "ResNet",
    "SimpleConvNet",
    "ZFNet",
    "available",
    "get_model",
    "model_options",
]
