"""Property tests (hypothesis) for conv2d, pooling and conv_output_size.

Over random shapes, strides, paddings and dilations -- valid or not:
  * a valid call's output shape equals the formula (`conv_output_size` per axis);
  * an invalid call raises ShapeError (a ValueError) before XLA sees it, never an XLA error,
    and conv_output_size rejects exactly the spatial combinations conv2d rejects.
Most properties run under `jax.eval_shape` (traces, compiles nothing: fast); a smaller set of
small valid cases really executes, to check that what passes validation also compiles and runs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cnn_jax import ops
from cnn_jax.errors import ShapeError

FAST = settings(max_examples=150, deadline=None)
EXECUTE = settings(max_examples=40, deadline=None)

# Mostly valid values, with some invalid ones mixed in (0, negatives, unknown strings) so that
# both sides of each property get exercised.
maybe_int = st.sampled_from([1] * 8 + [2] * 5 + [3] * 3 + [0, -1])
maybe_pad = st.sampled_from([0] * 6 + [1] * 5 + [2] * 3 + [3, -1])
step = st.one_of(maybe_int, st.tuples(maybe_int, maybe_int))
dilation_step = st.one_of(
    st.sampled_from([1] * 6 + [2, 2, 3, 0]),
    st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 0])),
)
padding = st.one_of(
    st.sampled_from(["VALID", "SAME", "valid", "same", "VALID", "SAME", "FULL"]),
    maybe_pad,
    st.tuples(maybe_pad, maybe_pad),
    st.tuples(st.tuples(maybe_pad, maybe_pad), st.tuples(maybe_pad, maybe_pad)),
)


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def expected_hw(in_hw, window_hw, stride, pad, dilation=1, *, pool=False):
    """Independent oracle: (H_out, W_out), or None if the call is invalid."""
    s, d = _pair(stride), _pair(dilation)
    if min(*s, *d) < 1:
        return None
    if isinstance(pad, str):
        if pad.upper() not in ("VALID", "SAME"):
            return None
        if pad.upper() == "SAME":
            return tuple(math.ceil(n / si) for n, si in zip(in_hw, s))
        pads = ((0, 0), (0, 0))
    elif isinstance(pad, int):
        pads = ((pad, pad), (pad, pad))
    elif isinstance(pad[0], int):
        pads = ((pad[0], pad[0]), (pad[1], pad[1]))
    else:
        pads = pad
    out = []
    for n, k, si, di, (lo, hi) in zip(in_hw, window_hw, s, d, pads):
        k_eff = di * (k - 1) + 1
        if lo < 0 or hi < 0 or k_eff > n + lo + hi or (pool and max(lo, hi) >= k):
            return None
        out.append((n + lo + hi - k_eff) // si + 1)
    return tuple(out)


def axis_padding(pad, axis):
    """conv2d's padding -> what conv_output_size takes for one axis: a string or int as is;
    from (ph, pw) the int for that axis, from ((t, b), (l, r)) that axis' (lo, hi) pair."""
    return pad if isinstance(pad, (str, int)) else pad[axis]


@FAST
@given(
    n=st.integers(1, 3),
    h=st.integers(1, 10),
    w=st.integers(1, 10),
    c=st.integers(1, 3),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    extra_in=st.sampled_from([0, 0, 0, 0, 1]),  # sometimes a channel mismatch
    o=st.integers(1, 3),
    stride=step,
    dilation=dilation_step,
    pad=padding,
)
def test_conv2d_shape_or_shape_error(n, h, w, c, kh, kw, extra_in, o, stride, dilation, pad):
    k_in = c + extra_in
    x = jax.ShapeDtypeStruct((n, h, w, c), jnp.float32)
    kernel = jax.ShapeDtypeStruct((kh, kw, k_in, o), jnp.float32)
    call = lambda x, k: ops.conv2d(x, k, stride=stride, padding=pad, dilation=dilation)
    hw = expected_hw((h, w), (kh, kw), stride, pad, dilation)
    event("valid" if hw is not None and k_in == c else "invalid")
    if hw is None or k_in != c:
        try:
            jax.eval_shape(call, x, kernel)
        except ShapeError as e:
            assert isinstance(e, ValueError) and str(e).startswith("conv2d:")
        else:
            raise AssertionError("invalid call was accepted")
        return
    assert jax.eval_shape(call, x, kernel).shape == (n, *hw, o)
    # The formula, one axis at a time, and the 2-D helper agree with the op.
    s, d = _pair(stride), _pair(dilation)
    for axis, (size, k) in enumerate(((h, kh), (w, kw))):
        assert ops.conv_output_size(size, k, s[axis], axis_padding(pad, axis), d[axis]) == hw[axis]
    assert ops.conv_output_shape((h, w), (kh, kw), stride, pad, dilation) == hw


@FAST
@given(
    size=st.integers(1, 12),
    k=st.integers(1, 6),
    stride=maybe_int,
    dilation=maybe_int,
    pad=st.one_of(
        st.sampled_from(["VALID", "SAME", "Same", "full"]),
        maybe_pad,
        st.tuples(maybe_pad, maybe_pad),
    ),
)
def test_conv_output_size_formula_or_error(size, k, stride, dilation, pad):
    # conv_output_size's own (lo, hi) pair == conv2d's explicit padding on one axis.
    pad2d = (pad, (0, 0)) if isinstance(pad, tuple) else pad
    expected = expected_hw((size, 1), (k, 1), (stride, 1), pad2d, (dilation, 1))
    event("valid" if expected is not None else "invalid")
    if expected is None:
        try:
            ops.conv_output_size(size, k, stride, pad, dilation)
        except ShapeError:
            return
        raise AssertionError("invalid arguments were accepted")
    assert ops.conv_output_size(size, k, stride, pad, dilation) == expected[0]


@FAST
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c=st.integers(1, 4),
    window=st.one_of(maybe_int, st.tuples(st.integers(1, 4) | maybe_int, st.integers(1, 4))),
    stride=st.one_of(st.none(), step),
    pad=padding,
    pool=st.sampled_from([ops.max_pool, ops.avg_pool, ops.sum_pool]),
)
def test_pooling_shape_or_shape_error(n, h, w, c, window, stride, pad, pool):
    x = jax.ShapeDtypeStruct((n, h, w, c), jnp.float32)
    win = _pair(window)
    hw = None
    if min(win) >= 1:
        hw = expected_hw((h, w), win, win if stride is None else stride, pad, pool=True)
    call = lambda x: pool(x, window, stride, pad)
    event("valid" if hw is not None else "invalid")
    if hw is None:
        try:
            jax.eval_shape(call, x)
        except ShapeError as e:
            assert str(e).startswith(pool.__name__ + ":")
        else:
            raise AssertionError("invalid call was accepted")
        return
    # Never changes the channel count; spatial size is the conv formula with the window as kernel.
    assert jax.eval_shape(call, x).shape == (n, *hw, c)
    s = win if stride is None else _pair(stride)
    for axis, size in enumerate((h, w)):
        assert ops.conv_output_size(size, win[axis], s[axis], axis_padding(pad, axis)) == hw[axis]


# ---------------------------------------------------------------- real execution (valid only)

small = st.integers(0, 2)
valid_padding = st.one_of(
    st.sampled_from(["VALID", "SAME"]),
    small,
    st.tuples(small, small),
    st.tuples(st.tuples(small, small), st.tuples(small, small)),
)


@EXECUTE
@given(
    h=st.integers(3, 7),
    w=st.integers(3, 7),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))),
    dilation=st.integers(1, 2),
    pad=valid_padding,
    window=st.tuples(st.integers(1, 3), st.integers(2, 3)),
    seed=st.integers(0, 2**16),
)
def test_conv2d_and_pooling_execute(h, w, kh, kw, stride, dilation, pad, window, seed):
    hw = expected_hw((h, w), (kh, kw), stride, pad, dilation)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(1, h, w, 2)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kh, kw, 2, 3)), jnp.float32)
    event("valid" if hw is not None else "invalid")
    if hw is None:  # e.g. dilated kernel larger than the input: rejected, not run
        try:
            ops.conv2d(x, kernel, stride=stride, padding=pad, dilation=dilation)
        except ShapeError:
            return
        raise AssertionError("invalid call was accepted")
    y = ops.conv2d(x, kernel, stride=stride, padding=pad, dilation=dilation)
    assert y.shape == (1, *hw, 3)
    assert bool(jnp.all(jnp.isfinite(y)))

    pool_hw = expected_hw((h, w), window, stride, pad, pool=True)
    event("pooling valid" if pool_hw is not None else "pooling invalid")
    if pool_hw is not None:
        for pool in (ops.max_pool, ops.avg_pool, ops.sum_pool):
            p = pool(x, window, stride, pad)
            assert p.shape == (1, *pool_hw, 2)
            assert bool(jnp.all(jnp.isfinite(p)))  # no window lies wholly in the padding
