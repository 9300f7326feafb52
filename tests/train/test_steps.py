"""The pure train/eval steps: loss, metrics, masking, BatchNorm, dropout, accumulation, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import IMAGE_SHAPE, TinyCNN, assert_trees_close, synthetic_arrays

from cnn_jax.train.state import create_train_state
from cnn_jax.train.steps import (
    correct_top_k,
    cross_entropy,
    make_eval_step,
    make_train_step,
    summarize_eval,
)


def _batch(n=16, seed=0):
    images, labels = synthetic_arrays(n, seed)
    return {"image": jnp.asarray(images, jnp.float32) / 255.0, "label": jnp.asarray(labels)}


def _state(model, tx=None, seed=0):
    tx = tx or optax.sgd(0.1)
    return create_train_state(model, tx, IMAGE_SHAPE, jax.random.PRNGKey(seed)), tx


def test_cross_entropy_and_label_smoothing_match_the_formula():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 1])
    logp = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(
        cross_entropy(logits, labels), -logp[jnp.arange(2), labels], rtol=1e-6
    )
    eps, k = 0.3, 3
    smooth = jax.nn.one_hot(labels, k) * (1 - eps) + eps / k
    np.testing.assert_allclose(
        cross_entropy(logits, labels, eps), -(smooth * logp).sum(-1), rtol=1e-6
    )


def test_top1_and_top5():
    logits = jnp.array([[0, 1, 2, 3, 4, 5, 6.0], [6, 5, 4, 3, 2, 1, 0.0]])
    top1, top5 = correct_top_k(logits, jnp.array([6, 6]))
    np.testing.assert_array_equal(top1, [1, 0])
    np.testing.assert_array_equal(top5, [1, 0])  # label 6 ranks 7th in row 2
    _, top5 = correct_top_k(logits, jnp.array([2, 4]))
    np.testing.assert_array_equal(top5, [1, 1])


def test_eval_masks_padding():
    model = TinyCNN()
    state, _ = _state(model)
    batch = _batch(16)
    eval_step = jax.jit(make_eval_step(model))
    full = summarize_eval(eval_step(state.variables(), {**batch, "mask": jnp.ones(16)}))
    first = summarize_eval(eval_step(state.variables(), {k: v[:10] for k, v in batch.items()}))
    padded = {**batch, "mask": jnp.array([1.0] * 10 + [0.0] * 6)}
    masked = summarize_eval(eval_step(state.variables(), padded))
    assert masked["count"] == 10 and full["count"] == 16
    assert masked["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert masked["accuracy"] == pytest.approx(first["accuracy"])


def test_train_step_updates_params_step_and_batchnorm_stats():
    model = TinyCNN(use_bn=True)
    state, tx = _state(model)
    step = jax.jit(make_train_step(model, tx))
    new, metrics = step(state, _batch())
    assert int(new.step) == 1
    assert set(metrics) == {"loss", "accuracy", "top5_accuracy"}
    before, after = state.batch_stats["BatchNorm_0"]["mean"], new.batch_stats["BatchNorm_0"]["mean"]
    assert not np.allclose(before, after)  # running averages move in training
    # ...and evaluation uses them (not the batch statistics): a one-example batch gives the
    # same logits alone as inside a larger batch.
    x = _batch()["image"]
    alone = model.apply(new.variables(), x[:1], train=False)
    together = model.apply(new.variables(), x, train=False)[:1]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)


def test_dropout_rng_is_folded_per_step():
    model = TinyCNN(dropout_rate=0.5)
    state, tx = _state(model, optax.sgd(0.0))  # lr 0: params fixed, only the mask changes
    step = jax.jit(make_train_step(model, tx))
    batch = _batch()
    s1, m1 = step(state, batch)
    _, m1_again = step(state, batch)
    _, m2 = step(s1, batch)
    assert float(m1["loss"]) == float(m1_again["loss"])  # same step -> same mask
    assert float(m1["loss"]) != float(m2["loss"])  # next step -> new mask


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_full_batch(k):
    model = TinyCNN()
    tx = optax.adam(1e-2)
    state, _ = _state(model, tx)
    batch = _batch(16)
    full = jax.jit(make_train_step(model, tx))
    accum = jax.jit(make_train_step(model, tx, grad_accum_steps=k))
    s_full, m_full = full(state, batch)
    s_acc, m_acc = accum(state, batch)
    for _ in range(2):
        s_full, m_full = full(s_full, batch)
        s_acc, m_acc = accum(s_acc, batch)
    assert_trees_close(s_full.params, s_acc.params, rtol=1e-5, atol=1e-6)
    assert float(m_full["loss"]) == pytest.approx(float(m_acc["loss"]), rel=1e-5)
    assert float(m_full["accuracy"]) == pytest.approx(float(m_acc["accuracy"]))


def test_half_precision_computes_in_bfloat16_with_float32_params():
    f32, bf16 = TinyCNN(), TinyCNN(dtype=jnp.bfloat16)
    tx = optax.sgd(0.1)
    state, _ = _state(f32, tx)
    batch = _batch()
    _, inter = bf16.apply(
        state.variables(), batch["image"], capture_intermediates=True, mutable=["intermediates"]
    )
    assert inter["intermediates"]["Conv_0"]["__call__"][0].dtype == jnp.bfloat16
    s32, m32 = jax.jit(make_train_step(f32, tx))(state, batch)
    s16, m16 = jax.jit(make_train_step(bf16, tx))(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    assert_trees_close(s32.params, s16.params, rtol=5e-2, atol=5e-3)
