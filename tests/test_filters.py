"""cnn_jax.filters: the hand-set kernels and apply_filter on grayscale, RGB and batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import correlate2d  # scipy comes with scikit-learn

from cnn_jax import filters, ops
from cnn_jax.errors import ShapeError

RNG = np.random.default_rng(0)
GRAY = RNG.uniform(0, 255, size=(7, 9)).astype(np.float32)
RGB = RNG.uniform(0, 255, size=(7, 9, 3)).astype(np.float32)


def reference(image2d, kernel, mode="same"):
    """Zero-padded 2-D cross-correlation (scipy), float64."""
    return correlate2d(np.asarray(image2d, np.float64), kernel, mode=mode, boundary="fill")


def test_kernel_constants():
    assert set(filters.KERNELS) >= {
        "sobel_x",
        "sobel_y",
        "edge_detect",
        "sharpen",
        "box_blur",
        "gaussian_blur",
        "sobel_vertical_edge",
        "sobel_horizontal_edge",
        "identity",
    }
    for name, k in filters.KERNELS.items():
        assert k.shape == (3, 3) and k.dtype == np.float32, name
        assert not k.flags.writeable, name
        assert filters.KERNELS[name] is getattr(filters, name.upper())
    np.testing.assert_array_equal(filters.SOBEL_X, [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    np.testing.assert_array_equal(filters.SOBEL_Y, filters.SOBEL_X.T)
    np.testing.assert_allclose(filters.GAUSSIAN_BLUR * 16, [[1, 2, 1], [2, 4, 2], [1, 2, 1]])
    np.testing.assert_allclose(filters.BOX_BLUR, np.full((3, 3), 1 / 9), rtol=1e-6)
    # Blurs and sharpen keep the mean brightness; edge detectors give 0 on flat regions.
    for k in (filters.BOX_BLUR, filters.GAUSSIAN_BLUR, filters.SHARPEN):
        assert k.sum() == pytest.approx(1.0)
    for k in (
        filters.SOBEL_X,
        filters.SOBEL_Y,
        filters.SOBEL_VERTICAL_EDGE,
        filters.SOBEL_HORIZONTAL_EDGE,
        filters.EDGE_DETECT,
        filters.VERTICAL_EDGE,
        filters.HORIZONTAL_EDGE,
    ):
        assert k.sum() == 0


# The LearnOpenCV guide's worked example: a 6x6 image and its vertical-edge Sobel kernel.
GUIDE_IMAGE = np.array(
    [
        [20, 24, 11, 12, 16, 19],
        [19, 17, 20, 23, 15, 9],
        [21, 40, 25, 13, 14, 8],
        [9, 18, 8, 6, 11, 22],
        [31, 3, 7, 9, 17, 23],
        [20, 12, 3, 11, 19, 30],
    ],
    np.float32,
)


def test_guide_worked_convolution_gives_3_and_27():
    guide_kernel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    # 3 = 20*1 + 11*(-1) + 19*2 + 20*(-2) + 21*1 + 25*(-1); 27 = 24 - 12 + 2*17 - 2*23 + 40 - 13.
    y = ops.conv2d(GUIDE_IMAGE[None, :, :, None], guide_kernel[:, :, None, None])
    assert y.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(y[0, 0, :2, 0], [3, 27])
    np.testing.assert_array_equal(filters.SOBEL_VERTICAL_EDGE, guide_kernel)
    named = filters.apply_filter(GUIDE_IMAGE, "sobel_vertical_edge", padding="VALID")
    np.testing.assert_array_equal(named, y[0, :, :, 0])
    # The gradient convention is the same filter with the opposite sign.
    np.testing.assert_array_equal(filters.SOBEL_X, -filters.SOBEL_VERTICAL_EDGE)
    np.testing.assert_array_equal(
        filters.apply_filter(GUIDE_IMAGE, filters.SOBEL_X, padding="VALID")[0, :2], [-3, -27]
    )
    np.testing.assert_array_equal(filters.SOBEL_HORIZONTAL_EDGE, -filters.SOBEL_Y)
    np.testing.assert_array_equal(filters.SOBEL_HORIZONTAL_EDGE, filters.SOBEL_VERTICAL_EDGE.T)


def test_identity_kernel_returns_the_image():
    np.testing.assert_array_equal(filters.apply_filter(GUIDE_IMAGE, "identity"), GUIDE_IMAGE)
    np.testing.assert_array_equal(filters.apply_filter(RGB, filters.IDENTITY), RGB)
    assert filters.IDENTITY.sum() == 1


@pytest.mark.parametrize("name", sorted(filters.KERNELS))
def test_grayscale_matches_scipy(name):
    kernel = filters.KERNELS[name]
    y = filters.apply_filter(GRAY, kernel)
    assert y.shape == GRAY.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, reference(GRAY, kernel), rtol=1e-5, atol=1e-3)
    valid = filters.apply_filter(GRAY, name, padding="VALID")
    assert valid.shape == (5, 7)
    np.testing.assert_allclose(valid, reference(GRAY, kernel, "valid"), rtol=1e-5, atol=1e-3)


def test_grayscale_forms_agree():
    a = filters.apply_filter(GRAY, filters.SHARPEN)
    b = filters.apply_filter(GRAY[:, :, None], filters.SHARPEN)
    c = filters.apply_filter(GRAY[None, :, :, None], filters.SHARPEN)
    assert a.shape == (7, 9) and b.shape == (7, 9, 1) and c.shape == (1, 7, 9, 1)
    np.testing.assert_array_equal(a, b[:, :, 0])
    np.testing.assert_array_equal(a, c[0, :, :, 0])


def test_rgb_is_filtered_per_channel():
    y = filters.apply_filter(RGB, filters.SOBEL_X)
    assert y.shape == RGB.shape
    for c in range(3):
        np.testing.assert_allclose(
            y[..., c], reference(RGB[..., c], filters.SOBEL_X), rtol=1e-5, atol=1e-3
        )
    # Independence: changing the red channel leaves green and blue untouched.
    changed = RGB.copy()
    changed[..., 0] = 0
    y2 = filters.apply_filter(changed, filters.SOBEL_X)
    np.testing.assert_array_equal(y2[..., 1:], y[..., 1:])


def test_batched_and_options():
    batch = np.stack([RGB, RGB[::-1]])
    y = filters.apply_filter(batch, "gaussian_blur", padding=1, stride=2)
    assert y.shape == (2, 4, 5, 3)
    full = filters.apply_filter(RGB[::-1], "gaussian_blur", padding="SAME")
    np.testing.assert_allclose(y[1], full[::2, ::2], rtol=1e-5, atol=1e-4)


def test_uint8_image_and_jit():
    img = (RGB).astype(np.uint8)
    y = filters.apply_filter(img, filters.BOX_BLUR)
    assert y.dtype == jnp.float32
    jitted = jax.jit(lambda im: filters.apply_filter(im, filters.BOX_BLUR))(img)
    np.testing.assert_allclose(jitted, y, rtol=1e-6)


def test_behaviour_on_simple_images():
    flat = np.full((6, 6), 5.0, np.float32)
    # Interior of a flat image: blurs keep it, edge detectors give 0.
    np.testing.assert_allclose(
        filters.apply_filter(flat, "box_blur", padding="VALID"), 5.0, rtol=1e-6
    )
    np.testing.assert_array_equal(filters.apply_filter(flat, "edge_detect", padding="VALID"), 0)
    # A ramp brightening to the right: SOBEL_X = 8 per unit step, SOBEL_Y = 0.
    ramp = np.tile(np.arange(6, dtype=np.float32), (6, 1))
    np.testing.assert_array_equal(filters.apply_filter(ramp, "sobel_x", padding="VALID"), 8)
    np.testing.assert_array_equal(filters.apply_filter(ramp, "sobel_y", padding="VALID"), 0)
    np.testing.assert_array_equal(filters.sobel_magnitude(ramp, padding="VALID"), 8)
    # The guides' bright-left/dark-right image: the vertical-edge filter lights up the middle.
    step = np.array([[10, 10, 10, 0, 0, 0]] * 6, np.float32)
    np.testing.assert_array_equal(
        filters.apply_filter(step, filters.VERTICAL_EDGE, padding="VALID"), [[0, 30, 30, 0]] * 4
    )


def test_sobel_magnitude_shapes():
    m = filters.sobel_magnitude(RGB)
    assert m.shape == RGB.shape
    gx = reference(RGB[..., 1], filters.SOBEL_X)
    gy = reference(RGB[..., 1], filters.SOBEL_Y)
    np.testing.assert_allclose(m[..., 1], np.hypot(gx, gy), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "image, kernel, fragments",
    [
        (GRAY, "emboss", ["kernel name", "'emboss'", "sobel_x"]),
        (GRAY, np.ones((3, 3, 1)), ["kernel", "2-D", "(3, 3, 1)"]),
        (np.zeros((2, 2, 2, 2, 2)), filters.SOBEL_X, ["image", "(2, 2, 2, 2, 2)"]),
        (np.zeros(5), filters.SOBEL_X, ["image", "(5,)"]),
    ],
)
def test_bad_arguments(image, kernel, fragments):
    with pytest.raises(ShapeError) as info:
        filters.apply_filter(image, kernel)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_kernel_larger_than_image_names_the_kernel():
    with pytest.raises(ShapeError, match="kernel 3x3"):
        filters.apply_filter(np.zeros((2, 2)), filters.SOBEL_X, padding="VALID")
