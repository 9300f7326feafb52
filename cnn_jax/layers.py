"""Flax (Linen) building blocks shared by the model zoo.

Images are NHWC (`x: [N, H, W, C]`), conv kernels HWIO. Every block has a compute `dtype` (e.g.
`jnp.bfloat16`) and a `param_dtype` (float32 by default), and takes `train: bool` so BatchNorm and
dropout switch between training and inference.

Blocks are swappable, as in the Flax examples: `ConvBlock` and the zoo's models take a `conv` class
(default `Conv`), a `norm` class or name (`NORMS`; None for no normalisation, bound by `make_norm`),
an `act` callable or name (`ACTIVATIONS`) and, where they pool, a `pool` class (default `Pool`).
Every default module computes with XLA's own ops (`lax.conv_general_dilated`, reduce-window
pooling) and standard autodiff; `cnn_jax.fast_paths` has drop-in CPU lowerings of `Conv` and `Pool`.

Spatial layers (`Conv`, `Pool`) check their output size from static shapes before they run and raise
`ShapeError` naming their module path when the output would be empty, instead of failing later
inside XLA with an opaque message. `Conv` and `Dense` given variables made for another input width
(another channel count or, behind a flatten, another image size) raise `ShapeError` naming the layer
and both widths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import ops
from cnn_jax.errors import ConfigError, ShapeError

ModuleDef = Any
Dtype = Any
# One padding per spatial dim: "SAME" / "VALID", an int p (p on both sides of every dim), or per dim an
# int or a (low, high) pair -- the forms `flax.linen.Conv` accepts.
PaddingLike = str | int | Sequence[int | tuple[int, int]]

Activation = str | Callable[[jax.Array], jax.Array]  # a callable or a name in ACTIVATIONS
NormLike = ModuleDef | str | None  # a norm module class (or partial), a name in NORMS, or None

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,  # negative_slope 0.01, as in PyTorch
    "sigmoid": nn.sigmoid,
    "tanh": nn.tanh,
}
POOLINGS = ("max", "avg", "sum")

# PyTorch's BatchNorm2d defaults (its momentum 0.1 is Flax's 0.9: Flax weights the old average).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# Norm names for configs. Flax's GroupNorm defaults to 32 groups, so every normalised width must be
# a multiple of 32 (ResNet, DenseNet-121); pass a partial with `num_groups` / `group_size` otherwise.
NORMS: dict[str, ModuleDef] = {"batch": BatchNorm, "group": nn.GroupNorm, "layer": nn.LayerNorm}


def activation_fn(act: Activation) -> Callable[[jax.Array], jax.Array]:
    """`act` itself when it is callable, else the activation called `act` (one of `ACTIVATIONS`)."""
    if callable(act):
        return act
    try:
        return ACTIVATIONS[act]
    except (KeyError, TypeError):
        raise ConfigError(
            f"act={act!r} is not a known activation; expected a callable or one of "
            f"{sorted(ACTIVATIONS)}"
        ) from None


def norm_class(norm: NormLike) -> ModuleDef | None:
    """The norm module class (or partial) `norm` names (one of `NORMS`), `norm` itself when it is
    one, or None (no normalisation)."""
    if norm is None or (callable(norm) and not isinstance(norm, str)):
        return norm
    try:
        return NORMS[norm]
    except (KeyError, TypeError):
        raise ConfigError(
            f"norm={norm!r} is not a known normalisation; expected a module class, None or one "
            f"of {sorted(NORMS)}"
        ) from None


def has_field(module_def: Any, field: str) -> bool:
    """Whether a module class, or a `functools.partial` of one, has the dataclass field `field`."""
    while isinstance(module_def, functools.partial):
        module_def = module_def.func
    if not (isinstance(module_def, type) and dataclasses.is_dataclass(module_def)):
        return False
    return any(f.name == field for f in dataclasses.fields(module_def))


def make_norm(
    norm: NormLike, train: bool, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> Callable[..., nn.Module] | None:
    """`norm` (a class, a partial or a `NORMS` name) as a partial ready for `norm(name=...)(x)`, or
    None for no normalisation.

    Binds `use_running_average=not train` (BatchNorm's switch), `dtype` and `param_dtype`, each only
    when the class has that field, so `nn.GroupNorm`, `nn.LayerNorm` and partials of them fit too.
    """
    norm = norm_class(norm)
    if norm is None:
        return None
    wanted = {"use_running_average": not train, "dtype": dtype, "param_dtype": param_dtype}
    return functools.partial(norm, **{k: v for k, v in wanted.items() if has_field(norm, k)})


def check_choice(argument: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise `ConfigError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{argument}={value!r} is not valid; expected one of {list(choices)}")


def check_images(x: jax.Array, model: str) -> None:
    """Raise `ShapeError` unless `x` is a batch of images `[N, H, W, C]`."""
    if x.ndim != 4:
        raise ShapeError(
            f"{model} expects images of shape [N, H, W, C]; got an input of shape {tuple(x.shape)}"
        )


# --------------------------------------------------------------------------------------------------
# Static shape arithmetic
# --------------------------------------------------------------------------------------------------


def _per_dim(value: int | Sequence[int] | None, ndim: int, default: int = 1) -> tuple[int, ...]:
    if value is None:
        return (default,) * ndim
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(value)


def padding_pairs(
    padding: PaddingLike,
    in_sizes: Sequence[int],
    windows: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """Explicit `(low, high)` padding per spatial dim, resolving "SAME"/"VALID" as XLA does."""
    ndim = len(in_sizes)
    dilations = dilations or (1,) * ndim
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return [(0, 0)] * ndim
        if mode in ("SAME", "CIRCULAR"):
            return [
                ops.same_padding(n, (k - 1) * d + 1, s)
                for n, k, s, d in zip(in_sizes, windows, strides, dilations)
            ]
        raise ConfigError(
            f"padding={padding!r} is not valid; expected 'SAME', 'VALID', an int or pairs"
        )
    if isinstance(padding, int):
        return [(padding, padding)] * ndim
    pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pairs) != ndim:
        raise ShapeError(f"padding={padding!r} gives {len(pairs)} dims; expected {ndim}")
    return pairs


def window_output_sizes(
    in_sizes: Sequence[int],
    windows: Sequence[int],
    strides: Sequence[int],
    padding: PaddingLike,
    dilations: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Output size per spatial dim of a conv/pool: floor((n + lo + hi - d(k-1) - 1) / s) + 1."""
    dilations = dilations or (1,) * len(in_sizes)
    pairs = padding_pairs(padding, in_sizes, windows, strides, dilations)
    return tuple(
        ops.window_output_size(n, (k - 1) * d + 1, s, lo, hi)
        for n, (lo, hi), k, s, d in zip(in_sizes, pairs, windows, strides, dilations)
    )


def ceil_mode_padding(in_size: int, window: int, stride: int, pad: int = 0) -> tuple[int, int]:
    """(low, high) padding that reproduces PyTorch's `ceil_mode=True` pooling output size.

    PyTorch rounds the output size up, but drops a last window that would start in the padding.
    """
    out = math.ceil((in_size + 2 * pad - window) / stride) + 1
    if (out - 1) * stride >= in_size + pad:
        out -= 1
    extra = max((out - 1) * stride + window - (in_size + 2 * pad), 0)
    return pad, pad + extra


def _raise_if_empty(
    x: jax.Array,
    layer: Sequence[str],
    what: str,
    windows: Sequence[int],
    strides: Sequence[int],
    padding: PaddingLike,
    dilations: Sequence[int] | None = None,
) -> None:
    in_sizes = tuple(x.shape[1:-1])
    if len(in_sizes) != len(windows):
        raise ShapeError(
            f"layer '{'/'.join(layer)}' expects inputs [N, H, W, C]; got shape {tuple(x.shape)}"
        )
    out_sizes = window_output_sizes(in_sizes, windows, strides, padding, dilations)
    if min(out_sizes) < 1:
        fmt = "x".join
        raise ShapeError(
            f"input too small: layer '{'/'.join(layer)}' ({what} window {fmt(map(str, windows))}, "
            f"stride {fmt(map(str, strides))}, padding {padding!r}) would produce an empty "
            f"{fmt(map(str, out_sizes))} output from its {fmt(map(str, in_sizes))} input "
            f"(layer input shape {tuple(x.shape)}); use larger images (or, for the ImageNet designs, "
            "cifar_stem=True where the model has it)"
        )


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _check_existing_kernel(module: nn.Module, inputs: jax.Array, axis: int, scale: int, unit: str):
    """Raise `ShapeError` when `module` already has a kernel (variables given to `apply`) made for
    another input width than `inputs.shape[-1]` (Flax would raise its own less direct error)."""
    if not module.has_variable("params", "kernel"):
        return  # initialising: the kernel is made to fit
    kernel_shape = tuple(module.get_variable("params", "kernel").shape)
    expected = kernel_shape[axis] * scale
    if inputs.shape[-1] != expected:
        raise ShapeError(
            f"layer '{'/'.join(module.path)}' expects {expected} input {unit}{'s' * (expected != 1)}"
            f" (its kernel is {'x'.join(map(str, kernel_shape))}); got {inputs.shape[-1]} (layer "
            f"input shape "
            f"{tuple(inputs.shape)}). The variables were made for another input shape: give the "
            "model images with the height, width and channels it was initialised (trained) with"
        )


class Conv(nn.Conv):
    """`flax.linen.Conv` with a static output-size check and He (fan-out) initialisation.

    The kernel init is torchvision's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, which
    keeps deep plain ReLU nets (VGG without BatchNorm) trainable; Flax's default LeCun init halves the
    signal variance at every ReLU. The convolution is Flax's, i.e. `lax.conv_general_dilated` on every
    backend; `cnn_jax.fast_paths.Conv` is the same layer with faster CPU lowerings.
    """

    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """inputs: [N, H, W, C_in] -> [N, H', W', features]."""
        ndim = inputs.ndim - 2
        windows = _per_dim(self.kernel_size, ndim)
        _raise_if_empty(
            inputs,
            self.path,
            "conv",
            windows,
            _per_dim(self.strides, ndim),
            self.padding,
            _per_dim(self.kernel_dilation, ndim),
        )
        _check_existing_kernel(
            self, inputs, axis=-2, scale=self.feature_group_count, unit="channel"
        )
        return super().__call__(inputs)


class Pool(nn.Module):
    """Max, average or sum pooling per channel, `[N, H, W, C] -> [N, H', W', C]`.

    `strides` defaults to the window. `ceil_mode=True` (max pooling only) rounds the output size up
    like PyTorch's `ceil_mode=True`, padding the high side with -inf. Average pooling counts padded
    zeros in the mean (PyTorch's `count_include_pad=True`); sum pooling adds padded zeros.
    Subclasses change how the windows are reduced by overriding `reduce_windows`
    (`cnn_jax.fast_paths.Pool`).
    """

    kind: str = "max"
    window: int | Sequence[int] = 2
    strides: int | Sequence[int] | None = None
    padding: PaddingLike = "VALID"
    ceil_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_choice("pooling", self.kind, POOLINGS)
        windows = _per_dim(self.window, 2)
        strides = _per_dim(self.strides, 2) if self.strides is not None else windows
        padding = self.padding
        if self.ceil_mode:
            if self.kind != "max":
                raise ConfigError("ceil_mode=True is supported for max pooling only")
            pairs = padding_pairs(padding, x.shape[1:3], windows, strides)
            if any(lo != hi for lo, hi in pairs):
                raise ConfigError(f"ceil_mode=True needs symmetric padding; got {padding!r}")
            padding = tuple(
                ceil_mode_padding(n, k, s, lo)
                for n, k, s, (lo, _) in zip(x.shape[1:3], windows, strides, pairs)
            )
        _raise_if_empty(x, self.path, f"{self.kind} pool", windows, strides, padding)
        if not isinstance(padding, str):
            padding = padding_pairs(padding, x.shape[1:3], windows, strides)
        return self.reduce_windows(x, windows, strides, padding)

    def reduce_windows(
        self,
        x: jax.Array,
        windows: tuple[int, int],
        strides: tuple[int, int],
        padding: str | Sequence[tuple[int, int]],
    ) -> jax.Array:
        """The pooling itself, on checked arguments: Flax's (XLA reduce-window) pooling."""
        if self.kind == "max":
            return nn.max_pool(x, windows, strides, padding)
        if self.kind == "avg":
            return nn.avg_pool(x, windows, strides, padding)
        return nn.pool(x, 0.0, jax.lax.add, windows, strides, padding)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] averaging weights of PyTorch's adaptive pooling bins [floor(i*n/m), ceil((i+1)*n/m))."""
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """PyTorch's `AdaptiveAvgPool2d`: `[N, H, W, C] -> [N, oh, ow, C]` for any H, W >= 1.

    Bin i along an axis of size n averages [floor(i*n/o), ceil((i+1)*n/o)); bins may overlap, and an
    output larger than the input repeats values. Computed as two small averaging matmuls.
    """
    out_h, out_w = _per_dim(output_size, 2)
    _, in_h, in_w, _ = x.shape
    if (in_h, in_w) == (out_h, out_w):
        return x
    rows = jnp.asarray(_adaptive_pool_matrix(in_h, out_h), x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(in_w, out_w), x.dtype)
    return jnp.einsum("nhwc,ph,qw->npqc", x, rows, cols)


class AdaptiveAvgPool(nn.Module):
    """Module form of `adaptive_avg_pool` (so it shows up in model summaries)."""

    output_size: int | tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, H, W, C] -> [N, oh, ow, C]."""
        if x.ndim != 4:
            raise ShapeError(f"layer '{'/'.join(self.path)}' expects [N, H, W, C]; got {x.shape}")
        return adaptive_avg_pool(x, self.output_size)


def conv_norm_act(
    model: nn.Module, x: jax.Array, index: int, features: int, kernel, *, train: bool, **conv_kwargs
) -> jax.Array:
    """conv{index} -> [norm{index}] -> act with `model`'s `conv`, `norm`, `act`, `dtype` and
    `param_dtype` fields: `[N, H, W, C] -> [N, H', W', features]`. Called inside the model's
    compact `__call__`, so the layers are its direct children (torchvision's flat names)."""
    dtypes = {"dtype": model.dtype, "param_dtype": model.param_dtype}
    x = model.conv(features, kernel, name=f"conv{index}", **dtypes, **conv_kwargs)(x)
    norm = make_norm(model.norm, train, **dtypes)
    if norm is not None:
        x = norm(name=f"norm{index}")(x)
    return activation_fn(model.act)(x)


class ConvBlock(nn.Module):
    """`num_convs` x (conv -> [norm] -> act), then optional pooling.

    `[N, H, W, C] -> [N, H', W', features]`. `strides` applies to the first conv only; `padding` to
    every conv. Submodules are named conv1, norm1, conv2, ..., pool. The blocks are swappable: `conv`
    is called as `conv(features, kernel_size, strides=, padding=, use_bias=, dtype=, param_dtype=,
    name=)`, `norm` (class, name or None) through `make_norm`, and `pool` (used when `pooling` names
    a kind) as `pool(pooling, pool_window, pool_strides, pool_padding, name="pool")`.
    """

    features: int
    num_convs: int = 1
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    act: Activation = "relu"
    norm: NormLike = None
    use_bias: bool = True
    pooling: str | None = None
    pool_window: int | Sequence[int] = 2
    pool_strides: int | Sequence[int] | None = None  # None: same as the window
    pool_padding: PaddingLike = "VALID"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = Conv
    pool: ModuleDef = Pool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kernel = _per_dim(self.kernel_size, 2)
        for i in range(1, self.num_convs + 1):
            x = conv_norm_act(
                self, x, i, self.features, kernel, train=train,
                strides=self.strides if i == 1 else 1, padding=self.padding,
                use_bias=self.use_bias,
            )  # fmt: skip
        if self.pooling is not None:
            x = self.pool(
                self.pooling, self.pool_window, self.pool_strides, self.pool_padding, name="pool"
            )(x)
        return x


class Dense(nn.Dense):
    """`flax.linen.Dense` that names itself and both widths when given variables made for
    another number of input features (e.g. a flatten head fed another image size)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """inputs: [..., features_in] -> [..., features]."""
        _check_existing_kernel(self, inputs, axis=0, scale=1, unit="feature")
        return super().__call__(inputs)


class DenseHead(nn.Module):
    """Classifier head: flatten -> hidden Dense + act (+ dropout) -> logits.

    `[N, ...] -> float32 [N, num_classes]`. Dropout follows each hidden activation (VGG) or, with
    `dropout_before_hidden=True`, precedes each hidden Dense (torchvision AlexNet). Submodules are
    named hidden1, hidden2, ..., logits. Flattening is NHWC order, so a ported PyTorch (NCHW) first
    Dense kernel needs its rows permuted.
    """

    num_classes: int
    hidden_features: Sequence[int] = ()
    act: Activation = "relu"
    dropout_rate: float = 0.0
    dropout_before_hidden: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dense: ModuleDef = Dense

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = activation_fn(self.act)

        def dropout(y: jax.Array, index: int) -> jax.Array:
            if self.dropout_rate == 0.0:  # no 'dropout' rng needed then
                return y
            return nn.Dropout(self.dropout_rate, deterministic=not train, name=f"dropout{index}")(y)

        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden_features, start=1):
            if self.dropout_before_hidden:
                x = dropout(x, i)
            x = self.dense(
                width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"hidden{i}"
            )(x)
            x = act(x)
            if not self.dropout_before_hidden:
                x = dropout(x, i)
        x = self.dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="logits"
        )(x)
        # Logits leave the model in float32 so softmax/cross-entropy run in full precision.
        return x.astype(jnp.float32)
