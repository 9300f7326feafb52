"""The explicit CPU fast paths (cnn_jax.fast_paths) give the default (XLA) paths' results.

Which lowering a call takes is observed through behaviour, not by reading traced programs: the
planar conv has its own VJP, so forward-mode AD through it raises, and the reshape max pool splits a
tied maximum's gradient where XLA's select-and-scatter gives it to one element.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_jax import fast_paths, layers
from cnn_jax.fast_paths import DEFAULT_POLICY, FastPathPolicy
from cnn_jax.models import get_model, model_options

DN = ("NHWC", "HWIO", "NHWC")

CONV_CASES = [  # (H, C_in, C_out, kernel, stride, padding)
    (12, 1, 6, 5, 1, "SAME"),  # LeNet-5 conv1
    (9, 6, 16, 5, 1, "VALID"),  # LeNet-5 conv2
    (8, 3, 8, 3, 1, ((1, 1), (1, 1))),
    (9, 3, 5, 3, 2, ((1, 2), (0, 1))),  # strided, asymmetric padding
    (10, 2, 4, 4, 3, ((2, 0), (1, 3))),  # stride does not divide the padded size
    (2, 16, 12, 3, 1, "SAME"),  # input smaller than the kernel: im2col matmul
    (1, 16, 12, 3, 1, "SAME"),
    (3, 4, 20, 5, 2, ((2, 1), (1, 2))),
    (7, 12, 4, 3, 1, "SAME"),  # above the channel threshold: XLA's own conv
    (8, 3, 32, 3, 1, "SAME"),  # above the output-feature threshold: XLA's own conv
]


def fast_conv(strides, padding, policy=DEFAULT_POLICY, **kwargs):
    return lambda x, w: fast_paths.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=DN, policy=policy, **kwargs
    )


def plain_conv(strides, padding, **kwargs):
    return lambda x, w: lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=DN, **kwargs
    )


def random_params(model, x, seed=0):
    """Normal(0, 0.2) parameters of `model`'s shapes: quicker on CPU than compiling `model.init`."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), shapes)


def takes_planar_path(fn, *args) -> bool:
    """Whether `fn` runs the planar conv: its custom VJP refuses forward-mode AD."""
    try:
        jax.jvp(lambda *a: fn(*a).sum(), args, args)
    except TypeError as error:
        assert "forward-mode" in str(error) or "custom_vjp" in str(error), error
        return True
    return False


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-batch", "batch-chunks"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_lax_values_and_gradients(case, chunked):
    h, c, o, k, s, pad = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, h, h, c), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, c, o), np.float32))
    y, vjp = jax.vjp(plain_conv((s, s), pad), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    dx, dw = vjp(g)
    # Chunked: patches limited to one image's worth, so the batch of 3 runs as 3 planar convs.
    limit = k * k * c * y.shape[1] * y.shape[2] * 4
    policy = FastPathPolicy(planar_conv_max_patch_bytes=limit) if chunked else DEFAULT_POLICY
    fast = fast_conv((s, s), pad, policy)
    y2, vjp2 = jax.vjp(fast, x, w)
    dx2, dw2 = vjp2(g)
    small_input = k > h
    assert takes_planar_path(fast, x, w) == (c <= 8 and o <= 16 and not small_input)
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx2, dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw2, dw, rtol=1e-5, atol=1e-3)


def test_conv_policy_chooses_the_lowering():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 12, 12, 1), np.float32))
    w = jnp.asarray(rng.standard_normal((5, 5, 1, 6), np.float32))
    ref = plain_conv((1, 1), "SAME")(x, w)
    assert takes_planar_path(fast_conv((1, 1), "SAME"), x, w)
    # Patches of 2*12*12*25 floats = 28.8 KB: over a 16 KB limit, one planar conv per image; under
    # the size of one image's patches, XLA's conv.
    per_image = fast_conv((1, 1), "SAME", FastPathPolicy(planar_conv_max_patch_bytes=16_000))
    assert takes_planar_path(per_image, x, w)
    np.testing.assert_allclose(per_image(x, w), ref, rtol=1e-5, atol=1e-5)
    for policy in (
        FastPathPolicy(planar_conv_max_patch_bytes=1_000),
        FastPathPolicy(planar_conv_max_in_channels=0),
        FastPathPolicy(planar_conv_max_out_features=4),
    ):
        assert not takes_planar_path(fast_conv((1, 1), "SAME", policy), x, w)
        np.testing.assert_array_equal(fast_conv((1, 1), "SAME", policy)(x, w), ref)
    # Without the small-input im2col, a 3x3 conv on 2x2 maps is XLA's (equal to lax bit for bit).
    small_x, small_w = x[:, :2, :2, :], w[:3, :3]
    policy = FastPathPolicy(small_input_im2col=False, planar_conv_max_in_channels=0)
    np.testing.assert_array_equal(
        fast_conv((1, 1), "SAME", policy)(small_x, small_w),
        plain_conv((1, 1), "SAME")(small_x, small_w),
    )


def test_other_layouts_dilation_and_groups_take_lax():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 12, 12, 2), np.float32))
    w = jnp.asarray(rng.standard_normal((5, 5, 2, 6), np.float32))
    for kwargs, x_, w_ in [
        ({"rhs_dilation": (2, 2)}, x, w),
        ({"lhs_dilation": (2, 1), "padding": ((2, 2), (2, 2))}, x, w),
        ({"feature_group_count": 2}, x, w[:, :, :1, :]),
        ({"preferred_element_type": jnp.float32}, x, w),
    ]:
        padding = kwargs.pop("padding", "SAME")
        fast = fast_conv((1, 1), padding, **kwargs)
        assert not takes_planar_path(fast, x_, w_), kwargs
        np.testing.assert_array_equal(fast(x_, w_), plain_conv((1, 1), padding, **kwargs)(x_, w_))
    nchw = ("NCHW", "OIHW", "NCHW")
    xt, wt = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    fast = lambda x, w: fast_paths.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=nchw
    )
    assert not takes_planar_path(fast, xt, wt)
    np.testing.assert_array_equal(
        fast(xt, wt), lax.conv_general_dilated(xt, wt, (1, 1), "SAME", dimension_numbers=nchw)
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    "case", [(14, 6, 16, 5, "VALID"), (2, 16, 12, 3, "SAME")], ids=["planar", "small-input"]
)
def test_low_precision_convs_round_like_xla(dtype, case):
    """Values and both gradients in bfloat16/float16 are as accurate as XLA's own conv."""
    h, c, o, k, pad = case
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, h, h, c), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, c, o), np.float32) / k)
    plain, fast = plain_conv((1, 1), pad), fast_conv((1, 1), pad)
    y, vjp = jax.vjp(plain, x, w)
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    ref = (y, *vjp(g))  # float32 reference
    lo = lambda a: a.astype(dtype)
    errors = {}
    for label, fn in (("xla", plain), ("fast", fast)):
        y16, vjp16 = jax.vjp(fn, lo(x), lo(w))
        got = (y16, *vjp16(lo(g)))
        assert all(a.dtype == dtype for a in got)
        # RMS error relative to the reference's RMS, for y, dx and dw
        errors[label] = [
            float(jnp.sqrt(jnp.mean((a.astype(jnp.float32) - r) ** 2) / jnp.mean(r**2)))
            for a, r in zip(got, ref)
        ]
    for fast_err, xla_err in zip(errors["fast"], errors["xla"]):
        assert fast_err <= 1.5 * xla_err, errors


def test_forward_mode_needs_lax_and_reverse_mode_works_to_any_order():
    x = jnp.ones((2, 8, 8, 1))
    w = jnp.ones((3, 3, 1, 4))
    fast, plain = fast_conv((1, 1), "SAME"), plain_conv((1, 1), "SAME")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: fast(x, w).sum(), (x,), (x,))
    _, tangent = jax.jvp(lambda x: plain(x, w).sum(), (x,), (x,))
    assert float(tangent) == float(plain(x, w).sum())  # linear in x

    def hvp(conv):  # reverse over reverse, through the planar conv's custom VJP
        return jax.grad(lambda w: jax.grad(lambda x: (conv(x, w) ** 2).sum())(x).sum())(w)

    np.testing.assert_allclose(hvp(fast), hvp(plain), rtol=1e-5)


def test_symbolic_batch_takes_the_plain_conv():
    from jax import export

    w = jnp.ones((5, 5, 1, 6))
    f = jax.jit(lambda x: fast_conv((1, 1), "SAME")(x, w))
    (b,) = export.symbolic_shape("b")
    exported = export.export(f)(jax.ShapeDtypeStruct((b, 12, 12, 1), jnp.float32))
    x = jnp.ones((3, 12, 12, 1))
    np.testing.assert_allclose(exported.call(x), f(x), rtol=1e-5)


# ----------------------------------------------------------------------------- max pooling


def test_max_pool_matches_flax_values_and_gradients():
    rng = np.random.default_rng(1)
    for shape, window in [((2, 8, 8, 3), (2, 2)), ((2, 7, 9, 2), (2, 2)), ((1, 9, 9, 4), (3, 3))]:
        x = jnp.asarray(rng.standard_normal(shape, np.float32))  # continuous values: no ties
        y, vjp = jax.vjp(lambda x, w=window: nn.max_pool(x, w, w, "VALID"), x)
        y2, vjp2 = jax.vjp(lambda x, w=window: fast_paths.max_pool(x, w, w, "VALID"), x)
        g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
        np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(vjp2(g)[0], vjp(g)[0], rtol=1e-6, atol=1e-6)
    # Overlapping windows and padding take Flax's own pooling; strides=None means 1, as in Flax.
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 2), np.float32))
    fast_pool = fast_paths.max_pool
    assert fast_pool(x, (2, 2)).shape == nn.max_pool(x, (2, 2)).shape == (1, 7, 7, 2)
    np.testing.assert_array_equal(fast_pool(x, (2, 2)), nn.max_pool(x, (2, 2)))
    np.testing.assert_array_equal(
        fast_pool(x, (3, 3), (2, 2), "SAME"), nn.max_pool(x, (3, 3), (2, 2), "SAME")
    )
    np.testing.assert_array_equal(
        fast_pool(x, (2, 2), (2, 2), ((1, 1), (0, 0))),
        nn.max_pool(x, (2, 2), (2, 2), ((1, 1), (0, 0))),
    )


def tie_gradient(pool):
    x = jnp.zeros((1, 2, 2, 1))  # four equal maxima in one window
    return jax.grad(lambda x: pool(x).sum())(x)


def test_max_pool_ties_split_the_gradient_and_policy_turns_it_off():
    grad = tie_gradient(lambda x: fast_paths.max_pool(x, (2, 2), (2, 2)))
    np.testing.assert_allclose(grad, np.full((1, 2, 2, 1), 0.25))  # reshape + max: JAX's rule
    off = FastPathPolicy(reshape_max_pool=False)
    grad = tie_gradient(lambda x: fast_paths.max_pool(x, (2, 2), (2, 2), policy=off))
    assert float(grad.sum()) == 1.0 and float(grad.max()) == 1.0  # select-and-scatter: to one
    grad = tie_gradient(lambda x: fast_paths.max_pool(x, (2, 2), (1, 1)))  # overlapping: Flax's
    assert float(grad.max()) == 1.0


# ----------------------------------------------------------------------------- modules


def test_no_process_global_switch():
    for name in ("use_fast_paths", "fast_paths_enabled", "current_policy", "_enabled", "_policy"):
        assert not hasattr(fast_paths, name), name
    assert layers.Conv.conv_general_dilated is None  # the default Conv is lax's
    assert "fast_paths" not in vars(layers)


def test_compiler_options_only_for_cpu_devices():
    cpu = types.SimpleNamespace(platform="cpu")
    gpu = types.SimpleNamespace(platform="gpu")
    assert fast_paths.compiler_options([cpu, cpu]) == fast_paths.CPU_COMPILER_OPTIONS
    assert fast_paths.compiler_options([cpu]) is not fast_paths.CPU_COMPILER_OPTIONS  # a copy
    assert fast_paths.compiler_options([gpu]) is None
    assert fast_paths.compiler_options([cpu, gpu]) is None
    assert fast_paths.compiler_options([]) is None
    assert fast_paths.compiler_options([cpu], FastPathPolicy(eigen_convolutions=False)) is None


def test_modules_bind_the_policy_and_are_cached():
    policy = FastPathPolicy(reshape_max_pool=False)
    mods = fast_paths.modules(policy)
    assert set(mods) == {"conv", "pool"}
    assert mods["conv"].func is fast_paths.Conv and mods["conv"].keywords == {"policy": policy}
    assert mods["pool"].func is fast_paths.Pool and mods["pool"].keywords == {"policy": policy}
    assert fast_paths.modules(FastPathPolicy(reshape_max_pool=False)) == mods
    assert fast_paths.modules()["conv"] is fast_paths.modules(DEFAULT_POLICY)["conv"]
    assert issubclass(fast_paths.Conv, layers.Conv) and issubclass(fast_paths.Pool, layers.Pool)
    # Models built from equal policies are equal (so jit caches keyed on them hit).
    build = lambda: get_model("lenet5", num_classes=4, **fast_paths.modules())
    assert build() == build() and hash(build()) == hash(build())


def test_fast_conv_module_uses_its_policy_and_default_variables():
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 12, 12, 1), np.float32))
    default = layers.Conv(6, (5, 5))
    variables = default.init(jax.random.key(0), x)
    fast = fast_paths.Conv(6, (5, 5))
    assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    np.testing.assert_allclose(fast.apply(variables, x), default.apply(variables, x), atol=1e-5)
    assert takes_planar_path(lambda x: fast.apply(variables, x), x)
    off = fast_paths.Conv(6, (5, 5), policy=FastPathPolicy(planar_conv_max_in_channels=0))
    assert not takes_planar_path(lambda x: off.apply(variables, x), x)
    # clone() with another policy follows it
    assert not takes_planar_path(lambda x: fast.clone(policy=off.policy).apply(variables, x), x)


def test_fast_pool_module_reshapes_max_pooling_only():
    split = tie_gradient(lambda x: fast_paths.Pool("max", 2).apply({}, x))
    np.testing.assert_allclose(split, np.full((1, 2, 2, 1), 0.25))
    one = tie_gradient(lambda x: layers.Pool("max", 2).apply({}, x))
    assert float(one.max()) == 1.0
    policy = FastPathPolicy(reshape_max_pool=False)
    assert (
        float(tie_gradient(lambda x: fast_paths.Pool("max", 2, policy=policy).apply({}, x)).max())
        == 1.0
    )
    y = jnp.arange(16.0).reshape(1, 4, 4, 1)
    for kind in ("avg", "sum"):
        np.testing.assert_array_equal(
            fast_paths.Pool(kind, 2).apply({}, y), layers.Pool(kind, 2).apply({}, y)
        )
    ceil = {"kind": "max", "window": 3, "strides": 2, "ceil_mode": True}
    np.testing.assert_array_equal(
        fast_paths.Pool(**ceil).apply({}, y), layers.Pool(**ceil).apply({}, y)
    )


@pytest.mark.parametrize(
    "model_name, shape, options",
    [
        ("lenet5", (28, 28, 1), {}),
        ("lenet5", (28, 28, 1), {"act": "relu", "pooling": "max"}),
        ("simple_convnet", (16, 16, 3), {}),
    ],
)
def test_fast_modules_give_the_same_train_step(model_name, shape, options):
    """A whole model built with `**fast_paths.modules()` and compiled with `compiler_options`
    has the default model's variables, loss and gradients."""
    fast_modules = {k: v for k, v in fast_paths.modules().items() if k in model_options(model_name)}
    assert set(fast_modules) == {"conv", "pool"}
    default = get_model(model_name, num_classes=4, **options)
    fast = get_model(model_name, num_classes=4, **options, **fast_modules)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((8, *shape), np.float32))
    y = jnp.asarray(rng.integers(0, 4, 8), jnp.int32)
    params = random_params(default, x[:1])
    fast_shapes = jax.eval_shape(fast.init, jax.random.key(0), x[:1])["params"]
    assert jax.tree.map(jnp.shape, fast_shapes) == jax.tree.map(jnp.shape, params)

    def step(model, options):
        def loss(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y])

        return jax.jit(jax.value_and_grad(loss), compiler_options=options)(params)

    ref_loss, ref_grads = step(default, None)
    fast_loss, fast_grads = step(fast, fast_paths.compiler_options(jax.devices()))
    np.testing.assert_allclose(fast_loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_default_model_has_forward_mode_and_fast_model_does_not():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 12, 12, 1), np.float32))
    default = get_model("lenet5", num_classes=4)
    fast = get_model("lenet5", num_classes=4, **fast_paths.modules())
    variables = {"params": random_params(default, x)}
    f = lambda model: lambda s: model.apply(variables, s * x).sum()
    _, tangent = jax.jit(lambda s: jax.jvp(f(default), (s,), (1.0,)))(1.0)
    np.testing.assert_allclose(tangent, jax.jit(jax.grad(f(default)))(1.0), rtol=1e-4)
    np.testing.assert_allclose(jax.jit(jax.grad(f(fast)))(1.0), tangent, rtol=1e-4)  # same function
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f(fast), (1.0,), (1.0,))
