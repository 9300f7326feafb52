"""Tests for cnn_jax.layers: shape arithmetic, Conv/Pool checks, adaptive pooling, ConvBlock, DenseHead,
and the swappable-block helpers (activation_fn, norm_class, make_norm, has_field)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_jax.errors import ConfigError, ShapeError
from cnn_jax.layers import (
    NORMS,
    AdaptiveAvgPool,
    BatchNorm,
    Conv,
    ConvBlock,
    DenseHead,
    Pool,
    activation_fn,
    adaptive_avg_pool,
    ceil_mode_padding,
    has_field,
    make_norm,
    norm_class,
    window_output_sizes,
)
from cnn_jax.models.summary import count_params, summary_rows

KEY = jax.random.key(0)


def abstract_init(module, shape, **kwargs):
    return jax.eval_shape(lambda: module.init(KEY, jnp.zeros(shape), **kwargs))


# ----------------------------------------------------------------------------- activations / sizes


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_activation_by_name(name):
    x = jnp.array([-2.0, 0.0, 3.0])
    reference = {
        "relu": [0.0, 0.0, 3.0],
        "leaky_relu": [-0.02, 0.0, 3.0],
        "sigmoid": 1 / (1 + np.exp(-np.array([-2.0, 0.0, 3.0]))),
        "tanh": np.tanh([-2.0, 0.0, 3.0]),
    }[name]
    np.testing.assert_allclose(activation_fn(name)(x), reference, rtol=1e-6)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ConfigError, match="act='swishy'.*'relu'"):
        activation_fn("swishy")
    with pytest.raises(ConfigError, match="act=3"):
        activation_fn(3)


def test_activation_fn_passes_callables_through():
    assert activation_fn(nn.gelu) is nn.gelu
    swish = functools.partial(nn.swish)
    assert activation_fn(swish) is swish


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize(
    "name, cls", [("batch", nn.BatchNorm), ("group", nn.GroupNorm), ("layer", nn.LayerNorm)]
)
def test_norm_names(name, cls):
    resolved = norm_class(name)
    assert resolved is NORMS[name]
    assert (resolved.func if isinstance(resolved, functools.partial) else resolved) is cls
    assert norm_class(None) is None
    assert norm_class(nn.GroupNorm) is nn.GroupNorm


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ConfigError, match="norm='instance'.*'batch', 'group', 'layer'"):
        norm_class("instance")
    with pytest.raises(ConfigError, match="norm=3"):
        norm_class(3)


def test_has_field_unwraps_partials():
    assert has_field(nn.BatchNorm, "use_running_average")
    assert has_field(functools.partial(functools.partial(BatchNorm, epsilon=1e-3)), "momentum")
    assert not has_field(nn.GroupNorm, "use_running_average")
    assert has_field(nn.GroupNorm, "scale_init") and has_field(nn.LayerNorm, "scale_init")
    assert not has_field(lambda **kw: None, "dtype")


@pytest.mark.parametrize("train", [False, True])
def test_make_norm_binds_only_the_fields_a_norm_has(train):
    batch = make_norm("batch", train, dtype=jnp.bfloat16)
    assert batch.keywords["use_running_average"] is (not train)
    assert batch.keywords["dtype"] == jnp.bfloat16
    assert batch.keywords["epsilon"] == 1e-5 and batch.keywords["momentum"] == 0.9  # PyTorch's
    for norm in (nn.GroupNorm, functools.partial(nn.GroupNorm, num_groups=2), nn.LayerNorm):
        bound = make_norm(norm, train, param_dtype=jnp.bfloat16)
        assert "use_running_average" not in bound.keywords
        assert bound.keywords["param_dtype"] == jnp.bfloat16
        x = jnp.arange(2 * 2 * 2 * 32, dtype=jnp.float32).reshape(2, 2, 2, 32)  # 32 groups
        y, variables = bound(name="norm").init_with_output(KEY, x)
        assert y.shape == x.shape and set(variables) == {"params"}
        assert variables["params"]["scale"].dtype == jnp.bfloat16
    assert make_norm(None, train) is None


@pytest.mark.parametrize(
    "size, kernel, stride, padding, dilation",
    [
        (28, 5, 1, "SAME", 1),
        (28, 5, 1, "VALID", 1),
        (32, 5, 1, "VALID", 1),
        (224, 11, 4, 2, 1),
        (224, 7, 2, 3, 1),
        (7, 3, 2, "SAME", 1),
        (8, 3, 2, "SAME", 1),
        (9, 3, 1, "VALID", 2),
        (10, 4, 3, [(1, 2)], 1),
        (5, 1, 2, "VALID", 1),
    ],
)
def test_window_output_sizes_match_flax_conv(size, kernel, stride, padding, dilation):
    conv = nn.Conv(2, (kernel,), strides=stride, padding=padding, kernel_dilation=dilation)
    out = jax.eval_shape(lambda: conv.init_with_output(KEY, jnp.zeros((1, size, 1)))[0])
    assert (
        window_output_sizes((size,), (kernel,), (stride,), padding, (dilation,)) == out.shape[1:2]
    )


@pytest.mark.parametrize(
    "size, window, stride, pad, expected_out",
    # PyTorch MaxPool2d(ceil_mode=True) output sizes, e.g. GoogLeNet's 112 -> 56 -> 28 -> 14 -> 7.
    [
        (112, 3, 2, 0, 56),
        (56, 3, 2, 0, 28),
        (14, 2, 2, 0, 7),
        (110, 3, 2, 0, 55),
        (26, 3, 2, 0, 13),
        (7, 3, 1, 1, 7),
        (2, 3, 2, 0, 1),
        (5, 2, 2, 1, 3),
        (4, 2, 2, 1, 3),
    ],
)
def test_ceil_mode_padding_gives_pytorch_sizes(size, window, stride, pad, expected_out):
    lo, hi = ceil_mode_padding(size, window, stride, pad)
    assert lo == pad
    assert (size + lo + hi - window) // stride + 1 == expected_out


# ----------------------------------------------------------------------------- Conv / Pool


def test_conv_parameter_counts_from_the_guides():
    # One 3x3x3 filter: 27 weights + 1 bias; two filters: 56.
    for filters, expected in [(1, 28), (2, 56)]:
        variables = abstract_init(Conv(filters, (3, 3)), (1, 5, 5, 3))
        assert count_params(variables["params"]) == expected


def test_conv_too_small_input_names_the_layer():
    block = ConvBlock(4, kernel_size=5, padding="VALID", name="features")
    with pytest.raises(ShapeError, match=r"layer 'conv1'.*empty 0x0 output from its 4x4 input"):
        abstract_init(block, (1, 4, 4, 1))


def test_conv_uses_he_fan_out_init():
    kernel = Conv(256, (3, 3)).init(KEY, jnp.zeros((1, 8, 8, 64)))["params"]["kernel"]
    expected_std = np.sqrt(2.0 / (3 * 3 * 256))
    assert abs(float(jnp.std(kernel)) / expected_std - 1) < 0.05  # truncated normal: close to 1


def test_max_pool_2x2_of_4x4_slice():
    x = jnp.array([[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]], jnp.float32)
    out = Pool("max", 2).apply({}, x[None, :, :, None])
    np.testing.assert_array_equal(out[0, :, :, 0], [[6, 8], [3, 4]])


def test_pool_keeps_channels_and_averages():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    out = Pool("avg", 2).apply({}, x)
    assert out.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(out[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)))


def test_ceil_mode_max_pool_keeps_the_partial_window():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1) - 100.0  # all negative: -inf padding
    out = Pool("max", 3, 2, ceil_mode=True).apply({}, x)
    # PyTorch: windows start at 0 and 2; the second covers rows/cols 2..3 only.
    np.testing.assert_array_equal(out[0, :, :, 0], [[10, 11], [14, 15]] - np.float32(100))


def test_sum_pool_adds_windows_and_padded_zeros():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    out = Pool("sum", 2).apply({}, x)
    np.testing.assert_array_equal(out[0, :, :, 0], [[10, 18], [42, 50]])
    np.testing.assert_allclose(out, 4 * Pool("avg", 2).apply({}, x))
    padded = Pool("sum", 3, 2, padding=1).apply({}, x)
    np.testing.assert_array_equal(padded[0, 0, 0, 0], 0 + 1 + 4 + 5)


def test_pool_subclass_overrides_reduce_windows():
    class MinPool(Pool):
        def reduce_windows(self, x, windows, strides, padding):
            return -nn.max_pool(-x, windows, strides, padding)

    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(MinPool("max", 2).apply({}, x)[0, :, :, 0], [[0, 2], [8, 10]])


def test_conv_is_xla_conv_with_forward_mode_autodiff():
    """The default Conv is lax.conv_general_dilated: jvp (and so jacfwd/hessian) works through it."""
    conv = Conv(4, (3, 3), strides=2, padding=((1, 0), (0, 1)), use_bias=False)
    x = jax.random.normal(KEY, (2, 7, 7, 1))
    variables = conv.init(KEY, x)
    kernel = variables["params"]["kernel"]
    ref = lambda x: lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 0), (0, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    dx = jax.random.normal(jax.random.key(1), x.shape)
    y, tangent = jax.jvp(lambda x: conv.apply(variables, x), (x,), (dx,))
    y_ref, tangent_ref = jax.jvp(ref, (x,), (dx,))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(tangent, tangent_ref, rtol=1e-6, atol=1e-6)
    assert Conv.conv_general_dilated is None  # Flax's default: lax.conv_general_dilated


def test_pool_errors():
    with pytest.raises(ConfigError, match="pooling='median'"):
        Pool("median").apply({}, jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ShapeError, match=r"layer 'layers_0'.*max pool window 3x3.*2x2 input"):
        nn.Sequential([Pool("max", 3)]).apply({}, jnp.zeros((1, 2, 2, 1)))


# ----------------------------------------------------------------------------- adaptive pooling


def test_adaptive_avg_pool_identity_and_divisible_case():
    x = jax.random.normal(KEY, (2, 14, 14, 3))
    assert adaptive_avg_pool(x, 14) is x
    np.testing.assert_allclose(adaptive_avg_pool(x, 7), nn.avg_pool(x, (2, 2), (2, 2)), atol=1e-6)
    np.testing.assert_allclose(adaptive_avg_pool(x, 1)[:, 0, 0], x.mean(axis=(1, 2)), atol=1e-6)


def test_adaptive_avg_pool_uses_pytorch_bins():
    # 5 -> 3: bins [0, 2), [1, 4), [3, 5) along each axis.
    x = jnp.arange(5, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, 5, 5, 1))
    out = adaptive_avg_pool(x, 3)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.5, 2.0, 3.5])
    # 2 -> 6 (upsampling): each input row is repeated three times.
    x = jnp.array([1.0, 3.0])[None, :, None, None] * jnp.ones((1, 2, 2, 1))
    np.testing.assert_allclose(adaptive_avg_pool(x, (6, 2))[0, :, 0, 0], [1, 1, 1, 3, 3, 3])


def test_adaptive_avg_pool_module_and_gradient():
    x = jax.random.normal(KEY, (1, 9, 11, 2))
    assert AdaptiveAvgPool((6, 6)).apply({}, x).shape == (1, 6, 6, 2)
    grad = jax.grad(lambda x: adaptive_avg_pool(x, 6).sum())(x)
    assert grad.shape == x.shape and bool(jnp.all(grad > 0))


# ----------------------------------------------------------------------------- ConvBlock


def test_conv_block_shapes_names_and_counts():
    block = ConvBlock(8, num_convs=2, kernel_size=3, norm="batch", pooling="max")
    variables = abstract_init(block, (2, 16, 16, 3))
    assert set(variables["params"]) == {"conv1", "norm1", "conv2", "norm2"}
    assert count_params(variables["params"]) == (27 * 8 + 8) + 16 + (72 * 8 + 8) + 16
    out = jax.eval_shape(block.apply, variables, jnp.zeros((2, 16, 16, 3)))
    assert out.shape == (2, 8, 8, 8)


def test_conv_block_strides_first_conv_only_and_avg_pools():
    block = ConvBlock(4, num_convs=2, strides=2, pooling="avg", pool_window=3, pool_strides=1)
    rows, _ = summary_rows(block, (16, 16, 1))
    shapes = {row.path: row.output_shape for row in rows}
    assert shapes == {"conv1": (1, 8, 8, 4), "conv2": (1, 8, 8, 4), "pool": (1, 6, 6, 4)}


def test_conv_block_batchnorm_updates_stats_only_in_train():
    block = ConvBlock(4, norm=BatchNorm)
    x = jax.random.normal(KEY, (4, 6, 6, 2)) * 3 + 1
    variables = block.init(KEY, x)
    _, updates = block.apply(variables, x, train=True, mutable=["batch_stats"])
    before, after = variables["batch_stats"]["norm1"], updates["batch_stats"]["norm1"]
    assert not np.allclose(before["mean"], after["mean"])
    assert not np.allclose(before["var"], after["var"])
    # Eval mode uses the running averages and needs no mutable collection.
    assert block.apply(variables, x, train=False).shape == (4, 6, 6, 4)


def test_conv_block_injectable_conv_and_norm():
    conv = functools.partial(Conv, kernel_init=nn.initializers.ones)
    norm = functools.partial(nn.BatchNorm, momentum=0.5)
    block = ConvBlock(3, kernel_size=1, use_bias=False, conv=conv, norm=norm)
    variables = block.init(KEY, jnp.ones((2, 4, 4, 2)))
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"], np.ones((1, 1, 2, 3)))
    assert "bias" not in variables["params"]["conv1"]
    _, updates = block.apply(variables, jnp.ones((2, 4, 4, 2)), train=True, mutable=["batch_stats"])
    # momentum 0.5: the running mean moves halfway from 0 to the batch mean (2 per channel)
    np.testing.assert_allclose(updates["batch_stats"]["norm1"]["mean"], np.full(3, 1.0))


def test_conv_block_group_norm_act_and_pool_swapped():
    class RecordingPool(Pool):
        def reduce_windows(self, x, windows, strides, padding):
            self.sow("intermediates", "pooled", True)
            return super().reduce_windows(x, windows, strides, padding)

    block = ConvBlock(
        4,
        num_convs=2,
        norm=functools.partial(nn.GroupNorm, num_groups=2),
        act=nn.gelu,
        pooling="sum",
        pool=RecordingPool,
    )
    x = jax.random.normal(KEY, (2, 6, 6, 3))
    variables = block.init(KEY, x)
    assert set(variables) == {"params"}  # GroupNorm keeps no batch statistics
    assert set(variables["params"]["norm1"]) == {"scale", "bias"}
    y, state = block.apply(variables, x, train=True, mutable=["intermediates"])
    assert y.shape == (2, 3, 3, 4) and state["intermediates"]["pool"]["pooled"] == (True,)
    assert bool(jnp.any(y < 0))  # gelu, not relu


def test_conv_block_bfloat16_compute_float32_params():
    block = ConvBlock(4, norm="batch", pooling="max", dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 3), jnp.bfloat16)
    variables = jax.eval_shape(block.init, KEY, x)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out, _ = jax.eval_shape(
        functools.partial(block.apply, train=True, mutable=["batch_stats"]), variables, x
    )
    assert out.dtype == jnp.bfloat16


def test_conv_block_unknown_activation_and_norm():
    with pytest.raises(ConfigError, match="act='gelu2'"):
        abstract_init(ConvBlock(2, act="gelu2"), (1, 4, 4, 1))
    with pytest.raises(ConfigError, match="norm='batchnorm'"):
        abstract_init(ConvBlock(2, norm="batchnorm"), (1, 4, 4, 1))


# ----------------------------------------------------------------------------- DenseHead


def test_dense_head_counts_and_float32_logits():
    head = DenseHead(10, hidden_features=(120, 84), dtype=jnp.bfloat16)
    x = jnp.ones((3, 5, 5, 16), jnp.bfloat16)
    variables = jax.eval_shape(head.init, KEY, x)
    assert count_params(variables["params"]) == 48120 + 10164 + 850
    logits = jax.eval_shape(head.apply, variables, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "before, order",
    [(False, ["hidden1", "dropout1", "logits"]), (True, ["dropout1", "hidden1", "logits"])],
)
def test_dense_head_dropout_placement(before, order):
    head = DenseHead(2, hidden_features=(4,), dropout_rate=0.5, dropout_before_hidden=before)
    rows, _ = summary_rows(head, (3,))
    assert [row.path for row in rows] == order


def test_dense_head_dropout_only_in_train():
    head = DenseHead(4, hidden_features=(64,), dropout_rate=0.5)
    x = jnp.ones((2, 8))
    variables = head.init(KEY, x)
    np.testing.assert_array_equal(head.apply(variables, x), head.apply(variables, x))
    train_1 = head.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_2 = head.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_1, train_2)
    with pytest.raises(Exception, match="dropout"):  # flax: no 'dropout' rng given
        head.apply(variables, x, train=True)
