"""Preprocessing and augmentation of image batches on the device: pure and jit-able.

Every function takes a batch `images: [N, H, W, C]` (uint8 pixels 0..255 or float in the same
units) and, where random, a PRNG key: the same key gives the same output, and each example draws
its own crop offset and flip. Inside a compiled step, use `jax.random.fold_in(aug_key, step)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cnn_jax.errors import ShapeError


def _check_batch(images) -> None:
    if images.ndim != 4:
        raise ShapeError(f"images: expected a batch [N, H, W, C], got shape {tuple(images.shape)}")


def _size_2d(image_size) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
        raise ShapeError(f"image_size={image_size!r}: expected a positive size")
    return int(h), int(w)


def resize(images, image_size: int | Sequence[int]) -> jax.Array:
    """float32 [N, S, S, C] (or [N, h, w, C] for image_size=(h, w)), bilinear, antialiased
    when shrinking; pixel units are kept (0..255)."""
    _check_batch(images)
    h, w = _size_2d(image_size)
    n, _, _, c = images.shape
    x = images.astype(jnp.float32)
    if (h, w) == tuple(images.shape[1:3]):
        return x
    return jax.image.resize(x, (n, h, w, c), method="bilinear", antialias=True)


def _draws(draw, n: int, part: tuple | None) -> jax.Array:
    """draw(num_examples) for this batch: the whole batch's, or, for `part` = (start, total),
    rows start..start+n of the draw for `total` examples (a device's share of a global batch,
    so the randomness does not depend on how the batch is split over devices)."""
    if part is None:
        return draw(n)
    start, total = part
    return jax.lax.dynamic_slice_in_dim(draw(total), start, n)


def random_crop(images, key: jax.Array, padding: int, *, part: tuple | None = None) -> jax.Array:
    """Pads by `padding` zero pixels on each side, then crops each example back to [H, W] at a
    random offset in [0, 2 * padding] (a shift of up to `padding` pixels). Same dtype.
    `part` = (start, total): `images` are examples start.. of a batch of `total`."""
    _check_batch(images)
    if padding < 0:
        raise ShapeError(f"padding={padding!r}: expected an integer >= 0")
    if padding == 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = _draws(lambda m: jax.random.randint(key, (m, 2), 0, 2 * padding + 1), n, part)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(images, key: jax.Array, *, part: tuple | None = None) -> jax.Array:
    """Mirrors each example left-right with probability 1/2. Same dtype. `part`: as for
    `random_crop`."""
    _check_batch(images)
    flip = _draws(lambda m: jax.random.bernoulli(key, 0.5, (m, 1, 1, 1)), images.shape[0], part)
    return jnp.where(flip, images[:, :, ::-1, :], images)


def normalize(images, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """float32 (pixel / 255 - mean) / std per channel; mean and std in [0, 1] pixel units."""
    _check_batch(images)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    if mean.shape not in ((), (images.shape[-1],)) or std.shape != mean.shape:
        raise ShapeError(
            f"mean/std: expected one value per channel ({images.shape[-1]}), "
            f"got shapes {mean.shape} and {std.shape}"
        )
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def preprocess(
    images_u8,
    key: jax.Array,
    *,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | Sequence[int] | None = None,
    crop_padding: int = 0,
    flip: bool = False,
    part: tuple | None = None,
) -> jax.Array:
    """uint8 [N, H, W, C] -> float32 model input [N, S, S, C].

    Resize to `image_size` (if given and different), then, when `train`, a random crop with
    `crop_padding` and a random horizontal flip (if `flip`), then per-channel normalisation.
    Evaluation (`train=False`) ignores the key. `train`, `image_size`, `crop_padding` and `flip`
    must be static under jit. `part` = (start, total): the batch is examples start.. of a global
    batch of `total` (one device's share under pmap), augmented as they would be in the whole.
    """
    _check_batch(images_u8)
    x = images_u8.astype(jnp.float32)
    if image_size:
        x = resize(x, image_size)
    if train:
        crop_key, flip_key = jax.random.split(key)
        x = random_crop(x, crop_key, crop_padding, part=part)
        if flip:
            x = random_flip(x, flip_key, part=part)
    return normalize(x, mean, std)
