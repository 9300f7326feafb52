"""Prototype: faster XLA:CPU lowerings for convolutions with few channels, and for pooling.

XLA:CPU runs convolutions through Eigen/YNNPACK, which are slow when a layer has very few input or
output channels (LeNet-5: 1 -> 6 and 6 -> 16 channels, 5x5 kernels), and its loop emitter stops
vectorising long fused multiply-add chains once an activation such as tanh is fused into them. In a
LeNet-5 train step the forward conv of the first layer and the input gradient of the second take
most of the time. `conv_general_dilated` below is a drop-in replacement for
`jax.lax.conv_general_dilated` (same signature, same results within float32 rounding) that picks,
per direction, a lowering by the number of input channels C_in (`ConvPolicy`, default `POLICY`):

  forward, C_in == 1:          one matmul on "planar" patches, K^T [O, kh*kw] @ P [kh*kw, N*Ho*Wo],
                               then a transpose to NHWC (the matmul output is a real buffer, so the
                               following bias + tanh stay a short vectorised loop)
  input gradient, C_in <= 8:   dP^T = K @ dy^T (one matmul) + col2im in the planar layout
  kernel gradient, C_in 2..4:  one contraction of the stacked tap views with dy
  everything else:             XLA's own conv and gradients (fast once channels are >= ~16)

It is wired in through a `jax.custom_vjp`, so each direction gets its own lowering. Only NHWC/HWIO,
no dilation and feature_group_count=1 on the CPU back end take the custom path; anything else falls
back to `lax.conv_general_dilated` unchanged. `ConvPolicy(canonical_grads=True)` writes stride-1
gradients as explicit canonical forward convs, which keeps them fast inside `lax.scan` /
`fori_loop` bodies, where XLA:CPU does not canonicalise its own conv gradients.

`max_pool` / `avg_pool` replace Flax's for non-overlapping windows (2x2 stride 2) with
reshape + max/mean, whose gradient is elementwise instead of XLA's slow select-and-scatter /
variadic reduce-window.

flax.linen.Conv accepts the conv function as its `conv_general_dilated` field, so the model-side
change is one line in `cnn_jax/layers.py` (see benchmarks/RESULTS.md, "CPU levers"); `patched_flax`
applies both changes to unmodified models for measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class ConvPolicy:
    """Which lowering each direction of a conv uses, by input channels C_in (stride-1 only for
    "canonical"). A direction whose rule gives "xla" uses XLA's own conv / conv gradient.

    fwd: "xla" | "taps" | "dot"    (taps: sum over kh*kw broadcast multiply-adds; dot: planar
                                    im2col, K^T [O, kh*kw*C] @ patches [kh*kw*C, N*Ho*Wo])
    dk:  "xla" | "stack" | "planar" | "canonical"  (stack: patches [kh*kw, N, Ho, Wo, C] contracted
                                    with dy; planar: planar patches [kh*kw*C, M] @ dy [M, O], the
                                    patches saved from a "dot" forward)
    dx:  "xla" | "im2col" | "planar" | "canonical" (im2col: dy @ K^T then col2im; planar: the
                                    same in the [C, N, H, W] layout)
    """

    fwd_taps_max_c: int = 0
    fwd_dot_max_c: int = 0
    dk_stack_c: tuple[int, ...] = ()
    dk_planar_max_c: int = 0
    dx_im2col_max_c: int = 0
    dx_planar_max_c: int = 0
    canonical_grads: bool = False  # stride-1 gradients as explicit canonical convs (while loops)
    cpu_only: bool = True  # GPUs/TPUs keep XLA's convs (cuDNN etc.): these lowerings are for XLA:CPU
    # Patches larger than this take XLA's path (measured: LeNet-5 conv1 patches are 10 MiB at batch
    # 128, planar 1.6-1.9x faster; 40 MiB at batch 512, planar ~10% slower than XLA's).
    max_patch_bytes: int = 16 * 2**20

    def fwd(self, c: int) -> str:
        if c <= self.fwd_dot_max_c:
            return "dot"
        return "taps" if c <= self.fwd_taps_max_c else "xla"

    def dk(self, c: int, stride1: bool) -> str:
        if c <= self.dk_planar_max_c:
            return "planar"
        if c in self.dk_stack_c:
            return "stack"
        return "canonical" if (self.canonical_grads and stride1) else "xla"

    def dx(self, c: int, stride1: bool) -> str:
        if c <= self.dx_planar_max_c:
            return "planar"
        if c <= self.dx_im2col_max_c:
            return "im2col"
        return "canonical" if (self.canonical_grads and stride1) else "xla"

    def is_plain(self, c: int) -> bool:
        directions = (self.fwd(c), self.dk(c, True), self.dk(c, False), self.dx(c, True),
                      self.dx(c, False))
        return directions == ("xla",) * 5


# The proposed default, from full-train-step measurements on a 2-core AMD EPYC (AVX-512), jaxlib
# 0.10.2 (benchmarks/RESULTS.md): every conv with at most 8 input channels (LeNet-5's two, the small
# ConvNet's first) runs all three directions as planar im2col matmuls, the forward's patches reused
# by the kernel gradient; convs with more input channels keep XLA's own lowering and gradients.
POLICY = ConvPolicy(fwd_dot_max_c=8, dk_planar_max_c=8, dx_planar_max_c=8)

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _NHWC


def _all_ones(v) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def conv_general_dilated(
    lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
    dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated` with faster CPU lowerings for few-channel NHWC convs.

    lhs: [N, H, W, C] (with dimension_numbers ("NHWC", "HWIO", "NHWC")), rhs: [kh, kw, C, O].
    """
    plain = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
    )
    if (
        lhs.ndim != 4 or not _is_nhwc(dimension_numbers) or feature_group_count != 1
        or batch_group_count != 1 or not _all_ones(lhs_dilation) or not _all_ones(rhs_dilation)
        or preferred_element_type is not None
    ):
        return plain()
    c = lhs.shape[-1]
    if POLICY.is_plain(c) or (POLICY.cpu_only and jax.default_backend() != "cpu"):
        return plain()  # enough channels: XLA's own conv and its gradients are the fastest
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = tuple(lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    kh, kw = rhs.shape[:2]
    ho = _out_size(lhs.shape[1], kh, strides[0], *pads[0])
    wo = _out_size(lhs.shape[2], kw, strides[1], *pads[1])
    patch_bytes = kh * kw * c * lhs.shape[0] * ho * wo * jnp.dtype(lhs.dtype).itemsize
    if patch_bytes > POLICY.max_patch_bytes:
        return plain()
    stride1 = strides == (1, 1)
    impls = (POLICY.fwd(c), POLICY.dk(c, stride1), POLICY.dx(c, stride1))
    return _conv(lhs, rhs, strides, pads, precision, impls)


@contextlib.contextmanager
def policy(new: ConvPolicy):
    """Trace under another `ConvPolicy` (for experiments)."""
    global POLICY
    old, POLICY = POLICY, new
    try:
        yield
    finally:
        POLICY = old


def _xla(x, k, strides, pads, precision):
    return lax.conv_general_dilated(
        x, k, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


def _out_size(n, k, s, lo, hi):
    return (n + lo + hi - k) // s + 1


def _tap_slices(xp, kh, kw, strides, out_hw):
    """The kh*kw shifted (strided) views of the padded input, each [N, Ho, Wo, C], tap order (i, j)."""
    (sh, sw), (ho, wo) = strides, out_hw
    n, _, _, c = xp.shape
    return [
        lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]


def _taps(x, k, strides, pads, precision):
    """Forward conv as a sum over taps (fused elementwise loop when C_in == 1)."""
    kh, kw, c, _ = k.shape
    ho = _out_size(x.shape[1], kh, strides[0], *pads[0])
    wo = _out_size(x.shape[2], kw, strides[1], *pads[1])
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    acc = None
    for t, view in enumerate(_tap_slices(xp, kh, kw, strides, (ho, wo))):
        w = k[t // kw, t % kw].astype(acc_dtype)  # [C, O]
        if c == 1:
            term = view.astype(acc_dtype) * w[0]
        else:
            term = jnp.einsum("nhwc,co->nhwo", view, w, precision=precision,
                              preferred_element_type=acc_dtype)
        acc = term if acc is None else acc + term
    return acc.astype(jnp.result_type(x, k))


def _im2col_dx(g, k, x_shape, strides, pads, precision):
    """Input gradient: dpatches = g @ K^T, then col2im (transpose of the tap slicing)."""
    kh, kw, c, o = k.shape
    n, h, w, _ = x_shape
    ho, wo = g.shape[1], g.shape[2]
    dpatches = jnp.einsum(
        "nhwo,tco->nhwtc", g, k.reshape(kh * kw, c, o), precision=precision
    )  # [N, Ho, Wo, kh*kw, C]
    hp, wp = h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]
    sh, sw = strides
    zero = jnp.zeros((), dpatches.dtype)
    dxp = None
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        # Place tap t's gradient at rows i, i+sh, ... and columns j, j+sw, ... (pads fuse with adds).
        placed = lax.pad(
            dpatches[:, :, :, t, :], zero,
            ((0, 0, 0), (i, hp - i - (ho - 1) * sh - 1, sh - 1),
             (j, wp - j - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)),
        )
        dxp = placed if dxp is None else dxp + placed
    (plo, _), (qlo, _) = pads
    return lax.slice(dxp, (0, plo, qlo, 0), (n, plo + h, qlo + w, c)).astype(g.dtype)


def _canonical_dk(x, g, kernel_hw, pads, precision):
    """Kernel gradient of a stride-1 conv as one forward conv in Eigen's canonical layout.

    dK[i, j, c, o] = sum_{n, h, w} xpad[n, h + i, w + j, c] * g[n, h, w, o]: a conv whose "batch" is
    C and whose "features" are N. Writing it out with explicit transposes keeps XLA:CPU on its fast
    (Eigen) conv kernel also inside while loops, where its own backward-filter conv is not
    canonicalised and runs a slow naive loop.
    """
    del kernel_hw  # implied by the shapes of x and g
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    lhs = jnp.transpose(xp, (3, 1, 2, 0))  # [C, Hp, Wp, N]
    rhs = jnp.transpose(g, (1, 2, 0, 3))  # [Ho, Wo, N, O]
    out = lax.conv_general_dilated(lhs, rhs, (1, 1), "VALID", dimension_numbers=_NHWC,
                                   precision=precision)  # [C, kh, kw, O]
    return jnp.transpose(out, (1, 2, 0, 3))


def _canonical_dx(g, k, x_shape, pads, precision):
    """Input gradient of a stride-1 conv as one canonical forward conv (flipped, transposed kernel)."""
    kh, kw = k.shape[:2]
    h, w = x_shape[1], x_shape[2]
    ho, wo = g.shape[1], g.shape[2]
    (plo, _), (qlo, _) = pads
    # Full correlation of g with the flipped kernel, cropped to the unpadded input.
    gpad = ((kh - 1 - plo, h + plo - ho), (kw - 1 - qlo, w + qlo - wo))
    kflip = jnp.swapaxes(k[::-1, ::-1], 2, 3)  # [kh, kw, O, C]
    return lax.conv_general_dilated(g, kflip, (1, 1), gpad, dimension_numbers=_NHWC,
                                    precision=precision)


def _planar_patches(x, kh, kw, strides, pads, out_hw):
    """im2col with the taps and channels major: [kh*kw*C, N*Ho*Wo] (row (i*kw + j)*C + c is tap
    (i, j) of channel c), from the planar input [C, N, H, W] so every view is a slice of whole rows.
    Built in two stacks (kh row views, then kw column views of those): XLA:CPU materialises each
    stacked view separately, so this is ~2x faster than one stack of kh*kw views."""
    (sh, sw), (ho, wo) = strides, out_hw
    xc = jnp.moveaxis(jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0))), -1, 0)  # [C, N, Hp, Wp]
    c, n, _, wp = xc.shape
    rows = jnp.stack(
        [lax.slice(xc, (0, 0, i, 0), (c, n, i + (ho - 1) * sh + 1, wp), (1, 1, sh, 1)) for i in range(kh)],
        0,
    )  # [kh, C, N, Ho, Wp]
    cols = jnp.stack(
        [lax.slice(rows, (0, 0, 0, 0, j), (kh, c, n, ho, j + (wo - 1) * sw + 1), (1, 1, 1, 1, sw))
         for j in range(kw)],
        1,
    )  # [kh, kw, C, N, Ho, Wo]
    return cols.reshape(kh * kw * c, n * ho * wo)


def _dot_fwd(x, k, strides, pads, precision, return_patches=False):
    """Forward conv as one matmul on planar patches: y^T [O, M] = K^T @ P, then back to NHWC.

    The matmul's output is a real buffer, so the activation that follows is not fused into a
    long multiply-add loop (XLA:CPU stops vectorising such loops: tanh after a 25-tap sum runs
    ~10x slower than on its own)."""
    kh, kw, c, o = k.shape
    ho = _out_size(x.shape[1], kh, strides[0], *pads[0])
    wo = _out_size(x.shape[2], kw, strides[1], *pads[1])
    p = _planar_patches(x, kh, kw, strides, pads, (ho, wo))
    y = lax.dot_general(k.reshape(kh * kw * c, o), p, (((0,), (0,)), ((), ())), precision=precision)
    y = jnp.transpose(y.reshape(o, x.shape[0], ho, wo), (1, 2, 3, 0))
    return (y, p) if return_patches else y


def _planar_dx(g, k, x_shape, strides, pads, precision):
    """Input gradient: dpatches^T [kh*kw*C, M] = K @ dy^T (one matmul), col2im in the planar layout
    [C, N, Hp, Wp] (pads and adds along W), then back to NHWC."""
    kh, kw, c, o = k.shape
    n, h, w, _ = x_shape
    ho, wo = g.shape[1], g.shape[2]
    gt = jnp.transpose(g, (3, 0, 1, 2)).reshape(o, n * ho * wo)
    dpt = lax.dot_general(k.reshape(kh * kw * c, o), gt, (((1,), (0,)), ((), ())), precision=precision)
    dpt = dpt.reshape(kh * kw, c, n, ho, wo)
    hp, wp = h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]
    sh, sw = strides
    zero = jnp.zeros((), dpt.dtype)
    dxp = None
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        placed = lax.pad(
            dpt[t], zero,
            ((0, 0, 0), (0, 0, 0), (i, hp - i - (ho - 1) * sh - 1, sh - 1),
             (j, wp - j - (wo - 1) * sw - 1, sw - 1)),
        )
        dxp = placed if dxp is None else dxp + placed
    (plo, _), (qlo, _) = pads
    dxc = lax.slice(dxp, (0, 0, plo, qlo), (c, n, plo + h, qlo + w))
    return jnp.transpose(dxc, (1, 2, 3, 0))


def _stack_dk(x, g, k_shape, strides, pads, precision):
    """Kernel gradient as one contraction of the tap views [kh*kw, N, Ho, Wo, C] with dy."""
    kh, kw, c, o = k_shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    views = jnp.stack(_tap_slices(xp, kh, kw, strides, g.shape[1:3]), 0)
    d = lax.dot_general(views, g, (((1, 2, 3), (0, 1, 2)), ((), ())), precision=precision)
    return d.reshape(kh, kw, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, k, strides, pads, precision, impls):
    if impls[0] == "taps":
        return _taps(x, k, strides, pads, precision)
    if impls[0] == "dot":
        return _dot_fwd(x, k, strides, pads, precision)
    return _xla(x, k, strides, pads, precision)


def _conv_fwd(x, k, strides, pads, precision, impls):
    if impls[1] == "planar":  # keep the planar patches for the kernel gradient
        kh, kw = k.shape[:2]
        if impls[0] == "dot":
            y, p = _dot_fwd(x, k, strides, pads, precision, return_patches=True)
        else:
            y = _conv(x, k, strides, pads, precision, impls)
            p = _planar_patches(x, kh, kw, strides, pads, y.shape[1:3])
        return y, (x, k, p)
    return _conv(x, k, strides, pads, precision, impls), (x, k, None)


def _conv_bwd(strides, pads, precision, impls, residuals, g):
    x, k, p = residuals
    _, dk_impl, dx_impl = impls
    if dk_impl == "planar":
        kh, kw, c, o = k.shape
        dk = lax.dot_general(p, g.reshape(-1, o), (((1,), (0,)), ((), ())), precision=precision)
        dk = dk.reshape(kh, kw, c, o)
    elif dk_impl == "stack":
        dk = _stack_dk(x, g, k.shape, strides, pads, precision)
    elif dk_impl == "canonical":
        dk = _canonical_dk(x, g, k.shape[:2], pads, precision)
    else:
        _, vjp_k = jax.vjp(lambda kk: _xla(x, kk, strides, pads, precision), k)
        (dk,) = vjp_k(g)
    if dx_impl == "im2col":
        dx = _im2col_dx(g, k, x.shape, strides, pads, precision)
    elif dx_impl == "planar":
        dx = _planar_dx(g, k, x.shape, strides, pads, precision)
    elif dx_impl == "canonical":
        dx = _canonical_dx(g, k, x.shape, pads, precision)
    else:
        _, vjp_x = jax.vjp(lambda xx: _xla(xx, k, strides, pads, precision), x)
        (dx,) = vjp_x(g)
    return dx.astype(x.dtype), dk.astype(k.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def with_fast_conv(module_cls, **kwargs):
    """`functools.partial(module_cls, conv_general_dilated=conv_general_dilated, **kwargs)`."""
    return functools.partial(module_cls, conv_general_dilated=conv_general_dilated, **kwargs)


@contextlib.contextmanager
def patched_flax(
    conv: bool = True, pool: str | None = "reshape", conv_policy: ConvPolicy | None = None,
    avg_pool_too: bool = False,
):
    """While tracing, route every `flax.linen.Conv` through `conv_general_dilated` (under
    `conv_policy`, default `POLICY`) and `flax.linen.max_pool` (and `avg_pool` if `avg_pool_too`:
    measured slower for LeNet-5, whose tanh then fuses into the pooling) through the fast pooling
    path `pool` ("reshape" | "slices" | None). A stand-in for the one-line changes proposed
    for cnn_jax/layers.py, so benchmarks can measure them on the real models and train step."""
    import types

    import flax.linen as nn
    from flax.linen import linear

    global POOL_IMPL
    saved = linear.lax, nn.max_pool, nn.avg_pool, POOL_IMPL
    try:
        with contextlib.ExitStack() as stack:
            if conv:
                proxy = types.SimpleNamespace(
                    **{k: getattr(lax, k) for k in dir(lax) if not k.startswith("__")}
                )
                proxy.conv_general_dilated = conv_general_dilated
                linear.lax = proxy
                if conv_policy is not None:
                    stack.enter_context(policy(conv_policy))
            if pool:
                nn.max_pool, POOL_IMPL = max_pool, pool
                if avg_pool_too:
                    nn.avg_pool = avg_pool
            yield
    finally:
        linear.lax, nn.max_pool, nn.avg_pool, POOL_IMPL = saved


__all__: Sequence[str] = ["conv_general_dilated", "with_fast_conv"]


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------


POOL_IMPL = "reshape"  # "reshape" | "slices"


def _window_pool(reduce_fn, x, window_shape, strides=None, padding="VALID"):
    """Non-overlapping pooling as reshape + reduce, else None.

    x: [N, H, W, C]. Applies when the windows tile the input without overlap or padding
    (strides == window, padding VALID or all zeros); a ragged border is cropped, as VALID pooling
    drops it. The gradient is then elementwise (a compare-and-select for max, a broadcast for mean)
    instead of XLA's select-and-scatter / variadic reduce-window, which is slow on CPU.
    """
    window = tuple(window_shape)
    strides = tuple(strides) if strides is not None else window
    if x.ndim != 4 or len(window) != 2 or strides != window:
        return None
    if isinstance(padding, str):
        if padding.upper() != "VALID":
            return None
    elif any(tuple(p) != (0, 0) for p in padding):
        return None
    n, h, w, c = x.shape
    wh, ww = window
    ho, wo = h // wh, w // ww
    if ho < 1 or wo < 1:
        return None
    x = x[:, : ho * wh, : wo * ww, :]
    if POOL_IMPL == "slices":  # elementwise max/add of the wh*ww strided views
        views = [x[:, i::wh, j::ww, :] for i in range(wh) for j in range(ww)]
        if reduce_fn is jnp.max:
            return functools.reduce(jnp.maximum, views)
        return functools.reduce(jnp.add, views) / (wh * ww)
    return reduce_fn(x.reshape(n, ho, wh, wo, ww, c), axis=(2, 4))


def max_pool(inputs, window_shape, strides=None, padding="VALID"):
    """`flax.linen.max_pool` with the reshape fast path for non-overlapping windows.

    Gradient ties: with several equal maxima in a window, the reshape path splits the gradient
    equally among them (JAX's rule for `max`); XLA's select-and-scatter gives it all to one.
    """
    out = _window_pool(jnp.max, inputs, window_shape, strides, padding)
    if out is None:
        from flax.linen import pooling

        return pooling.max_pool(inputs, window_shape, strides, padding)
    return out


def avg_pool(inputs, window_shape, strides=None, padding="VALID", count_include_pad=True):
    """`flax.linen.avg_pool` with the reshape fast path for non-overlapping windows."""
    out = _window_pool(jnp.mean, inputs, window_shape, strides, padding)
    if out is None:
        from flax.linen import pooling

        return pooling.avg_pool(inputs, window_shape, strides, padding, count_include_pad)
    return out
