"""The CNN guides' layer library as pure, jit-able, differentiable functions.

Layout conventions: images are NHWC (`x: [N, H, W, C]`), kernels are HWIO (`kernel: [KH, KW, I, O]`).

Every argument is checked in plain Python on static shapes *before* anything reaches XLA, so a
bad call raises `cnn_jax.errors.ShapeError` (a `ValueError`) naming the argument, the value and what
was expected -- also inside `jax.jit`, where shapes are static. Strides, paddings, windows and
dilations are therefore static Python ints, never traced values.

Padding forms accepted by `conv2d` and the pooling functions:
  "VALID"                     no padding (case-insensitive)
  "SAME"                      output size ceil(n / stride); the padding is split as evenly as
                              possible, the extra pixel going at the bottom/right (as in XLA/TF)
  p                           p pixels on every side
  (ph, pw)                    ph rows top and bottom, pw columns left and right
  ((top, bottom), (left, right))  explicit, possibly asymmetric
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_jax.errors import ShapeError

__all__ = [
    "avg_pool",
    "conv2d",
    "conv_output_shape",
    "conv_output_size",
    "flatten",
    "leaky_relu",
    "max_pool",
    "relu",
    "resolve_padding",
    "sigmoid",
    "softmax",
    "sum_pool",
    "tanh",
]

Padding = str | int | Sequence[int] | Sequence[Sequence[int]]
Pads = tuple[tuple[int, int], tuple[int, int]]

_PADDING_FORMS = "'VALID', 'SAME', an int p, a pair (ph, pw) or ((top, bottom), (left, right))"


# ----------------------------------------------------------------------------------------------
# Static argument checking (pure Python; runs at trace time, never compiles anything)
# ----------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    # bool is an int subclass but `stride=True` is a bug, not a stride of 1.
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _pair(value: Any, name: str, fn: str, *, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints (each >= minimum) -> (h, w)."""
    pair = (value, value) if _is_int(value) else value
    if (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(_is_int(v) and v >= minimum for v in pair)
    ):
        return int(pair[0]), int(pair[1])
    raise ShapeError(
        f"{fn}: {name} must be an int >= {minimum} or a pair of such ints, got {value!r}"
    )


def _check_image(x: jax.Array, fn: str, name: str = "x") -> None:
    if x.ndim != 4:
        raise ShapeError(
            f"{fn}: {name} must be 4-D [N, H, W, C] (NHWC), got shape {tuple(x.shape)} ({x.ndim}-D)"
        )
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ShapeError(f"{fn}: {name} must have H >= 1 and W >= 1, got shape {tuple(x.shape)}")


def same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """(low, high) padding of XLA/TF 'SAME' along one axis: output ceil(size / stride); an odd
    total puts the extra pixel after. `window` is the effective (dilated) window d*(k-1)+1."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def window_output_size(size: int, window: int, stride: int, low: int, high: int) -> int:
    """The guides' formula along one axis, unchecked: floor((n + low + high - k) / s) + 1, with
    k the effective window. The one definition used by `ops`, `layers` and `fast_paths` (< 1
    means the window does not fit)."""
    return (size + low + high - window) // stride + 1


def resolve_padding(
    padding: Padding,
    in_hw: Sequence[int],
    window_hw: Sequence[int],
    stride_hw: Sequence[int],
    *,
    fn: str = "resolve_padding",
) -> Pads:
    """Turn any accepted padding form into explicit ((top, bottom), (left, right)).

    `window_hw` is the *effective* window (for a dilated kernel d*(k-1)+1), needed for "SAME".
    Raises ShapeError for an unknown string, a malformed value or negative padding.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0), (0, 0)
        if mode == "SAME":
            return (
                same_padding(in_hw[0], window_hw[0], stride_hw[0]),
                same_padding(in_hw[1], window_hw[1], stride_hw[1]),
            )
        raise ShapeError(
            f"{fn}: padding {padding!r} is not a known padding string; expected {_PADDING_FORMS}"
        )
    pads: Any = None
    if _is_int(padding):
        pads = ((padding, padding), (padding, padding))
    elif isinstance(padding, (tuple, list)) and len(padding) == 2:
        if all(_is_int(p) for p in padding):
            pads = ((padding[0], padding[0]), (padding[1], padding[1]))
        elif all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(q) for q in p)
            for p in padding
        ):
            pads = tuple(tuple(p) for p in padding)
    if pads is None:
        raise ShapeError(f"{fn}: padding must be {_PADDING_FORMS}; got {padding!r}")
    if any(p < 0 for pair in pads for p in pair):
        raise ShapeError(f"{fn}: padding must be non-negative, got {padding!r}")
    (t, b), (left, r) = pads
    return (int(t), int(b)), (int(left), int(r))


def _output_hw(
    in_hw: Sequence[int],
    window_hw: Sequence[int],
    stride_hw: Sequence[int],
    pads: Pads,
    *,
    fn: str,
    what: str,
) -> tuple[int, int]:
    """floor((n + lo + hi - k_eff) / s) + 1 per spatial axis; raises if the window doesn't fit.

    `what` describes the window for the message, e.g. "kernel 3x3 (dilation (2, 2))".
    """
    out = []
    for axis, n, k, s, (lo, hi) in zip("HW", in_hw, window_hw, stride_hw, pads):
        if k > n + lo + hi:
            raise ShapeError(
                f"{fn}: {what} is larger than the padded input along {axis}: effective size {k} "
                f"> input {n} + padding {lo}+{hi} = {n + lo + hi}; expected an effective size "
                "no larger than the padded input (add padding, use 'SAME', or shrink it)"
            )
        out.append(window_output_size(n, k, s, lo, hi))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# Output-size arithmetic (the guides' formula)
# ----------------------------------------------------------------------------------------------


def conv_output_size(
    size: int,
    kernel_size: int,
    stride: int = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int = 1,
) -> int:
    """Output length of a convolution or pooling along one axis.

    floor((n + lo + hi - k_eff) / s) + 1 with k_eff = d*(k-1) + 1; `padding` is an int p
    (lo = hi = p, the guides' 2p), a (lo, hi) pair, "VALID" (0) or "SAME" (ceil(n / s)).
    Agrees with the shapes `conv2d` and the pooling functions produce. Raises ShapeError when
    an argument is invalid or the (dilated) kernel is larger than the padded input.
    """
    fn = "conv_output_size"
    for name, v in (
        ("size", size),
        ("kernel_size", kernel_size),
        ("stride", stride),
        ("dilation", dilation),
    ):
        if not _is_int(v) or v < 1:
            raise ShapeError(f"{fn}: {name} must be an int >= 1, got {v!r}")
    k_eff = dilation * (kernel_size - 1) + 1
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "SAME":
            return -(-size // stride)
        if mode != "VALID":
            raise ShapeError(
                f"{fn}: padding {padding!r} is not a known padding string; "
                "expected 'VALID', 'SAME', an int p or a (lo, hi) pair"
            )
        lo = hi = 0
    elif _is_int(padding):
        lo = hi = padding
    elif (
        isinstance(padding, (tuple, list))
        and len(padding) == 2
        and all(_is_int(p) for p in padding)
    ):
        lo, hi = padding
    else:
        raise ShapeError(
            f"{fn}: padding must be 'VALID', 'SAME', an int p or a (lo, hi) pair; got {padding!r}"
        )
    if lo < 0 or hi < 0:
        raise ShapeError(f"{fn}: padding must be non-negative, got {padding!r}")
    if k_eff > size + lo + hi:
        raise ShapeError(
            f"{fn}: kernel_size {kernel_size} (dilation {dilation}, effective {k_eff}) is larger "
            f"than the padded input {size} + {lo} + {hi} = {size + lo + hi}; the output would be "
            "empty"
        )
    return int(window_output_size(size, k_eff, stride, lo, hi))


def conv_output_shape(
    input_hw: Sequence[int],
    kernel_hw: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding = "VALID",
    dilation: int | Sequence[int] = 1,
) -> tuple[int, int]:
    """(H_out, W_out) of `conv2d` / pooling for an (H, W) input; `padding` takes conv2d's forms
    (a pair here means (ph, pw), not (lo, hi)). Raises ShapeError exactly where conv2d would."""
    fn = "conv_output_shape"
    in_hw = _pair(input_hw, "input_hw", fn)
    k = _pair(kernel_hw, "kernel_hw", fn)
    s = _pair(stride, "stride", fn)
    d = _pair(dilation, "dilation", fn)
    k_eff = tuple(di * (ki - 1) + 1 for ki, di in zip(k, d))
    pads = resolve_padding(padding, in_hw, k_eff, s, fn=fn)
    return _output_hw(in_hw, k_eff, s, pads, fn=fn, what=f"kernel_hw {k[0]}x{k[1]} (dilation {d})")


# ----------------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------------


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: Padding = "VALID",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """2-D cross-correlation (what every DL framework calls convolution), plus optional bias.

    x: [N, H, W, C]; kernel: [KH, KW, C // groups, O]; bias: [O] or None -> [N, H_out, W_out, O]
    with H_out = conv_output_size(H, KH, stride_h, padding_h, dilation_h) (likewise W).
    `groups` splits the channels into independent groups (groups == C with O == C is a depthwise
    convolution). x and kernel are promoted to a common dtype.
    """
    fn = "conv2d"
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    _check_image(x, fn)
    if kernel.ndim != 4:
        raise ShapeError(
            f"{fn}: kernel must be 4-D [KH, KW, I, O] (HWIO), got shape "
            f"{tuple(kernel.shape)} ({kernel.ndim}-D)"
        )
    kh, kw, k_in, k_out = kernel.shape
    if min(kernel.shape) < 1:
        raise ShapeError(
            f"{fn}: kernel dimensions must all be >= 1, got shape {tuple(kernel.shape)}"
        )
    if not _is_int(groups) or groups < 1:
        raise ShapeError(f"{fn}: groups must be an int >= 1, got {groups!r}")
    channels = x.shape[3]
    if k_in * groups != channels:
        raise ShapeError(
            f"{fn}: channel mismatch: x has C={channels} channels (shape {tuple(x.shape)}) but "
            f"kernel expects I={k_in} input channels per group x groups={groups} = "
            f"{k_in * groups} (kernel shape {tuple(kernel.shape)})"
        )
    if k_out % groups:
        raise ShapeError(
            f"{fn}: kernel output channels O={k_out} must be divisible by "
            f"groups={groups} (kernel shape {tuple(kernel.shape)})"
        )
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (k_out,):
            raise ShapeError(
                f"{fn}: bias must have shape ({k_out},) to match the kernel's O, "
                f"got shape {tuple(bias.shape)}"
            )
    s = _pair(stride, "stride", fn)
    d = _pair(dilation, "dilation", fn)
    k_eff = (d[0] * (kh - 1) + 1, d[1] * (kw - 1) + 1)
    pads = resolve_padding(padding, x.shape[1:3], k_eff, s, fn=fn)
    _output_hw(
        x.shape[1:3],
        k_eff,
        s,
        pads,
        fn=fn,
        what=f"kernel {kh}x{kw} (dilation {d}, shape {tuple(kernel.shape)})",
    )

    dtype = jnp.result_type(x, kernel)
    y = lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=s,
        padding=pads,
        rhs_dilation=d,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=precision,
    )
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


# ----------------------------------------------------------------------------------------------
# Pooling (per channel: the channel count never changes)
# ----------------------------------------------------------------------------------------------


def _pool_setup(
    fn: str, x: jax.Array, window: Any, stride: Any, padding: Padding
) -> tuple[tuple[int, int], tuple[int, int], Pads]:
    _check_image(x, fn)
    w = _pair(window, "window", fn)
    s = w if stride is None else _pair(stride, "stride", fn)
    pads = resolve_padding(padding, x.shape[1:3], w, s, fn=fn)
    # A window lying wholly in the padding would give -inf (max) or 0/0 (average); requiring
    # each pad < window rules that out. "SAME" always satisfies it.
    for axis, k, (lo, hi) in zip("HW", w, pads):
        if lo >= k or hi >= k:
            raise ShapeError(
                f"{fn}: padding {padding!r} gives ({lo}, {hi}) along {axis}, but each side must "
                f"be smaller than the window ({k}) so every window overlaps the input"
            )
    _output_hw(x.shape[1:3], w, s, pads, fn=fn, what=f"window {w[0]}x{w[1]}")
    return w, s, pads


def _reduce(
    x: jax.Array, init: Any, op: Any, w: tuple[int, int], s: tuple[int, int], pads: Pads
) -> jax.Array:
    # The init value is each op's identity, so lax picks its differentiable
    # reduce_window_{sum,max} primitives; padded cells take that identity value.
    return lax.reduce_window(
        x, np.array(init, x.dtype), op, (1, *w, 1), (1, *s, 1), ((0, 0), *pads, (0, 0))
    )


def max_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> jax.Array:
    """Maximum over each window, per channel. x: [N, H, W, C] -> [N, H_out, W_out, C].

    `stride` defaults to `window` (non-overlapping windows). Padded cells never win the max.
    """
    x = jnp.asarray(x)
    w, s, pads = _pool_setup("max_pool", x, window, stride, padding)
    if jnp.issubdtype(x.dtype, jnp.floating):
        init = -np.inf
    elif jnp.issubdtype(x.dtype, jnp.integer):
        init = np.iinfo(x.dtype).min
    else:
        raise ShapeError(f"max_pool: x must have a float or integer dtype, got {x.dtype}")
    return _reduce(x, init, lax.max, w, s, pads)


def sum_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> jax.Array:
    """Sum over each window, per channel (padding adds zeros). x: [N, H, W, C] -> [N, H', W', C]."""
    x = jnp.asarray(x)
    w, s, pads = _pool_setup("sum_pool", x, window, stride, padding)
    return _reduce(x, 0, lax.add, w, s, pads)


def avg_pool(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
    *,
    count_include_pad: bool = True,
) -> jax.Array:
    """Mean over each window, per channel. x: [N, H, W, C] -> [N, H_out, W_out, C].

    With padding, `count_include_pad=True` (the default, as in flax.linen.avg_pool and PyTorch)
    divides every window by KH*KW, i.e. padded zeros count; False divides by the number of real
    input cells in the window (as Keras does for 'same'). Integer inputs are averaged in float32.
    """
    x = jnp.asarray(x)
    w, s, pads = _pool_setup("avg_pool", x, window, stride, padding)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    total = _reduce(x, 0, lax.add, w, s, pads)
    if count_include_pad:
        return total / (w[0] * w[1])
    # Count of real cells per window: a static shape, so this is a constant [1, H', W', 1].
    counts = _reduce(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0, lax.add, w, s, pads)
    return total / counts


# ----------------------------------------------------------------------------------------------
# Flatten and activations
# ----------------------------------------------------------------------------------------------


def flatten(x: jax.Array) -> jax.Array:
    """Keep the batch axis, merge the rest: [N, d1, d2, ...] -> [N, d1*d2*...]."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ShapeError(f"flatten: x needs a batch axis, got a scalar of shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def relu(x: jax.Array) -> jax.Array:
    """max(x, 0), elementwise."""
    return jax.nn.relu(x)


def leaky_relu(x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """x for x >= 0, negative_slope * x otherwise."""
    x = jnp.asarray(x)
    return jnp.where(x >= 0, x, negative_slope * x)


def sigmoid(x: jax.Array) -> jax.Array:
    """1 / (1 + exp(-x)), elementwise."""
    return jax.nn.sigmoid(x)


def tanh(x: jax.Array) -> jax.Array:
    """Hyperbolic tangent, elementwise."""
    return jnp.tanh(x)


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """exp(x) / sum(exp(x)) along `axis`.

    Subtracts the max first (softmax is shift-invariant), so large logits don't overflow.
    """
    x = jnp.asarray(x)
    shifted = x - lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    e = jnp.exp(shifted)
    return e / jnp.sum(e, axis=axis, keepdims=True)
