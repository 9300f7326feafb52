"""Prototype: a faster CPU lowering of 2-D convolutions with few channels (LeNet-sized layers).

XLA:CPU runs every convolution through Eigen's spatial convolution, which is slow when a layer has
very few input or output channels (LeNet-5: 1 -> 6 and 6 -> 16 channels, 5x5 kernels): the forward
conv of the first layer and the input gradient of the second take most of a LeNet-5 train step.
`conv_general_dilated` below is a drop-in replacement for `jax.lax.conv_general_dilated` (same
signature, same results within float32 rounding) that picks, per computation, a lowering that XLA
turns into fast fused loops or matmuls:

  forward, 1 input channel:      sum over the kh*kw taps of shifted input x kernel row (one fused
                                 elementwise loop; no conv, no matmul)
  input gradient, C_in <= 16:    dpatches = dy @ K^T (one matmul), then col2im (the transpose of
                                 the im2col slicing: pads and adds, fused by XLA)
  everything else:               XLA's own convolution (fast once channels are >= ~16-32)

It is wired in through a `jax.custom_vjp`, so each of forward / input gradient / kernel gradient
gets its own lowering. Only NHWC/HWIO, no dilation and feature_group_count=1 take the custom path;
anything else falls back to `lax.conv_general_dilated` unchanged.

flax.linen.Conv accepts the function as its `conv_general_dilated` field, so the model-side change
is one line in `cnn_jax/layers.py` (see benchmarks/RESULTS.md, "Conv lowering").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Thresholds (measured on a 2-core AMD EPYC with AVX-512, jaxlib 0.10.2; see RESULTS.md).
TAPS_MAX_IN_CHANNELS = 1  # forward by taps only for C_in == 1 (elementwise multiply-add)
IM2COL_DX_MAX_IN_CHANNELS = 16  # input gradient by matmul + col2im for C_in <= this

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
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = tuple(lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, precision)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, k, strides, pads, precision):
    if x.shape[-1] <= TAPS_MAX_IN_CHANNELS:
        return _taps(x, k, strides, pads, precision)
    return _xla(x, k, strides, pads, precision)


def _conv_fwd(x, k, strides, pads, precision):
    return _conv(x, k, strides, pads, precision), (x, k)


def _conv_bwd(strides, pads, precision, residuals, g):
    x, k = residuals
    stride1 = strides == (1, 1)
    if stride1:
        dk = _canonical_dk(x, g, k.shape[:2], pads, precision)
    else:
        _, vjp_k = jax.vjp(lambda kk: _xla(x, kk, strides, pads, precision), k)
        (dk,) = vjp_k(g)
    if x.shape[-1] <= IM2COL_DX_MAX_IN_CHANNELS:
        dx = _im2col_dx(g, k, x.shape, strides, pads, precision)
    elif stride1:
        dx = _canonical_dx(g, k, x.shape, pads, precision)
    else:
        _, vjp_x = jax.vjp(lambda xx: _xla(xx, k, strides, pads, precision), x)
        (dx,) = vjp_x(g)
    return dx.astype(x.dtype), dk.astype(k.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def with_fast_conv(module_cls, **kwargs):
    """`functools.partial(module_cls, conv_general_dilated=conv_general_dilated, **kwargs)`."""
    return functools.partial(module_cls, conv_general_dilated=conv_general_dilated, **kwargs)


__all__: Sequence[str] = ["conv_general_dilated", "with_fast_conv"]
