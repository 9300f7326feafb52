"""Dataset registry: what the pipeline needs to know about each dataset by name.

The entries are the standard tensorflow-datasets builders (`mnist`, `fashion_mnist`, `cifar10`,
`cifar100`, `imagenet2012`, `imagenette`), the embedded `digits` builder (cnn_jax/data/digits.py)
and `synthetic`, plus any image-folder dataset the user imported with `import_dataset` (found in
the data dir, see `cnn_jax.data.importers`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from cnn_jax.errors import ConfigError, DataError

FEEDERS = ("device", "streaming")
# Standard datasets that `import_dataset` (`cnn-jax data import`) prepares from local files.
STANDARD_IMPORTS = ("mnist", "fashion_mnist", "cifar10", "cifar100")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    image_shape: (H, W, C) of the images the model sees by default (for the streaming datasets,
      whose images vary in size, the size of the random-resized / centre crop).
    mean, std: per channel, in [0, 1] pixel units (pixel / 255).
    device_resident: True when the whole split fits comfortably in accelerator memory, so the
      'auto' feeder keeps it on the device.
    """

    name: str
    tfds_name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_split: str = "train"
    test_split: str = "test"
    device_resident: bool = True


_DIGIT_NAMES = tuple(str(i) for i in range(10))
_CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
)  # fmt: skip
_CIFAR100_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm"
)  # fmt: skip
_FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IMAGENETTE_NAMES = (
    "tench", "English springer", "cassette player", "chain saw", "church",
    "French horn", "garbage truck", "gas pump", "golf ball", "parachute",
)  # fmt: skip
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet synset ids, in tfds label order (from the tfds package, offline)."""
    from importlib import resources

    text = (
        resources.files("tensorflow_datasets")
        .joinpath("datasets/imagenet2012/labels.txt")
        .read_text()
    )
    return tuple(line for line in text.split() if line)


def _static_entries() -> dict[str, DatasetInfo]:
    d = DatasetInfo
    return {
        # Statistics: the usual published per-channel values of each training split.
        "mnist": d("mnist", "mnist", (28, 28, 1), 10, _DIGIT_NAMES, (0.1307,), (0.3081,)),
        "fashion_mnist": d(
            "fashion_mnist", "fashion_mnist", (28, 28, 1), 10, _FASHION_NAMES, (0.2860,), (0.3530,)
        ),
        "cifar10": d(
            "cifar10", "cifar10", (32, 32, 3), 10, _CIFAR10_NAMES,
            (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ),
        "cifar100": d(
            "cifar100", "cifar100", (32, 32, 3), 100, _CIFAR100_NAMES,
            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        ),
        # Streamed: images vary in size; image_shape is the crop the model sees.
        "imagenet2012": d(
            "imagenet2012", "imagenet2012", (224, 224, 3), 1000, (), _IMAGENET_MEAN,
            _IMAGENET_STD, test_split="validation", device_resident=False,
        ),
        "imagenette": d(
            "imagenette", "imagenette/160px-v2", (160, 160, 3), 10, _IMAGENETTE_NAMES,
            _IMAGENET_MEAN, _IMAGENET_STD, test_split="validation", device_resident=False,
        ),
        # Computed from the digits train split (pixels scaled 0..16 -> 0..255); see test_digits.
        "digits": d("digits", "digits", (8, 8, 1), 10, _DIGIT_NAMES, (0.3054,), (0.3760,)),
    }  # fmt: skip


def available_datasets() -> list[str]:
    """Names accepted by `get_dataset_info` (besides image folders imported into a data dir:
    `imported_datasets`)."""
    return sorted([*_static_entries(), "synthetic"])


def resolve_data_dir(data_dir: str | os.PathLike | None = None, config: Any = None) -> str:
    """The tfds data dir: `data_dir`, else config.dataset.data_dir, else $TFDS_DATA_DIR, else
    the tfds default (~/tensorflow_datasets)."""
    if not data_dir and config is not None:
        data_dir = config.dataset.get("data_dir", "")
    if not data_dir:
        data_dir = os.environ.get("TFDS_DATA_DIR", "") or "~/tensorflow_datasets"
    return os.path.expanduser(os.fspath(data_dir))


def _synthetic_info(config: Any) -> DatasetInfo:
    shape, classes = (28, 28, 1), 10
    if config is not None:
        shape = tuple(int(s) for s in config.dataset.synthetic_shape)
        classes = int(config.dataset.synthetic_classes)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"config key 'dataset.synthetic_shape' has invalid value {list(shape)!r}; "
            "expected [H, W, C] with positive sizes"
        )
    if classes < 2:
        raise ConfigError(
            f"config key 'dataset.synthetic_classes' has invalid value {classes!r}; expected >= 2"
        )
    c = shape[-1]
    # Pixels are the mean of two uniform [0, 255] draws: mean 0.5, std sqrt(1/24).
    return DatasetInfo(
        "synthetic", "", shape, classes, tuple(str(i) for i in range(classes)),
        (0.5,) * c, (0.2041,) * c,
    )  # fmt: skip


def _imported_info(name: str, data_dir: str) -> DatasetInfo | None:
    """The entry of an image-folder dataset written by `import_dataset`, if there is one."""
    root = Path(data_dir) / name
    if not root.is_dir():
        return None
    versions = sorted(p for p in root.iterdir() if (p / "metadata.json").is_file())
    for version_dir in reversed(versions):
        try:
            meta = json.loads((version_dir / "metadata.json").read_text())
            if meta.get("cnn_jax_image_folder"):
                return DatasetInfo(
                    name=name,
                    tfds_name=f"{name}:{version_dir.name}",
                    image_shape=tuple(meta["image_shape"]),
                    num_classes=len(meta["class_names"]),
                    class_names=tuple(meta["class_names"]),
                    mean=tuple(meta["mean"]),
                    std=tuple(meta["std"]),
                    train_split=meta.get("train_split", "train"),
                    test_split=meta.get("test_split", "test"),
                    device_resident=bool(meta.get("device_resident", False)),
                )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"imported dataset {name!r}: unreadable {version_dir}/metadata.json: {e}"
            )
    return None


def imported_datasets(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the image-folder datasets imported into `data_dir` (default: as
    `resolve_data_dir`), i.e. those `get_dataset_info` finds there besides `available_datasets`."""
    root = Path(resolve_data_dir(data_dir))
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # no data dir (yet), or not a folder
        return []
    return [
        p.name
        for p in folders
        if p.name not in _static_entries()
        and any(_is_image_folder_version(v) for v in p.glob("*/metadata.json"))
    ]


def _is_image_folder_version(metadata: Path) -> bool:
    try:
        meta = json.loads(metadata.read_text())
    except (OSError, ValueError):
        return False  # damaged: using it by name reports the file
    return isinstance(meta, dict) and bool(meta.get("cnn_jax_image_folder"))


def get_dataset_info(name: str, config: Any = None, *, data_dir: str | None = None) -> DatasetInfo:
    """The registry entry for `name`; `config` supplies the `synthetic` shape and the data dir.

    Raises DataError (a ValueError) listing the known names when `name` is unknown.
    """
    if name == "synthetic":
        return _synthetic_info(config)
    entries = _static_entries()
    if name in entries:
        info = entries[name]
        if name == "imagenet2012":
            info = dataclasses.replace(info, class_names=_imagenet_synsets())
        return info
    if isinstance(name, str) and name and "/" not in name and not name.startswith("."):
        imported = _imported_info(name, resolve_data_dir(data_dir, config))
        if imported is not None:
            return imported
    raise DataError(
        f"unknown dataset {name!r}; expected one of: {', '.join(available_datasets())}, "
        "or the name of an image folder imported with `cnn-jax data import NAME --from PATH`"
    )


def choose_feeder(info: DatasetInfo, config: Any = None) -> str:
    """'device' or 'streaming': config.dataset.feeder, where 'auto' keeps datasets that fit
    (MNIST, Fashion-MNIST, CIFAR, digits, synthetic) on the device and streams the rest."""
    feeder = "auto" if config is None else config.dataset.get("feeder", "auto")
    if feeder == "auto":
        return "device" if info.device_resident else "streaming"
    if feeder not in FEEDERS:
        raise ConfigError(
            f"config key 'dataset.feeder' has invalid value {feeder!r}; "
            f"expected one of ('auto', {', '.join(repr(f) for f in FEEDERS)})"
        )
    return feeder
