"""Tiny models, synthetic data and configs shared by the training-engine tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.config import apply_overrides, default_config

REPO = Path(__file__).resolve().parents[2]
IMAGE_SHAPE = (8, 8, 1)


class TinyCNN(nn.Module):
    """conv 4@3x3 -> (BatchNorm) -> relu -> (dropout) -> global mean -> dense."""

    num_classes: int = 10
    use_bn: bool = False
    dropout_rate: float = 0.0
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        # No conv bias before BatchNorm: its gradient is pure rounding noise, which Adam would
        # blow up into different updates on different device counts.
        x = nn.Conv(4, (3, 3), use_bias=not self.use_bn, dtype=self.dtype)(x)
        if self.use_bn:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        x = nn.relu(x)
        if self.dropout_rate:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def synthetic_arrays(n: int = 256, seed: int = 0, shape=IMAGE_SHAPE, classes: int = 10):
    """Learnable uint8 images [n, *shape] (class prototype + noise) and int32 labels [n]."""
    rng = np.random.RandomState(seed)
    protos = np.random.RandomState(99).randint(0, 256, (classes, *shape))
    labels = rng.randint(0, classes, n).astype(np.int32)
    images = ((protos[labels] + rng.randint(0, 256, (n, *shape))) // 2).astype(np.uint8)
    return images, labels


def simple_preprocess(images_u8, key, train, part=None):
    """uint8 -> float32 in [0, 1]; deterministic (no augmentation)."""
    del key, train, part
    return images_u8.astype(jnp.float32) / 255.0


def tiny_config(*overrides: str):
    """A synthetic-data run that trains a 2-layer model in seconds (32 steps per epoch)."""
    config = default_config()
    config = apply_overrides(
        config,
        [
            "dataset.name=synthetic",
            "dataset.synthetic_shape=[8, 8, 1]",
            "dataset.synthetic_size=256",
            "model.name=simple_convnet",
            "model.options.features=[4]",
            "model.options.hidden_features=[8]",
            "model.options.dropout_rate=0.0",
            "train.batch_size=8",
            "train.eval_batch_size=64",
            "train.num_epochs=2",
            "train.log_every_steps=10",
            "optimizer.learning_rate=0.01",
            "checkpoint.async_save=True",
            *overrides,
        ],
    )
    return config


def tree_arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
    """Bit-for-bit equality of two pytrees of arrays."""
    la, lb = tree_arrays(a), tree_arrays(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, lb = tree_arrays(a), tree_arrays(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts -> {'a/b/c': leaf}."""
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in flatten(v, f"{prefix}{k}/").items()}
    return {prefix.rstrip("/"): tree}


def run_script(args, *, env=None, devices: int = 1, timeout: int = 300, **popen):
    """Runs `python tests/train/run_training.py ARGS` with `devices` forced CPU devices."""
    full_env = dict(os.environ)
    full_env.update(
        {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(REPO),
        }
    )
    full_env.update(env or {})
    cmd = [sys.executable, str(Path(__file__).with_name("run_training.py")), *map(str, args)]
    return subprocess.Popen(cmd, env=full_env, cwd=str(REPO), **popen)


def config_arg(config) -> str:
    return json.dumps(config.to_dict())
