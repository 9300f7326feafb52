"""Predicting with a trained model on single images: reading files, the eval-time preprocessing,
class probabilities, layer activations and the pictures made from them.

Shared by `cnn-jax predict` / `visualize`, the training command's pictures and the experiment
scripts. Images go in as uint8 at the dataset's native shape and are preprocessed exactly as the
evaluation pipeline does (`cnn_jax.train.feeders.make_preprocess` with `train=False`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cnn_jax.errors import ConfigError, DataError

MAX_FEATURE_MAP_LAYERS = 8


def model_input(config) -> dict[str, Any]:
    """What a model trained with `config` takes and gives: the dataset's native image shape
    (H, W, C) and the `class_names` (preprocessing is `preprocess_for_model`)."""
    from cnn_jax.data import get_dataset_info

    info = get_dataset_info(config.dataset.name, config)
    names = [str(n) for n in info.class_names] or [str(i) for i in range(info.num_classes)]
    if config.dataset.classes:
        names = [names[i] for i in config.dataset.classes]
    return {"native_shape": tuple(info.image_shape), "class_names": names}


def preprocess_for_model(config, images_u8: np.ndarray):
    """uint8 [N, H, W, C] at the native shape -> float32 model input, as at evaluation."""
    import jax

    from cnn_jax.data import get_dataset_info
    from cnn_jax.train.feeders import make_preprocess

    preprocess = make_preprocess(config, get_dataset_info(config.dataset.name, config))
    return preprocess(images_u8, jax.random.PRNGKey(0), False)


def predict_probs(config, model, variables, images_u8: np.ndarray) -> np.ndarray:
    """Softmax class probabilities float32 [N, num_classes] for uint8 [N, H, W, C] images."""
    import jax

    logits = model.apply(variables, preprocess_for_model(config, images_u8), train=False)
    return np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))


def read_image(
    path: str | Path, shape: tuple[int, int, int], *, invert: bool = False
) -> np.ndarray:
    """A PNG/JPEG file as uint8 [H, W, C] of the given shape (grayscale when C == 1, else RGB),
    resized bilinearly; `invert` turns dark-on-light into light-on-dark (MNIST style). 16-bit
    greyscale is scaled to 8 bits (`cnn_jax.data.images.to_8bit`).

    Raises DataError for a missing, empty, non-image, corrupt or oversized (decompression bomb)
    file, and for 32-bit pixels (no defined range).
    """
    from PIL import Image, UnidentifiedImageError

    from cnn_jax.data.images import to_mode

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {str(path)!r} does not exist or is not a file")
    h, w, c = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = to_mode(im, "L" if c == 1 else "RGB", f"image {str(path)!r}")  # 16-bit too
                im = im.resize((w, h), Image.Resampling.BILINEAR)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {str(path)!r} is too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        raise DataError(
            f"image {str(path)!r} is not a readable PNG or JPEG image ({path.stat().st_size} bytes)"
        ) from None
    except OSError as e:  # truncated or corrupt image data
        raise DataError(f"image {str(path)!r} could not be decoded: {e}") from None
    a = np.asarray(im, dtype=np.uint8).reshape(h, w, c)
    return 255 - a if invert else a


def border_brightness(images_u8: np.ndarray) -> np.ndarray:
    """The mean of each image's outermost ring of pixels in [0, 1]: uint8 [N, H, W, C] -> [N].
    For digits and other drawn shapes this is the background."""
    a = np.asarray(images_u8, np.float32) / 255
    ring = np.concatenate([a[:, 0], a[:, -1], a[:, 1:-1, 0], a[:, 1:-1, -1]], axis=1)
    return ring.mean(axis=(1, 2))


# What `scan_background` finds for the built-in datasets (tested for digits; MNIST and
# Fashion-MNIST are drawn on black), so that `predict` need not load a dataset to know it.
KNOWN_BACKGROUNDS = {
    "mnist": "dark", "fashion_mnist": "dark", "digits": "dark", "synthetic": None,
    "cifar10": None, "cifar100": None, "imagenet2012": None, "imagenette": None,
}  # fmt: skip


def training_background(config) -> str | None:
    """'dark' or 'light' when the model's dataset has a consistent background (MNIST-style
    digits: light on dark), else None (photos): `KNOWN_BACKGROUNDS` for the built-in datasets,
    else (an imported image folder) `scan_background`."""
    name = config.dataset.name
    return KNOWN_BACKGROUNDS[name] if name in KNOWN_BACKGROUNDS else scan_background(config)


def scan_background(config) -> str | None:
    """The background of the dataset's images, judged by the borders of its evaluation split:
    'dark' or 'light' when the median border is, else None (mixed borders: photos), and None
    when the dataset is streamed (too large to scan here) or cannot be read here."""
    from cnn_jax.data import get_dataset_info, load_split_arrays
    from cnn_jax.errors import CnnJaxError

    try:
        info = get_dataset_info(config.dataset.name, config)
        if not info.device_resident:
            return None
        split = config.dataset.eval_split or info.test_split
        images, _ = load_split_arrays(config.dataset.name, split, config=config)
    except (CnnJaxError, ImportError, OSError):
        return None
    if len(images) == 0 or min(images.shape[1:3]) < 3:
        return None
    level = float(np.median(border_brightness(images)))
    return "dark" if level < 0.3 else "light" if level > 0.7 else None


def opposite_polarity(image_u8: np.ndarray, background: str | None) -> bool:
    """Whether uint8 [H, W, C] `image_u8` has the other background than `background` ('dark'
    or 'light', from `training_background`): its border on the other side of mid-grey and
    brighter (darker) than the image as a whole, i.e. a dark (light) shape on it."""
    image = np.asarray(image_u8)
    if background not in ("dark", "light") or min(image.shape[:2]) < 3:
        return False
    border = float(border_brightness(image[None])[0])
    mean = float(image.mean()) / 255
    if background == "dark":
        return border > 0.5 and border > mean
    return border < 0.5 and border < mean


def sample_test_image(config, label: str | None = "8", index: int | None = None):
    """(uint8 [H, W, C] test image, its label index, its index in the test split): image `index`
    if given, else the first whose class name is `label` (the guides' digit 8), else the first."""
    from cnn_jax.data import get_dataset_info, load_split_arrays

    split = config.dataset.eval_split or get_dataset_info(config.dataset.name, config).test_split
    images, labels = load_split_arrays(
        config.dataset.name, split, config=config, classes=list(config.dataset.classes) or None
    )
    if index is None:
        names = model_input(config)["class_names"]
        wanted = [i for i, n in enumerate(names) if n == str(label)]
        hits = np.flatnonzero(labels == wanted[0]) if wanted else []
        index = int(hits[0]) if len(hits) else 0
    if not 0 <= index < len(images):
        raise DataError(f"--index {index} is out of range; the test split has {len(images)} images")
    return images[index], int(labels[index]), index


def _is_layer(module, method_name: str) -> bool:
    kind = type(module).__name__
    return method_name == "__call__" and kind.endswith(("Conv", "Pool"))


def layer_activations(model, variables, x) -> dict[str, np.ndarray]:
    """Outputs of every convolution and pooling layer for one input x: [1, H, W, C], in call
    order: layer path ('block1/conv1') -> float32 [H', W', C']. Conv outputs are taken before the
    activation function (Flax captures module outputs)."""
    _, state = model.apply(
        variables, x, train=False, capture_intermediates=_is_layer, mutable=["intermediates"]
    )
    acts = {}

    def walk(node, path):  # dicts keep call order (jax.tree_util would sort the keys)
        for key, value in node.items():
            if key == "__call__":
                acts["/".join(path)] = np.asarray(value[0][0], dtype=np.float32)
            else:
                walk(value, [*path, key])

    walk(state["intermediates"], [])
    return acts


def first_conv_kernel(params) -> tuple[str, np.ndarray]:
    """(path, kernel [KH, KW, I, O]) of the first 4-D parameter in definition order."""

    def walk(node, path):
        for key, value in node.items():
            if hasattr(value, "items"):
                found = walk(value, [*path, key])
                if found:
                    return found
            elif getattr(value, "ndim", 0) == 4:
                return "/".join([*path, key]), np.asarray(value, np.float32)
        return None

    found = walk(params, [])
    if found is None:
        raise ConfigError("the model has no convolution kernel (4-D parameter) to plot")
    return found


def save_feature_pictures(
    config, model, variables, outdir: str | Path, image_u8=None, title: str = ""
) -> dict[str, Path]:
    """filters.png (first-layer filters), feature_maps.png (the input and each conv and pooling
    layer's activations) and probabilities.png for one image (default: a test image of the
    digit 8) in `outdir`. Returns name -> written path."""
    from cnn_jax import viz

    outdir = Path(outdir)
    names = model_input(config)["class_names"]
    if image_u8 is None:
        image_u8, label, index = sample_test_image(config)
        title = f"test image {index} (label {names[label]})"
    x = preprocess_for_model(config, np.asarray(image_u8)[None])
    maps = {"input": np.asarray(x[0])}
    layers = list(layer_activations(model, variables, x).items())
    maps.update(layers[:MAX_FEATURE_MAP_LAYERS])
    maps_title = title
    if len(layers) > MAX_FEATURE_MAP_LAYERS:  # say what is left out (ResNet: dozens of layers)
        note = f"first {MAX_FEATURE_MAP_LAYERS} of {len(layers)} conv and pooling layers"
        maps_title = f"{title} ({note})" if title else note
    probs = predict_probs(config, model, variables, np.asarray(image_u8)[None])[0]
    layer, kernel = first_conv_kernel(variables["params"])
    return {
        "filters": viz.plot_filters(
            kernel, outdir / "filters.png", title=f"{layer} {kernel.shape}"
        ),
        "feature_maps": viz.plot_feature_maps(maps, outdir / "feature_maps.png", title=maps_title),
        "probabilities": viz.plot_probabilities(
            probs, names, outdir / "probabilities.png", title=title
        ),
    }
