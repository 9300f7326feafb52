"""Bit depths (issue 12 item 10): 16-bit greyscale images are scaled to 8 bits, not clipped to
white, wherever images are read (`predict.read_image`, the image-folder import); pixels of no
defined range (32-bit) are refused with a message naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax.data import get_dataset_info, import_dataset, load_split_arrays
from cnn_jax.data.images import to_8bit
from cnn_jax.errors import DataError
from cnn_jax.predict import read_image

# A ramp over the whole 16-bit range: clipping (Pillow's convert('L')) makes 99% of it white.
RAMP = (np.arange(6 * 8).reshape(6, 8) * (65535 // 47)).astype(np.uint16)


def expected_8bit(pixels: np.ndarray) -> np.ndarray:
    return np.round(pixels.astype(np.float64) * 255 / 65535).astype(np.uint8)


def save_16bit(path: Path, pixels: np.ndarray) -> Path:
    """16-bit greyscale `pixels` as PNG (Pillow mode I;16), big-endian TIFF (I;16B), or PGM
    (read back as mode I)."""
    h, w = pixels.shape
    if path.suffix == ".pgm":
        path.write_bytes(b"P5\n%d %d\n65535\n" % (w, h) + pixels.astype(">u2").tobytes())
    elif path.suffix == ".tif":
        Image.frombytes("I;16B", (w, h), pixels.astype(">u2").tobytes()).save(path)
    else:
        Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("suffix, mode", [(".png", "I;16"), (".tif", "I;16B"), (".pgm", "I")])
def test_to_8bit_scales_16_bit_greyscale(tmp_path, suffix, mode):
    with Image.open(save_16bit(tmp_path / f"ramp{suffix}", RAMP)) as image:
        assert image.mode == mode
        out = to_8bit(image, "ramp")
    assert out.mode == "L"
    assert np.array_equal(np.asarray(out), expected_8bit(RAMP))


@pytest.mark.parametrize(
    "array, fragment",
    [
        (RAMP.astype(np.float32) / 65535, "32-bit floating-point pixels (Pillow mode 'F')"),
        (RAMP.astype(np.int32) * 1000, "32-bit integer pixels (Pillow mode 'I')"),
    ],
)
def test_32_bit_pixels_are_refused(tmp_path, array, fragment):
    path = tmp_path / "deep.tif"
    Image.fromarray(array).save(path)
    with Image.open(path) as image, pytest.raises(DataError, match="deep.tif: ") as e:
        to_8bit(image, str(path))
    assert fragment in str(e.value) and "expected an 8- or 16-bit image" in str(e.value)


def test_8_bit_images_are_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with Image.open(tmp_path / "rgb.png") as image:
        assert to_8bit(image, "rgb.png") is image


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
def test_read_image_scales_16_bit(tmp_path, suffix):
    """`predict` reads a 16-bit picture as its 8-bit version (not 99% white)."""
    path = save_16bit(tmp_path / f"ramp{suffix}", RAMP)
    Image.fromarray(expected_8bit(RAMP)).save(tmp_path / "ramp8.png")
    for shape in ((6, 8, 1), (12, 16, 1), (6, 8, 3)):
        got = read_image(path, shape)
        want = read_image(tmp_path / "ramp8.png", shape)
        assert np.abs(got.astype(int) - want).max() <= 1, shape
    assert read_image(path, (6, 8, 1)).mean() == pytest.approx(expected_8bit(RAMP).mean(), abs=1)


def test_read_image_refuses_float_pixels(tmp_path):
    Image.fromarray(RAMP.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"image '.*float.tif': 32-bit floating-point pixels"):
        read_image(tmp_path / "float.tif", (6, 8, 1))


def test_image_folder_import_of_16_bit_pngs(tmp_path):
    """Each class keeps its 16-bit pictures' content (scaled), one channel; mixed with 8-bit
    greyscale and 16-bit TIFFs."""
    rng = np.random.default_rng(0)
    tree, want = tmp_path / "tree", {}
    for cls in ("dark", "bright"):
        (tree / cls).mkdir(parents=True)
        for i, suffix in enumerate((".png", ".tif", ".png")):
            high = 20_000 if cls == "dark" else 65_535
            pixels = rng.integers(0, high, (6, 8), dtype=np.uint16)
            save_16bit(tree / cls / f"img{i}{suffix}", pixels)
            want[f"{cls}/img{i}{suffix}"] = expected_8bit(pixels)
    Image.fromarray(np.full((6, 8), 77, np.uint8)).save(tree / "dark" / "img8.png")
    want["dark/img8.png"] = np.full((6, 8), 77, np.uint8)
    import_dataset("depths", tree, tmp_path / "data")
    info = get_dataset_info("depths", data_dir=str(tmp_path / "data"))
    assert info.image_shape == (6, 8, 1)
    x, y = load_split_arrays("depths", "train", data_dir=str(tmp_path / "data"))
    got = sorted(im[..., 0].tobytes() for im in x)
    assert got == sorted(v.tobytes() for v in want.values())
    dark = x[y == info.class_names.index("dark")]
    assert dark.max() <= 255 * 20_000 // 65535 + 1 < 255  # not constant white
    everything = np.stack(list(want.values())) / 255
    np.testing.assert_allclose(info.mean, [everything.mean()], atol=1e-5)


def test_image_folder_import_refuses_float_pixels(tmp_path):
    tree = tmp_path / "tree"
    for cls in ("a", "b"):
        (tree / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tree / cls / "ok.png")
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tree / "b" / "float.tif")
    with pytest.raises(DataError, match=r"b/float.tif: 32-bit floating-point pixels"):
        import_dataset("floats", tree, tmp_path / "data")
    assert not (tmp_path / "data" / "floats").exists()
