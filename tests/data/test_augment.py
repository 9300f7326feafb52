"""On-device preprocessing: determinism and what each piece really does."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.data import normalize, preprocess, random_crop, random_flip, resize
from cnn_jax.errors import ShapeError

KEY = jax.random.PRNGKey(0)


def _images(n=16, h=8, w=8, c=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8))


def test_flip_really_flips_about_half():
    x = _images(64)
    y = np.asarray(random_flip(x, KEY))
    flipped = [np.array_equal(y[i], np.asarray(x[i])[:, ::-1]) for i in range(64)]
    kept = [np.array_equal(y[i], np.asarray(x[i])) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48
    assert np.array_equal(random_flip(x, KEY), y) and y.dtype == np.uint8  # deterministic


def test_crop_shifts_with_zero_padding():
    x = jnp.arange(1, 26, dtype=jnp.float32).reshape(1, 5, 5, 1).repeat(200, axis=0)
    y = np.asarray(random_crop(x, KEY, 2))
    assert y.shape == x.shape
    padded = np.pad(np.asarray(x[0, :, :, 0]), 2)
    offsets = set()
    for img in y[..., 0]:
        match = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(padded[dy : dy + 5, dx : dx + 5], img)]  # fmt: skip
        assert len(match) == 1  # every output is one shifted window of the zero-padded image
        offsets.add(match[0])
    assert len(offsets) == 25  # all shifts -2..2 in both axes occur
    assert np.array_equal(random_crop(x, KEY, 2), y)
    assert random_crop(x, KEY, 0) is x


def test_normalize_values():
    x = jnp.array([[[[0, 255, 51]]]], jnp.uint8)
    y = normalize(x, mean=(0.5, 0.5, 0.2), std=(0.5, 0.25, 0.1))
    np.testing.assert_allclose(y[0, 0, 0], [-1.0, 2.0, 0.0], atol=1e-6)
    assert y.dtype == jnp.float32
    with pytest.raises(ShapeError, match="one value per channel"):
        normalize(x, mean=(0.5, 0.5), std=(0.5, 0.5))


def test_resize():
    x = jnp.full((2, 8, 8, 1), 200, jnp.uint8)
    y = resize(x, 32)
    assert y.shape == (2, 32, 32, 1) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, 200.0, atol=1e-3)
    assert resize(x, (4, 6)).shape == (2, 4, 6, 1)


def test_preprocess_eval_is_resize_and_normalize_only():
    x = _images(4, 8, 8, 1)
    kw = {"mean": (0.3,), "std": (0.4,), "image_size": 16, "crop_padding": 4, "flip": True}
    a = preprocess(x, KEY, train=False, **kw)
    b = preprocess(x, jax.random.PRNGKey(9), train=False, **kw)
    assert np.array_equal(a, b) and a.shape == (4, 16, 16, 1) and a.dtype == jnp.float32
    np.testing.assert_allclose(a, normalize(resize(x, 16), (0.3,), (0.4,)), atol=1e-6)


def test_preprocess_train_is_deterministic_per_key_and_jits():
    x = _images(8)
    fn = jax.jit(functools.partial(
        preprocess, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=2, flip=True
    ))  # fmt: skip
    a, b, c = fn(x, KEY), fn(x, KEY), fn(x, jax.random.PRNGKey(1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    eager = preprocess(
        x, KEY, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=2, flip=True
    )
    np.testing.assert_allclose(a, eager, atol=1e-6)


def test_rank_is_checked():
    with pytest.raises(ShapeError, match=r"\[N, H, W, C\]"):
        preprocess(jnp.zeros((8, 8, 1), jnp.uint8), KEY, train=False, mean=(0.5,), std=(0.5,))
