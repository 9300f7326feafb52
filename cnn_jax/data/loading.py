"""Whole splits as uint8 numpy arrays (for the device-resident feeder and evaluation).

Nothing here downloads: a standard dataset that is not prepared in the data dir raises a
`DataError` naming `cnn-jax data import` and `TFDS_DATA_DIR`. The `digits` dataset is built
locally on first use (its data ship with scikit-learn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cnn_jax.data import _tf
from cnn_jax.data.registry import (
    STANDARD_IMPORTS,
    DatasetInfo,
    get_dataset_info,
    resolve_data_dir,
)
from cnn_jax.errors import DataError

# Datasets whose tfds builder needs no network, so they are prepared on first use.
_BUILT_LOCALLY = ("digits",)
_SYNTHETIC_SPLITS = {"train": 0, "test": 1}
# tfds builders whose source files are never downloaded, only read from DIR/downloads/manual.
_MANUAL_DOWNLOAD = ("imagenet2012",)


def not_prepared_error(info: DatasetInfo, data_dir: str) -> DataError:
    """The error for a dataset not prepared in `data_dir`: says how to prepare it offline."""
    where = "or set TFDS_DATA_DIR (or dataset.data_dir) to a folder where it is prepared"
    import_it = f"`cnn-jax data import {info.name} --from PATH [--data-dir DIR]`"
    build = f"`tfds build {info.tfds_name} --data_dir DIR`"
    if info.name in _MANUAL_DOWNLOAD:
        build += " with its archives in DIR/downloads/manual"
    if ":" in info.tfds_name:  # an image folder imported with `data import`
        how = f"Import it (again) with {import_it}, {where}."
    elif info.name in STANDARD_IMPORTS:
        how = (
            f"Prepare it from files you already have with {import_it}, {where} "
            f"(with network access: {build})."
        )
    else:  # `data import` has no reader for it
        how = (
            f"`cnn-jax data import` does not read {info.name!r}: prepare it with "
            f"tensorflow-datasets ({build}), {where}."
        )
    return DataError(
        f"dataset {info.name!r} (tfds {info.tfds_name!r}) is not prepared in data dir "
        f"{data_dir!r}, and nothing is downloaded at run time. {how}"
    )


def open_builder(info: DatasetInfo, data_dir: str | None = None, *, download: bool = False):
    """The tfds builder of `info`, prepared: builds `digits` locally on first use; downloads
    a standard dataset only when `download=True` (never by default)."""
    tfds = _tf.tfds()
    if info.name in _BUILT_LOCALLY:
        import cnn_jax.data.digits  # noqa: F401  (registers the builder)
    data_dir = resolve_data_dir(data_dir)
    try:
        builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    except (ValueError, OSError) as e:  # e.g. an imported dataset's folder removed meanwhile
        raise DataError(f"dataset {info.name!r}: cannot open tfds builder in {data_dir!r}: {e}")
    if builder.is_prepared():
        return builder
    if info.name in _BUILT_LOCALLY or download:
        _tf.tf()  # hide the GPUs before tfds starts TensorFlow
        try:
            with _tf.quiet_prepare():
                builder.download_and_prepare()
        except Exception as e:  # any failure becomes one short message
            if builder.is_prepared():  # another process finished building it meanwhile
                return builder
            if info.name in _BUILT_LOCALLY:
                raise DataError(
                    f"could not build dataset {info.name!r} in data dir {data_dir!r}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            raise DataError(f"{not_prepared_error(info, data_dir)} Download failed: {e}") from e
    # Not prepared: as_dataset reports it (and tfds.testing.mock_data serves mock data instead),
    # as the DataError naming `cnn-jax data import`, whoever calls it, not as tfds' AssertionError.
    as_dataset = builder.as_dataset

    def as_dataset_or_not_prepared(*args, **kwargs):
        try:
            return as_dataset(*args, **kwargs)
        except AssertionError as e:  # tfds' "could not find data in ..."
            raise not_prepared_error(info, data_dir) from e

    builder.as_dataset = as_dataset_or_not_prepared
    return builder


def shard_split(split: str, shard: tuple[int, int] | None, *, drop_remainder: bool = False):
    """The tfds split of shard `(index, count)` of `split` (each process reads only its part).

    Shards are disjoint and together cover the split; sizes differ by at most one example
    unless `drop_remainder`, which makes them equal by dropping up to count-1 examples.
    """
    if shard is None:
        return split
    index, count = _check_shard(shard)
    if count == 1:
        return split
    return _tf.tfds().even_splits(split, n=count, drop_remainder=drop_remainder)[index]


def _check_shard(shard: Sequence[int]) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise DataError(f"shard={shard!r}: expected (process_index, process_count)") from None
    if not (count >= 1 and 0 <= index < count):
        raise DataError(f"shard={shard!r}: expected 0 <= process_index < process_count")
    return index, count


def class_lookup(classes: Sequence[int], num_classes: int) -> np.ndarray:
    """int32 [num_classes]: the new label of each old class, -1 for dropped classes."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
        raise DataError(
            f"classes={classes!r}: expected distinct class indices in [0, {num_classes})"
        )
    lookup = np.full(num_classes, -1, np.int32)
    lookup[classes] = np.arange(len(classes), dtype=np.int32)
    return lookup


def check_labels(labels: np.ndarray, num_classes: int, *, dataset: str, split: str) -> None:
    """Raise DataError unless every label is in [0, num_classes).

    labels: int [N]. Inside a compiled step an out-of-range label is not an error: one-hot gives
    it an all-zero target and the loss and accuracy are silently wrong, so splits are checked here,
    on the host, when they are loaded.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"dataset {dataset!r} split {split!r}: label {int(labels[first])} (example {first}) "
            f"is outside the valid range [0, {num_classes}) ({int(bad.sum())} of {labels.size} "
            f"labels are); the prepared data do not match the dataset's {num_classes} classes: "
            "prepare (import) the dataset again"
        )


def filter_classes(
    images: np.ndarray, labels: np.ndarray, classes: Sequence[int] | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the examples of `classes`, relabelled 0..k-1 in the order given (CIFAR-4 subsets)."""
    if not classes:
        return images, labels
    new = class_lookup(classes, num_classes)[labels]
    keep = new >= 0
    return images[keep], new[keep]


def synthetic_arrays(
    info: DatasetInfo, split: str, *, size: int = 1024, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`size` random images of `info.image_shape` with labels, deterministic given the seed.

    Each class has a fixed random prototype and an image is the mean of its class prototype and
    uniform noise, so a model can learn it (useful for smoke tests); train and test share the
    prototypes and differ in noise and labels.
    """
    if split not in _SYNTHETIC_SPLITS:
        raise DataError(f"synthetic dataset: unknown split {split!r}; expected 'train' or 'test'")
    if size < 1:
        raise DataError(f"synthetic dataset: size {size!r} must be >= 1")
    prototypes = np.random.default_rng([seed, 7]).integers(
        0, 256, (info.num_classes, *info.image_shape), dtype=np.uint16
    )
    rng = np.random.default_rng([seed, _SYNTHETIC_SPLITS[split]])
    labels = rng.integers(0, info.num_classes, size, dtype=np.int32)
    noise = rng.integers(0, 256, (size, *info.image_shape), dtype=np.uint16)
    return ((prototypes[labels] + noise) // 2).astype(np.uint8), labels


def load_split_arrays(
    name: str,
    split: str | None = None,
    *,
    data_dir: str | None = None,
    shard: tuple[int, int] | None = None,
    classes: Sequence[int] | None = None,
    config: Any = None,
    drop_remainder: bool = False,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split (or shard `(process_index, process_count)` of it) in host memory.

    Returns images uint8 [N, H, W, C] and labels int32 [N]. `split` defaults to the dataset's
    train split; `classes` keeps those classes relabelled 0..k-1; `data_dir` defaults to
    config.dataset.data_dir, $TFDS_DATA_DIR or the tfds default. See `shard_split` for shards.
    Raises DataError when the dataset is unknown, not prepared, its images vary in size, or a
    label is outside [0, num_classes).
    """
    info = get_dataset_info(name, config, data_dir=data_dir)
    split = split or info.train_split
    if info.name == "synthetic":
        size = int(config.dataset.synthetic_size) if config is not None else 1024
        seed = int(config.seed) if config is not None else 0
        images, labels = synthetic_arrays(info, split, size=size, seed=seed)
        if shard is not None:
            index, count = _check_shard(shard)
            n = len(labels) // count * count if drop_remainder else len(labels)
            part = np.array_split(np.arange(n), count)[index]
            images, labels = images[part], labels[part]
        check_labels(labels, info.num_classes, dataset=info.name, split=split)
        return filter_classes(images, labels, classes, info.num_classes)

    data_dir = resolve_data_dir(data_dir, config)
    builder = open_builder(info, data_dir, download=download)
    image_shape = builder.info.features["image"].shape
    if None in image_shape:
        raise DataError(
            f"dataset {name!r} has images of varying sizes {image_shape}; it cannot be loaded "
            "as one array: use the streaming feeder (dataset.feeder=streaming)"
        )
    tf, tfds = _tf.tf(), _tf.tfds()
    try:
        ds = builder.as_dataset(
            split=shard_split(split, shard, drop_remainder=drop_remainder),
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    except AssertionError as e:  # tfds' "could not find data in ..." when not prepared
        raise not_prepared_error(info, data_dir) from e
    except ValueError as e:  # unknown split, bad slice
        raise DataError(f"dataset {name!r}: bad split {split!r}: {e}") from e
    # Decoding in parallel chunks is faster than tfds' batch_size=-1 (one serial decode pass).
    decode = builder.info.features["image"].decode_example
    ds = ds.map(
        lambda ex: (decode(ex["image"]), tf.cast(ex["label"], tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(4096)
    chunks = list(ds.as_numpy_iterator())
    images = (
        np.concatenate([c[0] for c in chunks]) if chunks else np.zeros((0, *image_shape), np.uint8)
    )
    labels = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros(0, np.int32)
    check_labels(labels, info.num_classes, dataset=info.name, split=split)
    return filter_classes(images, labels, classes, info.num_classes)
