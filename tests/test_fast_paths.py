"""The CPU fast paths (cnn_jax.fast_paths) give the plain paths' results."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_jax import fast_paths
from cnn_jax.fast_paths import FastPathPolicy, use_fast_paths
from cnn_jax.models import get_model

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


def _uses_planar(fn, *args) -> bool:
    # A fresh wrapper each time: traces are cached per function, and the switch acts at trace time.
    return "custom_vjp_call" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-batch", "batch-chunks"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_lax_values_and_gradients(case, chunked):
    h, c, o, k, s, pad = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, h, h, c), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, c, o), np.float32))
    plain = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)
    fast = lambda x, w: fast_paths.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)
    y, vjp = jax.vjp(plain, x, w)
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    dx, dw = vjp(g)
    # Chunked: patches limited to one image's worth, so the batch of 3 runs as 3 planar convs.
    limit = k * k * c * y.shape[1] * y.shape[2] * 4 if chunked else None
    policy = FastPathPolicy(planar_conv_max_patch_bytes=limit) if chunked else None
    with use_fast_paths(True, policy):
        y2, vjp2 = jax.vjp(fast, x, w)
        dx2, dw2 = vjp2(g)
        small_input = k > h
        assert _uses_planar(fast, x, w) == (c <= 8 and o <= 16 and not small_input)
        jaxpr = str(jax.make_jaxpr(lambda *a: fast(*a))(x, w))
        assert ("conv_general_dilated" not in jaxpr) == (small_input or (c <= 8 and o <= 16))
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx2, dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw2, dw, rtol=1e-5, atol=1e-3)


def test_conv_policy_and_switch_choose_the_lowering():
    x = jnp.zeros((2, 12, 12, 1))
    w = jnp.zeros((5, 5, 1, 6))
    fast = lambda x, w: fast_paths.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
    assert _uses_planar(fast, x, w)
    with use_fast_paths(False):
        assert not fast_paths.fast_paths_enabled()
        assert not _uses_planar(fast, x, w)
    assert fast_paths.fast_paths_enabled()
    # Patches of 2*12*12*25 floats = 28.8 KB: over a 16 KB limit, one planar conv per image; under
    # the size of one image's patches, XLA's conv.
    with use_fast_paths(True, FastPathPolicy(planar_conv_max_patch_bytes=16_000)):
        assert str(jax.make_jaxpr(lambda *a: fast(*a))(x, w)).count("custom_vjp_call") == 2
    with use_fast_paths(True, FastPathPolicy(planar_conv_max_patch_bytes=1_000)):
        assert not _uses_planar(fast, x, w)
    # Other layouts, dilation and groups always take lax.conv_general_dilated.
    nchw = lambda x, w: fast_paths.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    assert not _uses_planar(nchw, jnp.zeros((2, 1, 12, 12)), jnp.zeros((6, 1, 5, 5)))
    dilated = lambda x, w: fast_paths.conv_general_dilated(
        x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
    assert not _uses_planar(dilated, x, w)
    np.testing.assert_allclose(
        dilated(jnp.ones((1, 12, 12, 1)), jnp.ones((5, 5, 1, 6))),
        lax.conv_general_dilated(jnp.ones((1, 12, 12, 1)), jnp.ones((5, 5, 1, 6)), (1, 1), "SAME",
                                 rhs_dilation=(2, 2), dimension_numbers=DN),
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case", [(14, 6, 16, 5, "VALID"), (2, 16, 12, 3, "SAME")],
                         ids=["planar", "small-input"])
def test_low_precision_convs_round_like_xla(dtype, case):
    """Values and both gradients in bfloat16/float16 are as accurate as XLA's own conv."""
    h, c, o, k, pad = case
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, h, h, c), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, c, o), np.float32) / k)
    plain = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN)
    fast = lambda x, w: fast_paths.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN)
    y, vjp = jax.vjp(plain, x, w)
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    ref = (y, *vjp(g))  # float32 reference
    lo = lambda a: a.astype(dtype)
    for fn in (plain, fast):
        y16, vjp16 = jax.vjp(fn, lo(x), lo(w))
        got = (y16, *vjp16(lo(g)))
        assert all(a.dtype == dtype for a in got)
        # RMS error relative to the reference's RMS, for y, dx and dw
        errors = [float(jnp.sqrt(jnp.mean((a.astype(jnp.float32) - r) ** 2) / jnp.mean(r**2)))
                  for a, r in zip(got, ref)]
        if fn is plain:
            xla_errors = errors
    for fast_err, xla_err in zip(errors, xla_errors):
        assert fast_err <= 1.5 * xla_err, (errors, xla_errors)


def test_forward_mode_needs_the_plain_path():
    x = jnp.ones((2, 8, 8, 1))
    w = jnp.ones((3, 3, 1, 4))
    f = lambda x: fast_paths.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN).sum()
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (x,), (x,))
    with use_fast_paths(False):
        _, tangent = jax.jvp(f, (x,), (x,))
    assert float(tangent) == float(f(x))  # linear in x
    # Reverse mode of any order works on the fast path.
    hvp = jax.grad(lambda w: jax.grad(lambda x: (fast_paths.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DN) ** 2).sum())(x).sum())(w)
    with use_fast_paths(False):
        ref = jax.grad(lambda w: jax.grad(lambda x: (fast_paths.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=DN) ** 2).sum())(x).sum())(w)
    np.testing.assert_allclose(hvp, ref, rtol=1e-5)


def test_symbolic_batch_takes_the_plain_conv():
    from jax import export

    w = jnp.ones((5, 5, 1, 6))
    f = jax.jit(lambda x: fast_paths.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN))
    (b,) = export.symbolic_shape("b")
    exported = export.export(f)(jax.ShapeDtypeStruct((b, 12, 12, 1), jnp.float32))
    x = jnp.ones((3, 12, 12, 1))
    np.testing.assert_allclose(exported.call(x), f(x), rtol=1e-5)


def test_max_pool_matches_flax_values_and_gradients():
    from flax.linen import pooling

    ref_pool, fast_pool = pooling.max_pool, fast_paths.max_pool
    rng = np.random.default_rng(1)
    for shape, window in [((2, 8, 8, 3), (2, 2)), ((2, 7, 9, 2), (2, 2)), ((1, 9, 9, 4), (3, 3))]:
        x = jnp.asarray(rng.standard_normal(shape, np.float32))  # continuous values: no ties
        y, vjp = jax.vjp(lambda x, w=window: ref_pool(x, w, w, "VALID"), x)
        y2, vjp2 = jax.vjp(lambda x, w=window: fast_pool(x, w, w, "VALID"), x)
        assert "reduce_window" not in str(jax.make_jaxpr(lambda x, w=window: fast_pool(x, w, w))(x))
        g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
        np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(vjp2(g)[0], vjp(g)[0], rtol=1e-6, atol=1e-6)
    # Overlapping windows and padding take Flax's own pooling; strides=None means 1, as in Flax.
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 2), np.float32))
    assert fast_pool(x, (2, 2)).shape == ref_pool(x, (2, 2)).shape == (1, 7, 7, 2)
    np.testing.assert_array_equal(fast_pool(x, (2, 2)), ref_pool(x, (2, 2)))
    np.testing.assert_array_equal(fast_pool(x, (3, 3), (2, 2), "SAME"),
                                  ref_pool(x, (3, 3), (2, 2), "SAME"))
    np.testing.assert_array_equal(fast_pool(x, (2, 2), (2, 2), ((1, 1), (0, 0))),
                                  ref_pool(x, (2, 2), (2, 2), ((1, 1), (0, 0))))


def test_max_pool_ties_split_the_gradient():
    x = jnp.zeros((1, 2, 2, 1))  # four equal maxima in one window
    grad = jax.grad(lambda x: fast_paths.max_pool(x, (2, 2), (2, 2)).sum())(x)
    np.testing.assert_allclose(grad, np.full((1, 2, 2, 1), 0.25))
    with use_fast_paths(False):  # XLA's select-and-scatter gives it to one
        grad = jax.grad(lambda x: fast_paths.max_pool(x, (2, 2), (2, 2)).sum())(x)
    assert float(grad.sum()) == 1.0 and float(grad.max()) == 1.0


def test_compiler_options_only_for_cpu_devices():
    cpu = types.SimpleNamespace(platform="cpu")
    gpu = types.SimpleNamespace(platform="gpu")
    assert fast_paths.compiler_options([cpu, cpu]) == fast_paths.CPU_COMPILER_OPTIONS
    assert fast_paths.compiler_options([gpu]) is None
    assert fast_paths.compiler_options([cpu, gpu]) is None
    with use_fast_paths(False):
        assert fast_paths.compiler_options([cpu]) is None
    with use_fast_paths(True, FastPathPolicy(eigen_convolutions=False)):
        assert fast_paths.compiler_options([cpu]) is None


def test_policy_turns_single_paths_off():
    x = jnp.zeros((1, 4, 4, 1))
    reshape = lambda x: fast_paths.max_pool(x, (2, 2), (2, 2))
    assert "reduce_window" not in str(jax.make_jaxpr(lambda x: reshape(x))(x))
    with use_fast_paths(True, FastPathPolicy(reshape_max_pool=False)):
        assert "reduce_window" in str(jax.make_jaxpr(lambda x: reshape(x))(x))
    assert fast_paths.current_policy() == fast_paths.DEFAULT_POLICY


@pytest.mark.parametrize(
    "model_name, shape, options",
    [("lenet5", (28, 28, 1), {}),
     ("lenet5", (28, 28, 1), {"activation": "relu", "pooling": "max"}),
     ("simple_convnet", (16, 16, 3), {})],
)
def test_fast_paths_give_the_same_train_step(model_name, shape, options):
    """A whole model's loss and gradients with every fast path (lowering, pooling, compiler
    options) equal the plain ones."""
    model = get_model(model_name, num_classes=4, **options)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((8, *shape), np.float32))
    y = jnp.asarray(rng.integers(0, 4, 8), jnp.int32)
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss(p):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y])

    with use_fast_paths(False):
        step = jax.jit(jax.value_and_grad(loss), compiler_options=fast_paths.compiler_options())
        assert fast_paths.compiler_options() is None
        ref_loss, ref_grads = step(params)
    step = jax.jit(jax.value_and_grad(loss), compiler_options=fast_paths.compiler_options())
    fast_loss, fast_grads = step(params)
    np.testing.assert_allclose(fast_loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_layers_route_through_the_fast_paths():
    conv = get_model("lenet5", num_classes=4)
    x = jnp.zeros((2, 28, 28, 1))
    params = conv.init(jax.random.key(0), x)
    assert _uses_planar(lambda p: conv.apply(p, x), params)
    with use_fast_paths(False):
        assert not _uses_planar(lambda p: conv.apply(p, x), params)
    assert isinstance(nn.Conv, type)  # flax.linen.Conv itself is untouched
    assert nn.Conv.conv_general_dilated is None
