"""`cnn_jax.bench.run_benchmark`: the documented keys, on a tiny config (not a timed test)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_jax.bench import BENCH_MODELS, RESULT_KEYS, bench_spec, peak_bf16_flops, run_benchmark
from cnn_jax.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_result():
    return run_benchmark("mlp", 8, 2, input_shape=(8, 8, 1), num_classes=3, windows=2,
                         options={"hidden_features": (16,)})


def test_run_benchmark_returns_documented_keys(tiny_result):
    r = tiny_result
    assert set(RESULT_KEYS) <= set(r)
    for key in ("model", "batch_size", "images_per_sec", "compile_seconds", "device"):
        assert key in r
    assert r["model"] == "mlp" and r["batch_size"] == 8 and r["steps"] == 2
    assert r["input_shape"] == [8, 8, 1] and r["num_classes"] == 3
    assert r["num_params"] == 8 * 8 * 16 + 16 + 16 * 3 + 3
    assert len(r["window_images_per_sec"]) == 2
    # Values are measurements: only their types and signs are checked, never their size.
    assert isinstance(r["images_per_sec"], float) and r["images_per_sec"] > 0
    assert isinstance(r["compile_seconds"], float) and r["compile_seconds"] >= 0
    assert isinstance(r["device"], str) and r["device"]
    json.dumps(r)  # the CLI's --json must be able to print it


def test_memory_and_mfu_are_reported_or_explained(tiny_result):
    r = tiny_result
    assert r["peak_memory_source"]
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
    if r["platform"] == "cpu":
        assert r["mfu"] is None and "CPU" in r["mfu_note"]


def test_compiled_loop_switch():
    r = run_benchmark("mlp", 8, 3, input_shape=(4, 4, 1), num_classes=2, windows=1,
                      steps_per_call=3, options={"hidden_features": (4,)})
    assert r["compiled_loop"] is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model_name": "no_such_model"}, "unknown model"),
        ({"model_name": "mlp", "batch_size": 0}, "batch_size"),
        ({"model_name": "mlp", "steps": -1}, "steps"),
        ({"model_name": "mlp", "dtype": "float16"}, "dtype"),
        ({"model_name": "mlp", "backend": "tpu"}, "backend"),
        ({"model_name": "mlp", "input_shape": (8, 8)}, "input_shape"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run_benchmark(**kwargs)


def test_bench_specs_and_peak_table():
    assert bench_spec("lenet5")["input_shape"] == (28, 28, 1)
    assert bench_spec("resnet18")["options"] == {"cifar_stem": True}
    assert bench_spec("alexnet") == {"input_shape": (32, 32, 3), "num_classes": 10, "options": {}}
    assert set(BENCH_MODELS) == {"lenet5", "simple_convnet", "vgg16", "vgg16_bn", "resnet18", "resnet50"}
    dev = lambda platform, kind: types.SimpleNamespace(platform=platform, device_kind=kind)
    assert peak_bf16_flops(dev("cpu", "cpu")) is None
    assert peak_bf16_flops(dev("gpu", "NVIDIA H100 80GB HBM3")) == 989.4e12
    assert peak_bf16_flops(dev("gpu", "NVIDIA H100 PCIe")) == 756e12
    assert peak_bf16_flops(dev("gpu", "NVIDIA H200")) == 989.4e12
    assert peak_bf16_flops(dev("gpu", "Some Future GPU")) is None


# --------------------------------------------------------------------------------------------------
# The CPU fast paths prototyped in benchmarks/fast_conv.py must give the plain path's results.
# --------------------------------------------------------------------------------------------------

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def fast_conv():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import fast_conv as module
    finally:
        sys.path.remove(str(BENCH_DIR))
    return module


CONV_CASES = [  # (H, C_in, C_out, kernel, stride, padding)
    (12, 1, 6, 5, 1, "SAME"),  # LeNet-5 conv1
    (9, 6, 16, 5, 1, "VALID"),  # LeNet-5 conv2
    (8, 3, 8, 3, 1, ((1, 1), (1, 1))),  # small ConvNet conv1
    (9, 3, 5, 3, 2, ((1, 2), (0, 1))),  # strided, asymmetric padding
    (7, 12, 4, 3, 1, "SAME"),  # above every threshold: plain XLA
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_fast_conv_matches_lax_values_and_gradients(fast_conv, case):
    h, c, o, k, s, pad = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, h, h, c), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, c, o), np.float32))
    dn = ("NHWC", "HWIO", "NHWC")
    plain = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=dn)
    y, vjp = jax.vjp(plain, x, w)
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    dx, dw = vjp(g)
    everything = fast_conv.ConvPolicy(
        fwd_dot_max_c=1, fwd_taps_max_c=2, dk_stack_c=(2, 3, 4), dk_planar_max_c=1,
        dx_planar_max_c=8, dx_im2col_max_c=16, canonical_grads=True,
    )
    for policy in (fast_conv.POLICY, everything, fast_conv.ConvPolicy(canonical_grads=True)):
        with fast_conv.policy(policy):
            fast = lambda x, w: fast_conv.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=dn)
            y2, vjp2 = jax.vjp(fast, x, w)
            dx2, dw2 = vjp2(g)
        np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dx2, dx, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dw2, dw, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("impl", ["reshape", "slices"])
def test_fast_pooling_matches_flax(fast_conv, impl):
    from flax.linen import pooling

    rng = np.random.default_rng(1)
    fast_conv.POOL_IMPL, saved = impl, fast_conv.POOL_IMPL
    try:
        for shape, window in [((2, 8, 8, 3), (2, 2)), ((2, 7, 9, 2), (2, 2)), ((1, 9, 9, 4), (3, 3))]:
            x = jnp.asarray(rng.standard_normal(shape, np.float32))  # no ties
            for fast, ref in [(fast_conv.max_pool, pooling.max_pool),
                              (fast_conv.avg_pool, pooling.avg_pool)]:
                y, vjp = jax.vjp(lambda x, ref=ref, w=window: ref(x, w, w, "VALID"), x)
                y2, vjp2 = jax.vjp(lambda x, fast=fast, w=window: fast(x, w, w, "VALID"), x)
                g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
                np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(vjp2(g)[0], vjp(g)[0], rtol=1e-6, atol=1e-6)
        # Overlapping windows / padding fall back to Flax's own pooling.
        x = jnp.asarray(rng.standard_normal((1, 8, 8, 2), np.float32))
        np.testing.assert_array_equal(fast_conv.max_pool(x, (3, 3), (2, 2), "SAME"),
                                      pooling.max_pool(x, (3, 3), (2, 2), "SAME"))
    finally:
        fast_conv.POOL_IMPL = saved


@pytest.mark.parametrize("model_name, shape", [("lenet5", (28, 28, 1)), ("simple_convnet", (16, 16, 3))])
def test_fast_paths_give_the_same_train_step(fast_conv, model_name, shape):
    """A whole model's loss and gradients with the patched Flax conv/pooling equal the plain ones."""
    from cnn_jax.models import get_model

    model = get_model(model_name, num_classes=4)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, *shape), np.float32))
    y = jnp.asarray(rng.integers(0, 4, 4), jnp.int32)
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss(p):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params)
    with fast_conv.patched_flax():
        fast_loss, fast_grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(fast_loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
