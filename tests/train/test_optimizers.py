"""Learning-rate schedules, optimizer choice, weight-decay masks and clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import tiny_config

from cnn_jax.errors import ConfigError
from cnn_jax.train.optimizers import decay_mask, learning_rate_schedule, make_optimizer


def _schedule(*overrides, spe=10, total=100):
    return learning_rate_schedule(tiny_config(*overrides), spe, total)


def test_constant_schedule():
    s = _schedule("optimizer.learning_rate=0.5")
    assert [float(s(i)) for i in (0, 50, 99)] == [0.5, 0.5, 0.5]


def test_warmup_then_cosine():
    s = _schedule(
        "optimizer.schedule=cosine", "optimizer.warmup_epochs=2", "optimizer.learning_rate=1.0"
    )
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(0.5)  # halfway through the 20 warmup steps
    assert float(s(20)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.5, abs=1e-6)  # cosine midpoint of the 80 decay steps
    assert float(s(100)) == pytest.approx(0.0, abs=1e-7)


def test_step_schedule_boundaries_are_fractions_of_training():
    s = _schedule(
        "optimizer.schedule=step",
        "optimizer.step_boundaries=[0.5, 0.75]",
        "optimizer.step_factor=0.1",
    )
    lr = 0.01
    assert float(s(49)) == pytest.approx(lr)
    assert float(s(50)) == pytest.approx(lr * 0.1)
    assert float(s(75)) == pytest.approx(lr * 0.01)


def test_warmup_longer_than_training_is_rejected():
    with pytest.raises(ConfigError, match="optimizer.warmup_epochs"):
        _schedule("optimizer.warmup_epochs=20")


def test_decay_mask_skips_biases_and_norm_scales():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)},
        "bn": {"scale": jnp.ones(4)},
    }
    assert decay_mask(params) == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False}}


def _one_update(opt_overrides, grads, params):
    tx = make_optimizer(tiny_config(*opt_overrides), 10, 100)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


PARAMS = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
ZERO_GRADS = jax.tree.map(jnp.zeros_like, PARAMS)


def test_sgd_l2_weight_decay_is_masked():
    u = _one_update(
        ["optimizer.name=sgd", "optimizer.learning_rate=0.1", "optimizer.weight_decay=0.5"],
        ZERO_GRADS,
        PARAMS,
    )
    np.testing.assert_allclose(u["kernel"], -0.1 * 0.5 * 2.0)  # L2 gradient wd * p, times -lr
    np.testing.assert_allclose(u["bias"], 0.0)


def test_adamw_decay_is_decoupled_and_masked():
    u = _one_update(
        ["optimizer.name=adamw", "optimizer.learning_rate=0.1", "optimizer.weight_decay=0.5"],
        ZERO_GRADS,
        PARAMS,
    )
    np.testing.assert_allclose(
        u["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6
    )  # lr * wd * p, no Adam scaling
    np.testing.assert_allclose(u["bias"], 0.0)


def test_adam_l2_decay_goes_through_the_adam_scaling():
    u = _one_update(
        ["optimizer.name=adam", "optimizer.learning_rate=0.1", "optimizer.weight_decay=0.5"],
        ZERO_GRADS,
        PARAMS,
    )
    np.testing.assert_allclose(u["kernel"], -0.1, rtol=1e-4)  # first Adam step has size lr
    np.testing.assert_allclose(u["bias"], 0.0)


def test_sgd_nesterov_matches_optax():
    grads = {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.full((2,), -1.0)}
    overrides = [
        "optimizer.name=sgd",
        "optimizer.learning_rate=0.1",
        "optimizer.nesterov=True",
        "optimizer.momentum=0.9",
    ]
    tx = make_optimizer(tiny_config(*overrides), 10, 100)
    ref = optax.sgd(0.1, momentum=0.9, nesterov=True)
    s, r = tx.init(PARAMS), ref.init(PARAMS)
    for _ in range(3):
        u, s = tx.update(grads, s, PARAMS)
        v, r = ref.update(grads, r, PARAMS)
        np.testing.assert_allclose(u["kernel"], v["kernel"], rtol=1e-6)


def test_global_norm_clipping():
    grads = {"kernel": jnp.full((2, 2), 30.0), "bias": jnp.full((2,), 40.0)}
    overrides = [
        "optimizer.name=sgd",
        "optimizer.momentum=0.0",
        "optimizer.learning_rate=1.0",
        "optimizer.grad_clip_norm=1.0",
    ]
    u = _one_update(overrides, grads, PARAMS)
    norm = float(optax.tree.norm(u))
    assert norm == pytest.approx(1.0, rel=1e-5)
