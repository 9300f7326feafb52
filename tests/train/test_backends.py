"""The jit and pmap compilations: same results on 1 and 8 devices; grouping, data order, eval."""

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

from cnn_jax.data import augment, order
from cnn_jax.train.compile import BACKENDS, StepSettings
from cnn_jax.train.feeders import ResidentFeeder
from cnn_jax.train.loop import run_steps
from cnn_jax.train.steps import EVAL_SUMS, summarize_eval

N, B = 256, 32
SPE = N // B


def _compiled(name, devices, *, model=None, grad_accum_steps=1, tx=None, preprocess=None):
    settings = StepSettings(
        data_key=jax.random.PRNGKey(1),
        aug_key=jax.random.PRNGKey(2),
        grad_accum_steps=grad_accum_steps,
    )
    return BACKENDS[name](model or TinyCNN(), tx or optax.adam(1e-2),
                          preprocess or simple_preprocess, settings, devices)  # fmt: skip


def _augmenting_preprocess(images_u8, key, train, part=None):
    return augment.preprocess(
        images_u8, key, train=train, mean=(0.5,), std=(0.25,), crop_padding=2, flip=True, part=part
    )


def _feeder(images, labels, eval_images=None, eval_labels=None):
    eval_images = images[:0] if eval_images is None else eval_images
    eval_labels = labels[:0] if eval_labels is None else eval_labels
    return ResidentFeeder(
        name="synthetic", kind="device", image_shape=IMAGE_SHAPE, num_classes=10,
        num_train=len(labels), num_eval=len(eval_labels), preprocess=simple_preprocess,
        batch_size=B, eval_batch_size=64, train_arrays=(images, labels),
        eval_arrays=(eval_images, eval_labels),
    )  # fmt: skip


def _train(compiled, chunks, data=None, group=1):
    """Runs steps in the given chunk sizes from a fresh state.

    Returns (host state, mean loss of each chunk)."""
    batches = _feeder(*(data or synthetic_arrays(N))).train_batches(compiled, 0)
    state = compiled.init_state(IMAGE_SHAPE, jax.random.PRNGKey(0))
    losses = []
    for n in chunks:
        state, sums = run_steps(compiled, state, compiled.zero_sums(), batches, n, group)
        losses.append(float(compiled.host(sums)["loss"]) / n)
    return compiled.host(state), losses


def test_jit_on_8_devices_and_pmap_match_one_device(eight_devices):
    """Same seed and global batch: 1 device, 8 devices under jit and under pmap agree."""
    chunks = [3, 2]
    one, losses_one = _train(_compiled("jit", eight_devices[:1]), chunks)
    jit8, losses_jit8 = _train(_compiled("jit", eight_devices), chunks)
    pmap8, losses_pmap8 = _train(_compiled("pmap", eight_devices), chunks)
    assert int(one.step) == int(jit8.step) == int(pmap8.step) == 5
    np.testing.assert_allclose(losses_jit8, losses_one, rtol=1e-5)
    np.testing.assert_allclose(losses_pmap8, losses_one, rtol=1e-5)
    assert_trees_close(jit8.params, one.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(pmap8.params, one.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(pmap8.opt_state, one.opt_state, rtol=1e-4, atol=1e-6)


def test_random_augmentation_is_the_same_under_jit_and_pmap(eight_devices):
    """Random crops and flips: pmap used to fold the device index into the augmentation key, so
    even on one device its runs differed from jit's (issue 12, item 22). Each device now takes
    its rows of the global batch's draw."""
    chunks = [3, 2]
    runs = {
        (name, n): _train(
            _compiled(name, eight_devices[:n], preprocess=_augmenting_preprocess), chunks
        )
        for name, n in [("jit", 1), ("pmap", 1), ("pmap", 8), ("jit", 8)]
    }
    one, losses_one = runs["jit", 1]
    for key, (state, losses) in runs.items():
        np.testing.assert_allclose(losses, losses_one, rtol=1e-5, err_msg=str(key))
        assert_trees_close(state.params, one.params, rtol=1e-4, atol=1e-6)


def test_jit_batchnorm_and_grad_accumulation_on_8_devices_match_one_device(eight_devices):
    """jit is one global program: BatchNorm sees the global batch on any device count."""
    model = TinyCNN(use_bn=True)
    one, losses_one = _train(
        _compiled("jit", eight_devices[:1], model=model, grad_accum_steps=2), [4]
    )
    jit8, losses_8 = _train(_compiled("jit", eight_devices, model=model, grad_accum_steps=2), [4])
    np.testing.assert_allclose(losses_8, losses_one, rtol=1e-5)
    assert_trees_close(jit8.params, one.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(jit8.batch_stats, one.batch_stats, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("group", [1, 4])
def test_chunking_does_not_change_results_bit_for_bit(group):
    devices = jax.devices()[:1]
    one_by_one, losses_a = _train(_compiled("jit", devices), [1] * 10, group=group)  # epoch at 8
    chunked, losses_b = _train(_compiled("jit", devices), [5, 3, 2], group=group)
    assert_trees_equal(one_by_one, chunked)
    assert sum(losses_a) == pytest.approx(
        5 * losses_b[0] + 3 * losses_b[1] + 2 * losses_b[2], rel=1e-5
    )


@pytest.mark.parametrize("name", ["jit", "pmap"])
def test_grouped_steps_match_per_step_dispatch(name, eight_devices):
    devices = eight_devices[:2]
    grouped, _ = _train(_compiled(name, devices), [8, 2], group=3)
    single, _ = _train(_compiled(name, devices), [8, 2], group=1)
    assert int(grouped.step) == int(single.step) == 10
    assert_trees_close(grouped.params, single.params, rtol=1e-5, atol=1e-6)


def test_resident_batches_follow_the_data_order_contract():
    """Training on the resident split == training on host batches from order.batch_indices."""
    devices = jax.devices()[:1]
    images, labels = synthetic_arrays(N)
    resident_state, _ = _train(_compiled("jit", devices), [SPE, 2], data=(images, labels))

    fed = _compiled("jit", devices)
    state, sums = fed.init_state(IMAGE_SHAPE, jax.random.PRNGKey(0)), fed.zero_sums()
    for step in range(SPE + 2):
        idx = np.asarray(
            order.batch_indices(jax.random.PRNGKey(1), step, num_examples=N, batch_size=B)
        )
        state, sums = fed.train(
            state, sums, fed.put_batch({"image": images[idx], "label": labels[idx]})
        )
    assert_trees_close(resident_state.params, fed.host(state).params, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["jit", "pmap"])
def test_evaluation_counts_every_example_once(name, eight_devices):
    images, labels = synthetic_arrays(100)  # not a multiple of the eval batch (64)
    compiled = _compiled(name, eight_devices)
    state = compiled.init_state(IMAGE_SHAPE, jax.random.PRNGKey(0))
    sums = compiled.zero_sums(EVAL_SUMS)
    for batch in _feeder(images, labels, images, labels).eval_batches(compiled):
        sums = compiled.evaluate(state.variables(), sums, batch)
    metrics = summarize_eval(jax.device_get(compiled.host(sums)))
    assert metrics["count"] == 100
    host = compiled.host(state)
    logits = TinyCNN().apply(host.variables(), jnp.asarray(images, jnp.float32) / 255.0)
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    assert metrics["accuracy"] == pytest.approx(expected)


def test_nan_loss_is_reported_with_its_step():
    compiled = _compiled("jit", jax.devices()[:1], tx=optax.sgd(1e30))
    batches = _feeder(*synthetic_arrays(N)).train_batches(compiled, 0)
    state = compiled.init_state(IMAGE_SHAPE, jax.random.PRNGKey(0))
    state, sums = run_steps(compiled, state, compiled.zero_sums(), batches, 6, 1)
    bad = int(compiled.host(sums)["first_bad_step"])
    assert 0 < bad < 6
