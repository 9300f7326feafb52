"""Image files as 8-bit pixels: the one place for the bit-depth rules, used by `predict` and by
the image-folder import.

Pillow opens a 16-bit greyscale image (PNG, TIFF, PGM) as mode 'I;16' (or 'I;16B', or 'I' for
PNG/PGM/PPM), and its `convert('L')` clips every value above 255 to white: a 16-bit picture
would silently become almost all white. Here 16-bit pixels are scaled to 8 bits
(round(v * 255 / 65535)). Pixels with no defined range (32-bit floats, mode 'F'; 32-bit
integers from other formats, mode 'I') are refused with a DataError naming the file. 16-bit
colour images need nothing: Pillow already reads them as 8-bit RGB(A).
"""

from __future__ import annotations

import numpy as np

from cnn_jax.errors import DataError

# Modes of 16-bit greyscale pixels (native, little- and big-endian).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Formats whose mode 'I' images are 16-bit greyscale scaled to 0..65535 by Pillow.
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")
# Greyscale modes: one channel after `to_8bit`.
GRAY_MODES = ("1", "L", "LA", "La", "I", "F", *SIXTEEN_BIT_MODES)


def is_grayscale(image) -> bool:
    """Whether a PIL image has one colour channel (possibly with alpha)."""
    return image.mode in GRAY_MODES


def to_8bit(image, what: str):
    """`image` with 8-bit channels: 16-bit greyscale scaled to mode 'L', other 8-bit modes
    unchanged. `what` names the file in the DataError for pixels of no defined range."""
    from PIL import Image

    mode = image.mode
    sixteen = mode in SIXTEEN_BIT_MODES or (mode == "I" and image.format in _SIXTEEN_BIT_I_FORMATS)
    if sixteen:
        pixels = np.asarray(image).astype(np.int64)
        low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
        if low < 0 or high > 65535:
            raise DataError(
                f"{what}: 16-bit pixels with values {low}..{high}, outside 0..65535; "
                "expected an 8- or 16-bit image"
            )
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode == "F" or mode.startswith("I"):
        kind = "floating-point" if mode == "F" else "integer"
        raise DataError(
            f"{what}: 32-bit {kind} pixels (Pillow mode {mode!r}) have no defined range; "
            "expected an 8- or 16-bit image (save it as an 8- or 16-bit PNG)"
        )
    return image


def to_mode(image, mode: str, what: str):
    """`image` converted to 8-bit `mode` ('L' or 'RGB'), 16-bit pixels scaled (`to_8bit`)."""
    return to_8bit(image, what).convert(mode)
