"""The classic hand-set 3x3 kernels from the CNN guides, applied with `ops.conv2d`.

All kernels are read-only numpy float32 arrays of shape [3, 3], written for cross-correlation
(the kernel is not flipped), the convention of `ops.conv2d` and every DL framework.

Edge kernels come in two sign conventions, both in use:
  * gradient convention: `SOBEL_X` = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] is positive where
    intensity increases to the right (the sign of d/dx, as in OpenCV's `Sobel`), `SOBEL_Y` where it
    increases downward;
  * edge-detector convention, the guides' (LearnOpenCV's worked example): `SOBEL_VERTICAL_EDGE` =
    [[1, 0, -1], [2, 0, -2], [1, 0, -1]] = -`SOBEL_X` is positive for bright-left/dark-right,
    `SOBEL_HORIZONTAL_EDGE` = -`SOBEL_Y` for bright-top/dark-bottom, like the plain (unweighted)
    `VERTICAL_EDGE` / `HORIZONTAL_EDGE`. (Applied as a true, flipped convolution, the guides' kernel
    gives the gradient's sign: that is where the two conventions come from.)
Both conventions find the same edges; only the sign of the response differs. `IDENTITY` returns the
image unchanged (the guides' "identity" kernel beside edge, sharpen and blur).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import ops
from cnn_jax.errors import ShapeError

__all__ = [
    "BOX_BLUR",
    "EDGE_DETECT",
    "GAUSSIAN_BLUR",
    "HORIZONTAL_EDGE",
    "IDENTITY",
    "KERNELS",
    "SHARPEN",
    "SOBEL_HORIZONTAL_EDGE",
    "SOBEL_VERTICAL_EDGE",
    "SOBEL_X",
    "SOBEL_Y",
    "VERTICAL_EDGE",
    "apply_filter",
    "sobel_magnitude",
]


def _const(rows: list[list[float]], scale: float = 1.0) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32) * np.float32(scale)
    a.setflags(write=False)  # shared module constants: nobody may edit them in place
    return a


SOBEL_X = _const([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
SOBEL_Y = _const([[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
# The guides' Sobel kernels (edge-detector convention): the negatives of SOBEL_X / SOBEL_Y.
SOBEL_VERTICAL_EDGE = _const([[1, 0, -1], [2, 0, -2], [1, 0, -1]])
SOBEL_HORIZONTAL_EDGE = _const([[1, 2, 1], [0, 0, 0], [-1, -2, -1]])
VERTICAL_EDGE = _const([[1, 0, -1], [1, 0, -1], [1, 0, -1]])
HORIZONTAL_EDGE = _const([[1, 1, 1], [0, 0, 0], [-1, -1, -1]])
EDGE_DETECT = _const([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]])  # Laplacian (8-neighbour)
SHARPEN = _const([[0, -1, 0], [-1, 5, -1], [0, -1, 0]])
BOX_BLUR = _const([[1, 1, 1], [1, 1, 1], [1, 1, 1]], 1 / 9)
GAUSSIAN_BLUR = _const([[1, 2, 1], [2, 4, 2], [1, 2, 1]], 1 / 16)
IDENTITY = _const([[0, 0, 0], [0, 1, 0], [0, 0, 0]])

KERNELS: dict[str, np.ndarray] = {
    "sobel_x": SOBEL_X,
    "sobel_y": SOBEL_Y,
    "sobel_vertical_edge": SOBEL_VERTICAL_EDGE,
    "sobel_horizontal_edge": SOBEL_HORIZONTAL_EDGE,
    "vertical_edge": VERTICAL_EDGE,
    "horizontal_edge": HORIZONTAL_EDGE,
    "edge_detect": EDGE_DETECT,
    "sharpen": SHARPEN,
    "box_blur": BOX_BLUR,
    "gaussian_blur": GAUSSIAN_BLUR,
    "identity": IDENTITY,
}


def apply_filter(
    image: jax.Array,
    kernel: jax.Array | str,
    *,
    padding: ops.Padding = "SAME",
    stride: int | tuple[int, int] = 1,
) -> jax.Array:
    """Filter every channel of `image` independently (depthwise) with one 2-D kernel.

    image: [H, W] or [H, W, C] (grayscale or e.g. RGB) or a batch [N, H, W, C], any real dtype;
    kernel: [KH, KW] array or a name in `KERNELS`. Returns float (float32 unless the image is a
    wider float) of the same rank, with H, W changed by `padding`/`stride` as in `ops.conv2d`
    (the default "SAME" with stride 1 keeps the size).
    """
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ShapeError(
                f"apply_filter: unknown kernel name {kernel!r}; expected one of {sorted(KERNELS)}"
            )
        kernel = KERNELS[kernel]
    image, kernel = jnp.asarray(image), jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ShapeError(
            f"apply_filter: kernel must be 2-D [KH, KW], got shape {tuple(kernel.shape)}"
        )
    if image.ndim == 2:
        x = image[None, :, :, None]
    elif image.ndim == 3:
        x = image[None]
    elif image.ndim == 4:
        x = image
    else:
        raise ShapeError(
            f"apply_filter: image must be [H, W], [H, W, C] or [N, H, W, C], got "
            f"shape {tuple(image.shape)}"
        )
    dtype = (
        jnp.promote_types(x.dtype, jnp.float32)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else jnp.float32
    )
    channels = x.shape[-1]
    # Depthwise: one copy of the kernel per channel, groups=C -> HWIO [KH, KW, 1, C].
    k = jnp.broadcast_to(kernel.astype(dtype)[:, :, None, None], (*kernel.shape, 1, channels))
    y = ops.conv2d(x.astype(dtype), k, stride=stride, padding=padding, groups=channels)
    if image.ndim == 2:
        return y[0, :, :, 0]
    if image.ndim == 3:
        return y[0]
    return y


def sobel_magnitude(image: jax.Array, *, padding: ops.Padding = "SAME") -> jax.Array:
    """Gradient magnitude sqrt(Gx^2 + Gy^2) per channel, with `SOBEL_X` / `SOBEL_Y`.

    Same shapes as `apply_filter`.
    """
    gx = apply_filter(image, SOBEL_X, padding=padding)
    gy = apply_filter(image, SOBEL_Y, padding=padding)
    return jnp.sqrt(gx * gx + gy * gy)
