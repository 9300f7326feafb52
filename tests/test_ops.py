"""cnn_jax.ops: the guides' worked numbers, references (numpy and lax), gradients, jit, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from cnn_jax import ops
from cnn_jax.errors import ShapeError

# The well-known 6x6 grayscale example of the guides (Coursera / deeplearning.ai edge detection).
GUIDE_6X6 = np.array(
    [
        [3, 0, 1, 2, 7, 4],
        [1, 5, 8, 9, 3, 1],
        [2, 7, 2, 5, 1, 3],
        [0, 1, 3, 1, 7, 8],
        [4, 2, 1, 6, 2, 8],
        [2, 4, 5, 2, 3, 9],
    ],
    np.float32,
)
VERTICAL_EDGE = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], np.float32)


def naive_conv2d(x, kernel, stride=(1, 1), pads=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    """Sliding dot product straight from the guides (numpy, float64). x NHWC, kernel HWIO."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _c = x.shape
    kh, kw, cin, cout = kernel.shape
    (sh, sw), (dh, dw) = stride, dilation
    oh = (h - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w - (dw * (kw - 1) + 1)) // sw + 1
    out_per_group = cout // groups
    y = np.zeros((n, oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * sh : i * sh + dh * kh : dh, j * sw : j * sw + dw * kw : dw, :]
            for o in range(cout):
                g = o // out_per_group
                y[:, i, j, o] = np.einsum(
                    "nhwc,hwc->n", patch[..., g * cin : (g + 1) * cin], kernel[..., o]
                )
    return y


def naive_pool(x, window, stride, reduce):
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
    y = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride : i * stride + window, j * stride : j * stride + window, :]
            y[:, i, j, :] = reduce(patch, axis=(1, 2))
    return y


def as_image(a):
    """[H, W] -> [1, H, W, 1]."""
    return jnp.asarray(a, jnp.float32)[None, :, :, None]


def as_kernel(a):
    """[KH, KW] -> [KH, KW, 1, 1]."""
    return jnp.asarray(a, jnp.float32)[:, :, None, None]


# ------------------------------------------------------------------ the guides' worked numbers


def test_guide_3x3_input_2x2_kernel():
    x = as_image(np.arange(9).reshape(3, 3))
    y = ops.conv2d(x, as_kernel([[0, 1], [2, 3]]))
    np.testing.assert_array_equal(y[0, :, :, 0], [[19, 25], [37, 43]])


def test_guide_6x6_vertical_edge():
    y = ops.conv2d(as_image(GUIDE_6X6), as_kernel(VERTICAL_EDGE))[0, :, :, 0]
    assert y.shape == (4, 4)  # 6 - 3 + 1
    np.testing.assert_array_equal(y[0], [-5, -4, 0, 8])
    np.testing.assert_array_equal(
        y, [[-5, -4, 0, 8], [-10, -2, 2, 3], [0, -2, -4, -7], [-3, -2, -3, -16]]
    )


def test_guide_6x6_sobel_matches_sliding_dot_product():
    # The guides' "3 and 27" Sobel numbers come from a matrix we could not locate; this checks the
    # same computation (Sobel on the 6x6 example) against the hand-written sliding dot product.
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    y = ops.conv2d(as_image(GUIDE_6X6), as_kernel(sobel))
    np.testing.assert_array_equal(y, naive_conv2d(as_image(GUIDE_6X6), as_kernel(sobel)))
    np.testing.assert_array_equal(y[0, 0, :, 0], [-12, -8, 5, 16])


@pytest.mark.parametrize("filters, expected", [(1, 28), (2, 56)])
def test_guide_conv_layer_parameter_count(filters, expected):
    # One 3x3x3 filter = 27 weights + 1 bias.
    conv = nn.Conv(features=filters, kernel_size=(3, 3))
    params = jax.eval_shape(conv.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert params["kernel"].shape == (3, 3, 3, filters)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == expected
    # The same count from the shapes conv2d accepts.
    kernel, bias = jnp.zeros((3, 3, 3, filters)), jnp.zeros((filters,))
    assert ops.conv2d(jnp.zeros((1, 8, 8, 3)), kernel, bias).shape == (1, 6, 6, filters)
    assert kernel.size + bias.size == expected


def test_guide_4x4_max_pool():
    x = as_image([[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]])
    y = ops.max_pool(x, 2, 2)
    assert y.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[6, 8], [3, 4]])
    np.testing.assert_array_equal(ops.avg_pool(x, 2)[0, :, :, 0], [[3.25, 5.25], [2, 2]])
    np.testing.assert_array_equal(ops.sum_pool(x, 2)[0, :, :, 0], [[13, 21], [8, 8]])


@pytest.mark.parametrize(
    "n, k, s, p, d, expected",
    [
        (6, 3, 1, 0, 1, 4),  # the guides' 6x6 * 3x3 -> 4x4
        (5, 3, 1, 1, 1, 5),  # "same" padding p = (k - 1) / 2
        (7, 3, 2, 0, 1, 3),
        (224, 11, 4, 2, 1, 55),  # AlexNet conv1
        (224, 7, 2, 3, 1, 112),  # ResNet stem
        (7, 3, 1, 0, 2, 3),  # dilated: k_eff = 5
        (8, 3, 2, (0, 1), 1, 4),  # asymmetric (lo, hi)
        (7, 3, 2, "SAME", 1, 4),  # ceil(7 / 2)
        (7, 5, 1, "same", 3, 7),
        (7, 3, 2, "VALID", 1, 3),
    ],
)
def test_conv_output_size_formula(n, k, s, p, d, expected):
    assert ops.conv_output_size(n, k, s, p, d) == expected


def test_conv_output_shape_2d():
    assert ops.conv_output_shape((28, 32), 5) == (24, 28)
    assert ops.conv_output_shape((28, 32), (3, 5), stride=(1, 2), padding=(1, 2)) == (28, 16)
    assert ops.conv_output_shape((9, 9), 3, 2, "SAME", dilation=2) == (5, 5)
    assert ops.conv_output_shape((9, 9), 2, 1, ((1, 0), (0, 0))) == (9, 8)


# ------------------------------------------------------------------ conv2d vs references

# (padding given to conv2d, explicit pads for the reference with a 3x3 kernel, dilation 1)
PADDINGS = [
    ("VALID", ((0, 0), (0, 0))),
    ("valid", ((0, 0), (0, 0))),
    (2, ((2, 2), (2, 2))),
    ((1, 0), ((1, 1), (0, 0))),
    (((0, 2), (1, 0)), ((0, 2), (1, 0))),
]


@pytest.mark.parametrize("padding, pads", PADDINGS)
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), ((1, 2), (2, 1)), (1, 2)])
def test_conv2d_matches_naive_and_lax(padding, pads, stride, dilation):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 8, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)
    pair = lambda v: (v, v) if isinstance(v, int) else v
    y = ops.conv2d(x, kernel, bias, stride=stride, padding=padding, dilation=dilation)
    ref = naive_conv2d(x, kernel, pair(stride), pads, pair(dilation)) + bias
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    lax_y = lax.conv_general_dilated(
        x,
        kernel,
        pair(stride),
        pads,
        rhs_dilation=pair(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(y, lax_y + bias, rtol=1e-6, atol=1e-6)
    assert y.shape[1:3] == ops.conv_output_shape((7, 8), 3, stride, padding, dilation)


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (3, 2), ((2, 1), (1, 3))])
def test_conv2d_same_matches_lax_same(stride, dilation):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 7, 6, 2)).astype(np.float32)
    kernel = rng.normal(size=(2, 3, 2, 3)).astype(np.float32)  # even KH: asymmetric SAME pads
    pair = lambda v: (v, v) if isinstance(v, int) else v
    y = ops.conv2d(x, kernel, stride=stride, padding="SAME", dilation=dilation)
    ref = lax.conv_general_dilated(
        x,
        kernel,
        pair(stride),
        "SAME",
        rhs_dilation=pair(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    s = pair(stride)
    assert y.shape[1:3] == (-(-7 // s[0]), -(-6 // s[1]))


def test_conv2d_groups_depthwise():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 2, 6)).astype(np.float32)  # 2 groups of 2 in -> 3 out
    y = ops.conv2d(x, kernel, padding=1, groups=2)
    np.testing.assert_allclose(
        y, naive_conv2d(x, kernel, pads=((1, 1), (1, 1)), groups=2), rtol=1e-5, atol=1e-5
    )


def test_conv2d_promotes_dtypes():
    x = jnp.ones((1, 3, 3, 1), jnp.uint8)
    y = ops.conv2d(x, jnp.ones((2, 2, 1, 1), jnp.float32))
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, 4.0)


# ------------------------------------------------------------------ pooling


@pytest.mark.parametrize("window, stride", [(2, None), (3, 1), (2, 3), (3, 2)])
def test_pooling_matches_naive(window, stride):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
    s = window if stride is None else stride
    np.testing.assert_allclose(ops.max_pool(x, window, stride), naive_pool(x, window, s, np.max))
    np.testing.assert_allclose(
        ops.avg_pool(x, window, stride), naive_pool(x, window, s, np.mean), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        ops.sum_pool(x, window, stride), naive_pool(x, window, s, np.sum), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("pool", [ops.max_pool, ops.avg_pool, ops.sum_pool])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_pooling_keeps_channels(pool, channels):
    x = jnp.ones((2, 6, 6, channels))
    assert pool(x, 2).shape == (2, 3, 3, channels)
    assert pool(x, 3, 1, "SAME").shape == (2, 6, 6, channels)


def test_pooling_padding_semantics():
    x = as_image([[1.0, 2.0], [3.0, 4.0]])
    # Padded cells never win the max, even for all-negative inputs.
    np.testing.assert_array_equal(
        ops.max_pool(-x, 2, 1, 1)[0, :, :, 0], [[-1, -1, -2], [-1, -1, -2], [-3, -3, -4]]
    )
    # count_include_pad=True (default, flax/PyTorch): divide by the full window size.
    incl = ops.avg_pool(x, 2, 1, padding=((1, 0), (1, 0)))
    np.testing.assert_allclose(incl[0, :, :, 0], [[0.25, 0.75], [1.0, 2.5]])
    np.testing.assert_allclose(incl, nn.avg_pool(x, (2, 2), (1, 1), ((1, 0), (1, 0))))
    # count_include_pad=False: divide by the real cells only.
    excl = ops.avg_pool(x, 2, 1, padding=((1, 0), (1, 0)), count_include_pad=False)
    np.testing.assert_allclose(excl[0, :, :, 0], [[1.0, 1.5], [2.0, 2.5]])
    np.testing.assert_allclose(
        ops.avg_pool(x, 3, 1, "SAME", count_include_pad=False)[0, :, :, 0], 2.5
    )


def test_max_pool_integer_input():
    x = jnp.array([[[-5, -7], [-6, -8]]], jnp.int32)[..., None]
    y = ops.max_pool(x, 2, 1, padding=1)
    assert y.dtype == jnp.int32
    assert int(y.min()) == -8 and int(y.max()) == -5


# ------------------------------------------------------------------ flatten and activations


def test_flatten_keeps_batch_axis():
    assert ops.flatten(jnp.zeros((2, 3, 4, 5))).shape == (2, 60)
    assert ops.flatten(jnp.zeros((0, 3, 4))).shape == (0, 12)
    assert ops.flatten(jnp.zeros((4,))).shape == (4, 1)
    x = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(ops.flatten(x)[1], np.arange(12, 24))


def test_activations():
    x = jnp.array([-2.0, -0.5, 0.0, 3.0])
    np.testing.assert_array_equal(ops.relu(x), [0, 0, 0, 3])
    np.testing.assert_allclose(ops.leaky_relu(x), [-0.02, -0.005, 0, 3])
    np.testing.assert_allclose(ops.leaky_relu(x, negative_slope=0.2), [-0.4, -0.1, 0, 3])
    np.testing.assert_allclose(ops.sigmoid(x), 1 / (1 + np.exp(-np.asarray(x))), rtol=1e-6)
    np.testing.assert_allclose(ops.tanh(x), np.tanh(np.asarray(x)), rtol=1e-6)


def test_softmax_is_stable_and_normalised():
    x = jnp.array([[1000.0, 1001.0, 1002.0], [-1000.0, 0.0, 1000.0]])
    y = ops.softmax(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0], ops.softmax(jnp.array([0.0, 1.0, 2.0])), rtol=1e-6)
    np.testing.assert_allclose(ops.softmax(x, axis=0).sum(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y, jax.nn.softmax(x), rtol=1e-6)
    g = jax.grad(lambda v: ops.softmax(v)[0])(jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(
        g,
        jax.grad(lambda v: jax.nn.softmax(v)[0])(jnp.array([1.0, 2.0, 3.0])),
        rtol=1e-5,
        atol=1e-7,
    )


# ------------------------------------------------------------------ gradients and jit


def test_conv2d_gradients():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(1, 5, 5, 2)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2,)), jnp.float32)
    f = lambda x, k, b: ops.conv2d(x, k, b, stride=2, padding="SAME", dilation=1)
    check_grads(f, (x, k, b), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)
    gx, gk, gb = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(x, k, b)
    assert gx.shape == x.shape and gk.shape == k.shape
    np.testing.assert_allclose(gb, 9.0)  # 3x3 outputs per channel, each adds the bias once


@pytest.mark.parametrize("pool", [ops.max_pool, ops.avg_pool, ops.sum_pool])
def test_pooling_gradients(pool):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 4, 4, 2)), jnp.float32)
    check_grads(
        lambda v: pool(v, 2, 1, padding=1), (x,), order=1, modes=["rev"], atol=5e-2, rtol=5e-2
    )


def test_max_pool_gradient_routes_to_argmax():
    x = as_image([[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]])
    g = jax.grad(lambda v: ops.max_pool(v, 2).sum())(x)[0, :, :, 0]
    np.testing.assert_array_equal(g, [[0, 0, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 1]])


def test_everything_jits():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)

    def net(x, k):
        h = ops.relu(ops.conv2d(x, k, jnp.zeros(4), padding="SAME", stride=1))
        h = ops.max_pool(h, 2)
        h = ops.leaky_relu(ops.avg_pool(h, 1) + ops.sum_pool(h, 1))
        return ops.softmax(ops.sigmoid(ops.tanh(ops.flatten(h))))

    np.testing.assert_allclose(jax.jit(net)(x, k), net(x, k), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bad arguments

X = jnp.zeros((1, 5, 5, 3))
K = jnp.zeros((3, 3, 3, 2))

BAD_CONV = [
    # (kwargs for conv2d, substrings the message must contain)
    ({"stride": 0}, ["stride", "0"]),
    ({"stride": (1, -1)}, ["stride", "(1, -1)"]),
    ({"stride": 1.5}, ["stride", "1.5"]),
    ({"stride": True}, ["stride"]),
    ({"dilation": 0}, ["dilation", "0"]),
    ({"dilation": (1, 2, 3)}, ["dilation"]),
    ({"dilation": 3}, ["kernel", "dilation", "effective size 7", "padded input"]),
    ({"padding": "FULL"}, ["padding", "'FULL'", "VALID", "SAME"]),
    ({"padding": -1}, ["padding", "non-negative", "-1"]),
    ({"padding": ((0, -1), (0, 0))}, ["padding", "non-negative"]),
    ({"padding": (1, 2, 3)}, ["padding", "(1, 2, 3)"]),
    ({"padding": None}, ["padding", "None"]),
    ({"x": jnp.zeros((1, 2, 2, 3))}, ["kernel", "larger than the padded input", "input 2"]),
    ({"x": jnp.zeros((1, 5, 5, 4))}, ["channel", "C=4", "I=3", "(3, 3, 3, 2)"]),
    ({"x": jnp.zeros((5, 5, 3))}, ["x", "4-D", "(5, 5, 3)"]),
    ({"x": jnp.zeros((1, 0, 5, 3))}, ["x", "H >= 1", "(1, 0, 5, 3)"]),
    ({"kernel": jnp.zeros((3, 3, 3))}, ["kernel", "4-D", "(3, 3, 3)"]),
    ({"bias": jnp.zeros((3,))}, ["bias", "(2,)", "(3,)"]),
    ({"bias": jnp.zeros((1, 2))}, ["bias", "(1, 2)"]),
    ({"groups": 0}, ["groups", "0"]),
    ({"groups": 3}, ["channel", "groups=3"]),
    ({"kernel": jnp.zeros((3, 3, 1, 2)), "groups": 3}, ["O=2", "groups=3"]),
]


@pytest.mark.parametrize("kwargs, fragments", BAD_CONV)
def test_conv2d_bad_arguments(kwargs, fragments):
    args = {"x": X, "kernel": K, **kwargs}
    with pytest.raises(ShapeError) as info:
        ops.conv2d(**args)
    msg = str(info.value)
    assert msg.startswith("conv2d:")
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert isinstance(info.value, ValueError)


def test_conv2d_bad_arguments_raise_inside_jit_before_compiling():
    with pytest.raises(ShapeError, match="stride"):
        jax.jit(lambda x: ops.conv2d(x, K, stride=0))(X)
    with pytest.raises(ShapeError, match="channel"):
        jax.jit(ops.conv2d)(jnp.zeros((1, 5, 5, 1)), K)


BAD_POOL = [
    ({"window": 0}, ["window", "0"]),
    ({"window": 6}, ["window 6x6", "larger than the padded input"]),
    ({"stride": 0}, ["stride", "0"]),
    ({"padding": "full"}, ["padding", "'full'"]),
    ({"padding": -2}, ["padding", "non-negative"]),
    ({"window": 2, "padding": 2}, ["padding", "smaller than the window"]),
    ({"x": jnp.zeros((5, 5))}, ["x", "4-D", "(5, 5)"]),
]


@pytest.mark.parametrize("pool", [ops.max_pool, ops.avg_pool, ops.sum_pool])
@pytest.mark.parametrize("kwargs, fragments", BAD_POOL)
def test_pooling_bad_arguments(pool, kwargs, fragments):
    args = {"x": jnp.zeros((1, 5, 5, 2)), "window": 2, **kwargs}
    with pytest.raises(ShapeError) as info:
        pool(**args)
    msg = str(info.value)
    assert msg.startswith(pool.__name__ + ":")
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize(
    "args, fragments",
    [
        ((0, 3), ["size", "0"]),
        ((5, 0), ["kernel_size", "0"]),
        ((5, 3, 0), ["stride", "0"]),
        ((5, 3, 1, 0, 0), ["dilation", "0"]),
        ((5, 3, 1, -1), ["padding", "non-negative"]),
        ((5, 3, 1, "full"), ["padding", "'full'"]),
        ((5, 3, 1, (1, 2, 3)), ["padding", "(1, 2, 3)"]),
        ((2, 3), ["kernel_size 3", "padded input", "empty"]),
        ((5, 3, 1, 0, 3), ["dilation 3", "effective 7"]),
        ((5.0, 3), ["size", "5.0"]),
    ],
)
def test_conv_output_size_bad_arguments(args, fragments):
    with pytest.raises(ShapeError) as info:
        ops.conv_output_size(*args)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_flatten_rejects_scalar():
    with pytest.raises(ShapeError, match="batch axis"):
        ops.flatten(jnp.float32(1.0))
