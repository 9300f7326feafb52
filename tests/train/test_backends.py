"""The jit and pmap back ends: same results on 1 and 8 devices; the device-resident fast path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import (
    IMAGE_SHAPE,
    TinyCNN,
    assert_trees_close,
    assert_trees_equal,
    simple_preprocess,
    synthetic_arrays,
)

from cnn_jax.data import order
from cnn_jax.train import backends
from cnn_jax.train.steps import summarize_eval

N, B = 256, 32
SPE = N // B


def _backend(name, devices, *, model=None, compiled_loop=False, grad_accum_steps=1, tx=None):
    settings = backends.StepSettings(
        batch_size=B,
        eval_batch_size=64,
        steps_per_epoch=SPE,
        data_key=jax.random.PRNGKey(1),
        aug_key=jax.random.PRNGKey(2),
        grad_accum_steps=grad_accum_steps,
        compiled_loop=compiled_loop,
    )
    return backends.make_backend(
        name,
        model or TinyCNN(),
        tx or optax.adam(1e-2),
        simple_preprocess,
        settings,
        devices=devices,
    )


def _train(backend, chunks, data=None):
    """Runs steps in the given chunk sizes from a fresh state.

    Returns (host state, mean loss of each chunk)."""
    images, labels = data or synthetic_arrays(N)
    state = backend.create_state(IMAGE_SHAPE, jax.random.PRNGKey(0))
    resident = backend.put_resident(images, labels)
    step, losses = 0, []
    for n in chunks:
        state, sums = backend.train_steps(state, resident, step, n)
        losses.append(float(sums["loss"]) / n)
        step += n
    return backend.to_host_layout(state), losses


def test_jit_on_8_devices_and_pmap_match_one_device(eight_devices):
    """Same seed and global batch: 1 device, 8 devices under jit and under pmap agree."""
    chunks = [3, 2]
    one, losses_one = _train(_backend("jit", eight_devices[:1]), chunks)
    jit8, losses_jit8 = _train(_backend("jit", eight_devices), chunks)
    pmap8, losses_pmap8 = _train(_backend("pmap", eight_devices), chunks)
    assert int(one.step) == int(jit8.step) == int(pmap8.step) == 5
    np.testing.assert_allclose(losses_jit8, losses_one, rtol=1e-5)
    np.testing.assert_allclose(losses_pmap8, losses_one, rtol=1e-5)
    assert_trees_close(jit8.params, one.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(pmap8.params, one.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(pmap8.opt_state, one.opt_state, rtol=1e-4, atol=1e-6)


def test_jit_batchnorm_and_grad_accumulation_on_8_devices_match_one_device(eight_devices):
    """jit is one global program: BatchNorm sees the global batch on any device count."""
    model = TinyCNN(use_bn=True)
    one, losses_one = _train(
        _backend("jit", eight_devices[:1], model=model, grad_accum_steps=2), [4]
    )
    jit8, losses_8 = _train(_backend("jit", eight_devices, model=model, grad_accum_steps=2), [4])
    np.testing.assert_allclose(losses_8, losses_one, rtol=1e-5)
    assert_trees_close(jit8.params, one.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(jit8.batch_stats, one.batch_stats, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compiled_loop", [False, True])
def test_chunking_does_not_change_results_bit_for_bit(compiled_loop):
    devices = jax.devices()[:1]
    backend = _backend("jit", devices, compiled_loop=compiled_loop)
    one_by_one, losses_a = _train(backend, [1] * 10)  # crosses an epoch boundary at 8
    backend = _backend("jit", devices, compiled_loop=compiled_loop)
    chunked, losses_b = _train(backend, [5, 3, 2])
    assert_trees_equal(one_by_one, chunked)
    assert sum(losses_a) == pytest.approx(
        5 * losses_b[0] + 3 * losses_b[1] + 2 * losses_b[2], rel=1e-5
    )


def test_compiled_loop_matches_per_step_dispatch():
    devices = jax.devices()[:1]
    loop, _ = _train(_backend("jit", devices, compiled_loop=True), [8, 2])
    steps, _ = _train(_backend("jit", devices, compiled_loop=False), [8, 2])
    assert_trees_close(loop.params, steps.params, rtol=1e-5, atol=1e-6)


def test_resident_batches_follow_the_data_order_contract():
    """Training on the resident split == training on batches from order.batch_indices."""
    devices = jax.devices()[:1]
    images, labels = synthetic_arrays(N)
    backend = _backend("jit", devices)
    resident_state, _ = _train(backend, [SPE, 2], data=(images, labels))

    fed = _backend("jit", devices)
    state = fed.create_state(IMAGE_SHAPE, jax.random.PRNGKey(0))
    for step in range(SPE + 2):
        idx = np.asarray(
            order.batch_indices(jax.random.PRNGKey(1), step, num_examples=N, batch_size=B)
        )
        state, _ = fed.train_batch(state, {"image": images[idx], "label": labels[idx]})
    assert_trees_close(
        resident_state.params, fed.to_host_layout(state).params, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("name", ["jit", "pmap"])
def test_evaluation_counts_every_example_once(name, eight_devices):
    images, labels = synthetic_arrays(100)  # not a multiple of the eval batch (64)
    backend = _backend(name, eight_devices)
    state = backend.create_state(IMAGE_SHAPE, jax.random.PRNGKey(0))
    padded = backends.pad_eval_split(images, labels, 64)
    metrics = summarize_eval(
        jax.device_get(backend.evaluate_resident(state, backend.put_resident(*padded)))
    )
    assert metrics["count"] == 100
    host = backend.to_host_layout(state)
    logits = TinyCNN().apply(host.variables(), jnp.asarray(images, jnp.float32) / 255.0)
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    assert metrics["accuracy"] == pytest.approx(expected)


def test_nan_loss_is_reported_with_its_step():
    backend = _backend("jit", jax.devices()[:1], tx=optax.sgd(1e30))
    state = backend.create_state(IMAGE_SHAPE, jax.random.PRNGKey(0))
    resident = backend.put_resident(*synthetic_arrays(N))
    state, sums = backend.train_steps(state, resident, 0, 6)
    bad = int(sums["first_bad_step"])
    assert 0 < bad < 6
