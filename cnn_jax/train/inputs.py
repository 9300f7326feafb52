"""The training engine's view of a dataset: shapes, sizes, preprocessing and the feeders.

Everything dataset-specific comes from `cnn_jax.data`; this module only adapts it to what the
loop needs, so `loop.py` does not care whether batches are gathered on device or streamed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from cnn_jax.data import augment, order
from cnn_jax.data.loading import load_split_arrays
from cnn_jax.data.registry import choose_feeder, get_dataset_info

# preprocess(images_u8 [B, H, W, C], key, train) -> float32 [B, H', W', C]
PreprocessFn = Callable[[jax.Array, jax.Array, bool], jax.Array]


@dataclasses.dataclass
class Inputs:
    """A dataset ready for training.

    image_shape: (H, W, C) the model sees (after resizing). For the 'device' feeder the
    splits are host arrays (to be placed by the back end); for 'streaming' the iterator
    factories yield process-local uint8 batches.
    """

    name: str
    feeder: str  # 'device' | 'streaming'
    image_shape: tuple[int, int, int]
    num_classes: int
    num_train: int
    num_eval: int
    preprocess: PreprocessFn
    train_arrays: tuple[np.ndarray, np.ndarray] | None = None
    eval_arrays: tuple[np.ndarray, np.ndarray] | None = None
    # train_batches(start_step) -> iterator of {'image', 'label'} for steps start_step, ...
    train_batches: Callable[[int], Iterator[dict]] | None = None
    # eval_batches() -> iterator of {'image', 'label', 'mask'}, padded to the eval batch size
    eval_batches: Callable[[], Iterator[dict]] | None = None


def make_preprocess(config: ml_collections.ConfigDict, info) -> PreprocessFn:
    """uint8 batch -> normalised float32, with the configured resize / crop / flip (train only)."""
    d = config.dataset
    return functools.partial(
        _preprocess,
        mean=tuple(info.mean),
        std=tuple(info.std),
        image_size=int(d.image_size) or None,
        crop_padding=int(d.crop_padding),
        flip=bool(d.flip),
    )


def _preprocess(images, key, train, **options):
    return augment.preprocess(images, key, train=train, **options)


def model_image_shape(config: ml_collections.ConfigDict, info) -> tuple[int, int, int]:
    h, w, c = info.image_shape
    size = int(config.dataset.image_size)
    return (size, size, c) if size else (h, w, c)


def load_inputs(config: ml_collections.ConfigDict, *, eval_only: bool = False) -> Inputs:
    """Loads the configured dataset for the chosen feeder (device-resident or streaming).

    Device-resident splits are loaded whole on every process (each process places the full
    copy on its devices), so the global batch of a step is the same for any process count.
    Streaming: each process reads its shard; the order is the streaming feeder's own
    (seeded by config.seed), see `cnn_jax.data.streaming`.
    """
    d = config.dataset
    data_dir = d.data_dir or None
    info = get_dataset_info(d.name, config, data_dir=data_dir)
    feeder = choose_feeder(info, config)
    classes = list(d.classes) or None
    num_classes = len(classes) if classes else info.num_classes
    train_split = d.train_split or info.train_split
    eval_split = d.eval_split or info.test_split
    common = {
        "name": info.name,
        "feeder": feeder,
        "image_shape": model_image_shape(config, info),
        "num_classes": num_classes,
        "preprocess": make_preprocess(config, info),
    }
    load = functools.partial(
        load_split_arrays, d.name, data_dir=data_dir, classes=classes, config=config
    )
    if feeder == "device":
        eval_arrays = load(eval_split)
        train_arrays = (eval_arrays[0][:0], eval_arrays[1][:0]) if eval_only else load(train_split)
        return Inputs(
            **common,
            num_train=len(train_arrays[1]),
            num_eval=len(eval_arrays[1]),
            train_arrays=train_arrays,
            eval_arrays=eval_arrays,
        )
    from cnn_jax.data import streaming

    processes = jax.process_count()
    shard = (jax.process_index(), processes)
    local_batch = int(config.train.batch_size) // processes
    local_eval_batch = int(config.train.eval_batch_size) // processes
    count = functools.partial(
        _count_examples, info, classes=classes, data_dir=data_dir, config=config
    )
    # Train shards are made equal (drop remainder), so the global epoch is processes x shard.
    num_train = 0 if eval_only else count(train_split, shard=shard, drop_remainder=True) * processes
    num_eval = count(eval_split)
    # Every process must run the same number of eval steps (collectives): pad with empty batches.
    eval_steps = math.ceil(math.ceil(num_eval / processes) / local_eval_batch)
    image_size = int(d.image_size) or None
    return Inputs(
        **common,
        num_train=num_train,
        num_eval=num_eval,
        train_batches=lambda start_step: streaming.train_batches(
            d.name,
            train_split,
            batch_size=local_batch,
            seed=int(config.seed),
            start_step=start_step,
            data_dir=data_dir,
            shard=shard,
            image_size=image_size,
            classes=classes,
            config=config,
        ),
        eval_batches=lambda: streaming.eval_batches(
            d.name,
            eval_split,
            batch_size=local_eval_batch,
            data_dir=data_dir,
            shard=shard,
            image_size=image_size,
            classes=classes,
            config=config,
            num_batches=eval_steps,
        ),
    )


def _count_examples(
    info, split: str, *, classes, data_dir, config, shard=None, drop_remainder=False
) -> int:
    """Examples in a split (or shard), after the class filter, without decoding any image."""
    from cnn_jax.data import _tf, loading

    if info.name == "synthetic":
        return len(load_split_arrays("synthetic", split, shard=shard, classes=classes, config=config,
                                     drop_remainder=drop_remainder)[1])  # fmt: skip
    tf, tfds = _tf.tf(), _tf.tfds()
    builder = loading.open_builder(info, data_dir)
    ds = builder.as_dataset(
        split=loading.shard_split(split, shard, drop_remainder=drop_remainder),
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    if classes:
        wanted = tf.constant([int(c) for c in classes], tf.int64)
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(tf.cast(ex["label"], tf.int64), wanted)))
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.map(lambda ex: ex["label"]).reduce(np.int64(0), lambda c, _: c + 1))


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    return order.steps_per_epoch(num_train, batch_size)
