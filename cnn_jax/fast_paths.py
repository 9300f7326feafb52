"""CPU fast paths: explicit, faster CPU lowerings of this project's convolutions and max pooling.

Nothing here is switched on behind the user's back: the zoo's default modules (`layers.Conv`,
`layers.Pool`) compute with XLA's own ops on every backend. A model uses these lowerings only when
it is built with them, e.g.

    options = {k: v for k, v in fast_paths.modules().items() if k in model_options(name)}
    model = get_model(name, num_classes=10, **options)
    step = jax.jit(step, compiler_options=fast_paths.compiler_options(devices))

Its variables have the same structure and names as the default model's, so checkpoints move freely
between the two. Three changes, each measured on the CPU train step (2-core AMD EPYC, jaxlib 0.10.2;
the figures and commands are in benchmarks/RESULTS.md), each giving XLA's results within float32
rounding (tests/test_fast_paths.py):

1. `compiler_options(devices)`: XLA:CPU hands every convolution to YNNPACK by default, which runs it
   on one thread; Eigen's convolution uses all cores. Turning the YNNPACK fusions off makes the
   convolutions of a train step ~1.7x faster on 2 cores. Pass these options to `jax.jit` for
   programs that run on CPU devices (None for others).
2. `Conv` / `conv_general_dilated`: a convolution with few channels (LeNet-5's 1 -> 6 and 6 -> 16)
   runs its forward pass as one matmul on "planar" im2col patches and its input gradient as one
   matmul plus col2im; Eigen is slow with so few channels. A convolution whose kernel is larger
   than its input (VGG-16's 2x2 maps at 32x32 input) runs as an im2col matmul: XLA:CPU emits naive
   loops for those, ~60x slower. Other convs keep XLA's own lowering.
3. `Pool` / `max_pool`: non-overlapping max pooling (2x2 stride 2) as reshape + max, whose gradient
   is an elementwise select instead of XLA's slow select-and-scatter. (The same for average pooling
   was measured ~40% slower for LeNet-5's train step, so average pooling keeps XLA's reduce-window.)
The lowerings compute the same function on any backend, but were measured (and pay off) on CPU
only; build models for GPUs and TPUs with the default modules. `FastPathPolicy` chooses which paths
a module or function takes. The planar conv has its own VJP, so forward-mode AD (`jax.jvp`,
`jax.jacfwd`, `jax.hessian`) needs the default modules.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax import layers, ops

# The YNNPACK library fusions XLA:CPU uses (by default convolutions and dots), as an empty list: Eigen
# then runs them multi-threaded. Passed per program, so other JAX code in the process is untouched.
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@dataclasses.dataclass(frozen=True)
class FastPathPolicy:
    """Which fast paths a module or function takes (all of them with `DEFAULT_POLICY`).

    eigen_convolutions: `compiler_options` gives `CPU_COMPILER_OPTIONS` (Eigen instead of YNNPACK)
        for CPU programs.
    planar_conv_*: a conv takes the planar im2col lowering when it has at most this many input
        channels and output features, in batch chunks whose patches fit in this many bytes (a
        chunk is at least one image; beyond that, XLA's conv). Measured (benchmarks/RESULTS.md):
        LeNet-5's convs (1 -> 6, 6 -> 16 channels) are 1.4-3x faster this way; the small
        ConvNet's first conv (3 -> 32 at 32x32) is slower than Eigen's; patches that outgrow the
        cache lose (LeNet-5 conv1 at batch 512 in one 40 MiB piece: 10,100 img/s, in 4 MiB chunks:
        12,200; at batch 128, 10 MiB vs 4 MiB chunks: +3%).
    small_input_im2col: convs whose kernel is larger than their input (e.g. 3x3 on 2x2 maps) as
        one NHWC im2col matmul (`_im2col_conv`).
    reshape_max_pool: non-overlapping max pooling as reshape + max.
    """

    eigen_convolutions: bool = True
    planar_conv_max_in_channels: int = 8
    planar_conv_max_out_features: int = 16
    planar_conv_max_patch_bytes: int = 4 * 2**20
    small_input_im2col: bool = True
    reshape_max_pool: bool = True

    def planar_conv(self, in_channels: int, out_features: int) -> bool:
        return (
            in_channels <= self.planar_conv_max_in_channels
            and out_features <= self.planar_conv_max_out_features
        )


DEFAULT_POLICY = FastPathPolicy()


def compiler_options(
    devices: Sequence[Any], policy: FastPathPolicy = DEFAULT_POLICY
) -> dict[str, Any] | None:
    """The XLA options for a program that runs on `devices`: `CPU_COMPILER_OPTIONS` when they are
    all CPUs and `policy.eigen_convolutions` is on, else None."""
    if not policy.eigen_convolutions or not devices:
        return None
    if any(d.platform != "cpu" for d in devices):
        return None
    return dict(CPU_COMPILER_OPTIONS)


# --------------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------------

_NHWC = ("NHWC", "HWIO", "NHWC")
_NHWC_NUMBERS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(tuple(d) for d in dimension_numbers) == _NHWC_NUMBERS
    return tuple(dimension_numbers) == _NHWC


def _all_ones(values) -> bool:
    return values is None or all(int(v) == 1 for v in values)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    *,
    policy: FastPathPolicy = DEFAULT_POLICY,
):
    """`jax.lax.conv_general_dilated` (same signature and results), with matmul lowerings for
    few-channel NHWC/HWIO convolutions (`policy.planar_conv`) and for inputs smaller than the kernel
    (`policy.small_input_im2col`). Everything else -- other layouts, dilation, groups, symbolic
    shapes, more channels -- is `lax.conv_general_dilated` as is. bfloat16/float16 convs on these
    paths compute in float32 and round once.

    lhs: [N, H, W, C] and rhs: [kh, kw, C, O] with dimension_numbers ("NHWC", "HWIO", "NHWC").

    Reverse-mode derivatives of any order work; the planar path is a `jax.custom_vjp` (its own,
    measured faster, input gradient), so forward-mode AD (`jax.jvp`, `jax.jacfwd`) through it
    raises: use `lax.conv_general_dilated` (the default `layers.Conv`) for that.
    """
    plain = functools.partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if (
        lhs.ndim != 4
        or not _is_nhwc(dimension_numbers)
        or not all(isinstance(d, int) for d in (*lhs.shape, *rhs.shape))  # e.g. symbolic batch
        or feature_group_count != 1
        or batch_group_count != 1
        or not _all_ones(lhs_dilation)
        or not _all_ones(rhs_dilation)
        or preferred_element_type is not None
        or lhs.dtype != rhs.dtype
    ):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    kh, kw, c, o = rhs.shape
    if isinstance(padding, str):
        pads = tuple(
            tuple(p) for p in lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), strides, padding)
        )
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    ho = ops.window_output_size(lhs.shape[1], kh, strides[0], *pads[0])
    wo = ops.window_output_size(lhs.shape[2], kw, strides[1], *pads[1])
    n = lhs.shape[0]
    if ho < 1 or wo < 1 or any(p < 0 for pair in pads for p in pair):
        return plain()
    small_input = policy.small_input_im2col and (kh > lhs.shape[1] or kw > lhs.shape[2])
    if not small_input and not policy.planar_conv(c, o):
        return plain()
    dtype = lhs.dtype
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        # bfloat16/float16: compute and sum the taps in float32, round once (as XLA's conv does).
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    if small_input:
        return _im2col_conv(lhs, rhs, strides, pads, (ho, wo), precision).astype(dtype)
    patch_bytes = kh * kw * c * n * ho * wo * jnp.dtype(lhs.dtype).itemsize
    # Patches must stay cache-sized: larger batches run in batch chunks, each its own matmul.
    chunks = -(-patch_bytes // policy.planar_conv_max_patch_bytes)
    if chunks > n:
        return plain()
    if chunks == 1:
        return _planar_conv(lhs, rhs, strides, pads, precision).astype(dtype)
    parts = jnp.array_split(lhs, chunks, axis=0)
    y = jnp.concatenate([_planar_conv(p, rhs, strides, pads, precision) for p in parts], axis=0)
    return y.astype(dtype)


def _xla_conv(x, k, strides, pads, precision):
    return lax.conv_general_dilated(
        x, k, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


def _im2col_conv(x, k, strides, pads, out_hw, precision):
    """The conv as one matmul on NHWC im2col patches [N*Ho*Wo, kh*kw*C] @ K [kh*kw*C, O], for
    inputs smaller than the kernel (VGG-16's last block on 32x32 images: 2x2 maps, 3x3 kernels).
    XLA:CPU runs such convs and their input gradients as naive loops (264 ms for a 2x2x512 -> 512
    conv at batch 32, vs ~4 ms here); the patches are tiny, and JAX differentiates the slicing and
    the matmul into matmuls and pads."""
    kh, kw, c, o = k.shape
    (sh, sw), (ho, wo) = strides, out_hw
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n = x.shape[0]
    taps = [
        lax.slice(
            xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.stack(taps, axis=3).reshape(n * ho * wo, kh * kw * c)
    y = lax.dot(patches, k.reshape(kh * kw * c, o), precision=precision)
    return y.reshape(n, ho, wo, o)


def _planar_patches(x, kh, kw, strides, pads, out_hw):
    """im2col with taps and channels major: [kh*kw*C, N*Ho*Wo], row (i*kw + j)*C + c holding tap
    (i, j) of channel c. Built from the planar input [C, N, H, W], so every view is a slice of whole
    rows, and in two stacks (kh row views, then kw column views of those): XLA:CPU copies each
    stacked view separately, so this is ~2x faster than one stack of kh*kw views."""
    (sh, sw), (ho, wo) = strides, out_hw
    xc = jnp.moveaxis(jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0))), -1, 0)  # [C, N, Hp, Wp]
    c, n, _, wp = xc.shape
    rows = jnp.stack(
        [
            lax.slice(xc, (0, 0, i, 0), (c, n, i + (ho - 1) * sh + 1, wp), (1, 1, sh, 1))
            for i in range(kh)
        ],
        0,
    )  # [kh, C, N, Ho, Wp]
    cols = jnp.stack(
        [
            lax.slice(
                rows, (0, 0, 0, 0, j), (kh, c, n, ho, j + (wo - 1) * sw + 1), (1, 1, 1, 1, sw)
            )
            for j in range(kw)
        ],
        1,
    )  # [kh, kw, C, N, Ho, Wo]
    return cols.reshape(kh * kw * c, n * ho * wo)


def _planar_forward(x, k, strides, pads, precision):
    """y^T [O, N*Ho*Wo] = K^T @ patches (one matmul), then back to NHWC. The transposed product is
    measured faster than contracting the patches' first axis into an [N*Ho*Wo, O] result."""
    kh, kw, c, o = k.shape
    ho = ops.window_output_size(x.shape[1], kh, strides[0], *pads[0])
    wo = ops.window_output_size(x.shape[2], kw, strides[1], *pads[1])
    p = _planar_patches(x, kh, kw, strides, pads, (ho, wo))
    y = lax.dot_general(k.reshape(kh * kw * c, o), p, (((0,), (0,)), ((), ())), precision=precision)
    return jnp.transpose(y.reshape(o, x.shape[0], ho, wo), (1, 2, 3, 0))


def _planar_input_grad(g, k, x_shape, strides, pads, precision):
    """dx: dpatches^T [kh*kw*C, N*Ho*Wo] = K @ dy^T (one matmul), col2im in the planar layout
    [C, N, Hp, Wp] (each tap padded into place; the pads fuse with the adds), back to NHWC."""
    kh, kw, c, o = k.shape
    n, h, w, _ = x_shape
    ho, wo = g.shape[1], g.shape[2]
    gt = jnp.transpose(g, (3, 0, 1, 2)).reshape(o, n * ho * wo)
    dpt = lax.dot_general(
        k.reshape(kh * kw * c, o), gt, (((1,), (0,)), ((), ())), precision=precision
    )
    dpt = dpt.reshape(kh * kw, c, n, ho, wo)
    hp, wp = h + sum(pads[0]), w + sum(pads[1])
    sh, sw = strides
    zero = jnp.zeros((), dpt.dtype)
    dxp = None
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        placed = lax.pad(
            dpt[t],
            zero,
            (
                (0, 0, 0),
                (0, 0, 0),
                (i, hp - i - (ho - 1) * sh - 1, sh - 1),
                (j, wp - j - (wo - 1) * sw - 1, sw - 1),
            ),
        )
        dxp = placed if dxp is None else dxp + placed
    (plo, _), (qlo, _) = pads
    return jnp.transpose(lax.slice(dxp, (0, 0, plo, qlo), (c, n, plo + h, qlo + w)), (1, 2, 3, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _planar_conv(x, k, strides, pads, precision):
    return _planar_forward(x, k, strides, pads, precision)


def _planar_conv_fwd(x, k, strides, pads, precision):
    return _planar_forward(x, k, strides, pads, precision), (x, k)


def _planar_conv_bwd(strides, pads, precision, residuals, g):
    x, k = residuals
    # Kernel gradient: XLA's own (Eigen's backward-filter conv was as fast as a planar matmul on
    # patches, and needs no patches kept from the forward pass).
    _, vjp_k = jax.vjp(lambda kk: _xla_conv(x, kk, strides, pads, precision), k)
    (dk,) = vjp_k(g)
    dx = _planar_input_grad(g, k, x.shape, strides, pads, precision)
    return dx.astype(x.dtype), dk.astype(k.dtype)


_planar_conv.defvjp(_planar_conv_fwd, _planar_conv_bwd)


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------


def _tiling_windows(x, window_shape, strides, padding) -> tuple[int, int] | None:
    """The window (wh, ww) when windows tile x [N, H, W, C] without overlap or padding, else None."""
    window = tuple(int(w) for w in window_shape)
    strides = tuple(int(s) for s in strides) if strides is not None else (1,) * len(window)
    if x.ndim != 4 or len(window) != 2 or strides != window:
        return None
    if isinstance(padding, str):
        if padding.upper() != "VALID":
            return None
    elif any(tuple(p) != (0, 0) for p in padding):
        return None
    if x.shape[1] < window[0] or x.shape[2] < window[1]:
        return None
    return window


def max_pool(x, window_shape, strides=None, padding="VALID", *, policy=DEFAULT_POLICY):
    """`flax.linen.max_pool`, as reshape + max when the windows tile the input (a ragged border is
    dropped, as VALID pooling drops it) and `policy.reshape_max_pool` is on.

    Gradient ties: with several equal maxima in a window this path splits the gradient equally among
    them (JAX's rule for `max`), where XLA's select-and-scatter gives it all to one of them.
    """
    if policy.reshape_max_pool:
        window = _tiling_windows(x, window_shape, strides, padding)
        if window is not None:
            n, h, w, c = x.shape
            (wh, ww), ho, wo = window, h // window[0], w // window[1]
            x = x[:, : ho * wh, : wo * ww, :]
            return jnp.max(x.reshape(n, ho, wh, wo, ww, c), axis=(2, 4))
    return nn.max_pool(x, tuple(window_shape), strides, padding)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


@functools.cache
def _conv_fn(policy: FastPathPolicy) -> Callable:
    # One function object per policy: equal policies give equal (same hash) Conv modules.
    return functools.partial(conv_general_dilated, policy=policy)


class Conv(layers.Conv):
    """`layers.Conv` (same fields, variables and checks) whose convolution is
    `conv_general_dilated(..., policy=policy)`. `[N, H, W, C_in] -> [N, H', W', features]`.

    The `conv_general_dilated` field is always set from `policy`.
    """

    policy: FastPathPolicy = DEFAULT_POLICY

    def __post_init__(self) -> None:
        # Flax reads `self.conv_general_dilated` in __call__; a field default cannot depend on
        # `policy`, so set it here, before Flax freezes the module's attributes.
        object.__setattr__(self, "conv_general_dilated", _conv_fn(self.policy))
        super().__post_init__()


class Pool(layers.Pool):
    """`layers.Pool` whose max pooling is `max_pool(..., policy=policy)` (reshape + max for tiling
    windows); average and sum pooling are the parent's. `[N, H, W, C] -> [N, H', W', C]`."""

    policy: FastPathPolicy = DEFAULT_POLICY

    def reduce_windows(self, x, windows, strides, padding):
        if self.kind == "max":
            return max_pool(x, windows, strides, padding, policy=self.policy)
        return super().reduce_windows(x, windows, strides, padding)


@functools.cache
def _bound_modules(policy: FastPathPolicy) -> tuple[Callable[..., nn.Module], ...]:
    # Cached: equal policies give the same partials, so models built from them compare equal.
    return functools.partial(Conv, policy=policy), functools.partial(Pool, policy=policy)


def modules(policy: FastPathPolicy = DEFAULT_POLICY) -> dict[str, Callable[..., nn.Module]]:
    """The fast module classes bound to `policy`, by model field name: {"conv": ..., "pool": ...}.

    For `get_model(name, num_classes=..., **{k: v for k, v in modules().items()
    if k in model_options(name)})`.
    """
    conv, pool = _bound_modules(policy)
    return {"conv": conv, "pool": pool}


__all__ = [
    "CPU_COMPILER_OPTIONS",
    "DEFAULT_POLICY",
    "Conv",
    "FastPathPolicy",
    "Pool",
    "compiler_options",
    "conv_general_dilated",
    "max_pool",
    "modules",
]
