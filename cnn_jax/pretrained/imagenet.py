"""ImageNet prediction with converted weights: the 1,000 class names, torchvision's eval-time
image transform and the named input preprocessings of the pretrained weights.

Images go through the geometry of torchvision's ImageNet evaluation (`resize_and_crop`: the
shorter side resized to 256 with Pillow's antialiased bilinear filter, then the central 224x224
crop: exactly what `transforms.Resize(256)` + `transforms.CenterCrop(224)` do to a PIL image),
then one of the `PREPROCESSINGS`, which turn the uint8 pixels into the model's input:

  * "torchvision": x / 255, minus the ImageNet mean, divided by the std (RGB), the input of every
    torchvision classification model (and of their converted twins);
  * "keras_vgg": RGB -> BGR and the ImageNet mean (in 0..255) subtracted, no std: Keras'
    `keras.applications.vgg16.preprocess_input` ("caffe" mode), the input of Keras' VGG weights.

The class names need no download: tensorflow-datasets ships them as package files
(`datasets/siscore/labels.py`, in torchvision's index order, and `datasets/imagenet2012/
labels.txt`, the WordNet ids), read here as text without importing TensorFlow.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

import numpy as np

from cnn_jax.errors import ConfigError, DataError, ShapeError

NUM_CLASSES = 1000
RESIZE, CROP = 256, 224  # torchvision's ImageNet evaluation: resize the shorter side, crop
TORCHVISION_MEAN = (0.485, 0.456, 0.406)  # RGB, of pixels in [0, 1]
TORCHVISION_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # Keras' "caffe" mode, pixels in [0, 255]


def _normalize_torchvision(images_u8: np.ndarray) -> np.ndarray:
    x = np.asarray(images_u8, np.float32) / 255.0
    return (x - np.float32(TORCHVISION_MEAN)) / np.float32(TORCHVISION_STD)


def _normalize_keras_vgg(images_u8: np.ndarray) -> np.ndarray:
    x = np.asarray(images_u8, np.float32)[..., ::-1]  # RGB -> BGR
    return x - np.float32(CAFFE_MEAN_BGR)


# name -> uint8 RGB [..., H, W, 3] -> float32 model input of the same shape
PREPROCESSINGS = {"torchvision": _normalize_torchvision, "keras_vgg": _normalize_keras_vgg}


def preprocess(images_u8: np.ndarray, preprocessing: str = "torchvision") -> np.ndarray:
    """uint8 RGB images [..., H, W, 3] -> float32 model input with the named preprocessing."""
    try:
        normalize = PREPROCESSINGS[preprocessing]
    except (KeyError, TypeError):
        raise ConfigError(
            f"preprocessing {preprocessing!r} is not known; expected one of {list(PREPROCESSINGS)}"
        ) from None
    images = np.asarray(images_u8)
    if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
        raise DataError(
            f"expected uint8 RGB images [..., H, W, 3], got {images.dtype} {images.shape}"
        )
    return normalize(images)


# ----------------------------------------------------------------------------------------------
# torchvision's eval-time geometry
# ----------------------------------------------------------------------------------------------


def resized_size(width: int, height: int, resize: int = RESIZE) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `resize`, the longer in proportion,
    rounded down (torchvision's `_compute_resized_output_size` for a one-number size)."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def center_crop(image: np.ndarray, crop: int = CROP) -> np.ndarray:
    """The central crop x crop pixels of [H, W, C], offsets rounded as torchvision's
    `center_crop` does (Python's round of half the margin)."""
    h, w = image.shape[:2]
    if h < crop or w < crop:
        raise ShapeError(f"cannot crop {crop}x{crop} pixels from an image of shape {image.shape}")
    top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)  # as torchvision rounds
    return image[top : top + crop, left : left + crop]


def read_image(path: str | Path, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """An image file as uint8 RGB [crop, crop, 3], as torchvision's ImageNet evaluation sees it:
    shorter side resized to `resize` (Pillow's bilinear filter, antialiased when shrinking, which
    is what torchvision's `Resize` runs on PIL images), then the central crop. Greyscale and
    16-bit images become RGB as in `cnn_jax.predict.read_image`, which does the reading and
    raises DataError for missing, corrupt or oversized files."""
    from cnn_jax import predict

    if not 0 < crop <= resize:
        raise ConfigError(f"crop={crop!r} must be in 1..resize (resize={resize!r})")
    width, height = _image_size(Path(path))
    new_width, new_height = resized_size(width, height, resize)
    return center_crop(predict.read_image(path, (new_height, new_width, 3)), crop)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header; a file Pillow cannot open is handed to
    `predict.read_image`, whose DataError says what is wrong with it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, Image.DecompressionBombError):
        from cnn_jax import predict

        predict.read_image(path, (1, 1, 3))  # raises the DataError for this file
        raise


# ----------------------------------------------------------------------------------------------
# Class names
# ----------------------------------------------------------------------------------------------


def _tfds_file(relative: str) -> Path:
    """A file of the installed tensorflow-datasets package, found without importing it."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the ImageNet class names come from the tensorflow-datasets package, which is not "
            "installed: pip install 'cnn_jax[full]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{str(path)!r} is missing from the installed tensorflow-datasets")
    return path


@functools.cache
def class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in torchvision's (and Keras') index order, e.g. index 0
    'tench, Tinca tinca': every synonym, comma-separated (`short_name` keeps the first)."""
    path = _tfds_file("datasets/siscore/labels.py")
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "IMAGENET_LABELS_LIST" for t in node.targets
        ):
            names = tuple(ast.literal_eval(node.value))
            if len(names) == NUM_CLASSES:
                return names
    raise DataError(f"{str(path)!r} holds no list of {NUM_CLASSES} IMAGENET_LABELS_LIST names")


@functools.cache
def wordnet_ids() -> tuple[str, ...]:
    """The 1,000 WordNet ids ('n01440764', ...) in the same order as `class_names`."""
    path = _tfds_file("datasets/imagenet2012/labels.txt")
    ids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(ids) != NUM_CLASSES:
        raise DataError(f"{str(path)!r} has {len(ids)} WordNet ids, expected {NUM_CLASSES}")
    return ids


def short_name(name: str) -> str:
    """'tench, Tinca tinca' -> 'tench': the first synonym of a class name."""
    return name.split(",")[0].strip()


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


def predict_probs(model, variables, images_u8: np.ndarray, preprocessing: str) -> np.ndarray:
    """Softmax probabilities float32 [N, classes] of uint8 RGB [N, H, W, 3] crops."""
    import jax

    logits = model.apply(variables, preprocess(images_u8, preprocessing), train=False)
    return np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))


def top_k(probs: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """[(class index, probability)] of the k most probable classes of one [classes] row, most
    probable first (ties: the lower index first)."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]
