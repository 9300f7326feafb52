"""Feeders: the engine's one view of a dataset, whether it lives on the devices or streams.

`make_feeder(config, num_devices)` loads the configured dataset and returns a feeder with its
shapes and sizes, the preprocessing the compiled steps apply, and two methods:

    train_batches(compiled, start_step) -> iterator of device batches for steps start_step, ...
    eval_batches(compiled)              -> iterator of device batches covering the eval split
                                           once, padded and masked ('mask' 1 for real examples)

`ResidentFeeder` keeps the uint8 splits on the devices and gathers each step's batch there by the
data-order contract (`cnn_jax.data.order`: a pure function of (seed, step)); `StreamingFeeder`
reads tf.data batches on the host (`cnn_jax.data.streaming`) and prefetches them to the devices.
The loop calls the same methods on both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from cnn_jax.data import augment, order
from cnn_jax.data.feeding import check_batch_size, pad_to_batches, prefetch_to_device
from cnn_jax.data.loading import load_split_arrays
from cnn_jax.data.registry import choose_feeder, get_dataset_info
from cnn_jax.errors import ConfigError

# preprocess(images_u8 [B, H, W, C], key, train[, part=(start, total)]) -> float32 [B, H', W', C]
# `part` (pmap only): the batch is rows start.. of a global batch of `total`, to be augmented as
# those rows of the whole would be (see `augment.preprocess`).
PreprocessFn = Callable[..., jax.Array]


def make_preprocess(config, info) -> PreprocessFn:
    """uint8 batch -> normalised float32, with the configured resize and (train only) crop and
    flip. The one definition of what a model trained with `config` sees, used by training,
    evaluation and prediction."""
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


def model_image_shape(config, info) -> tuple[int, int, int]:
    """(H, W, C) the model sees: the dataset's, resized to `dataset.image_size` if set."""
    h, w, c = info.image_shape
    size = int(config.dataset.image_size)
    return (size, size, c) if size else (h, w, c)


def check_batch_sizes(config, num_devices: int) -> None:
    """Every device (and process) must get the same share of every train, micro and eval batch;
    a `ConfigError` names the key before anything is loaded or compiled."""
    t, processes = config.train, jax.process_count()
    check_batch_size(t.batch_size, num_devices, process_count=processes)
    check_batch_size(
        t.eval_batch_size, num_devices, process_count=processes, key="train.eval_batch_size"
    )
    check_batch_size(
        t.batch_size // t.grad_accum_steps,
        num_devices,
        key="train.batch_size / train.grad_accum_steps",
    )


def effective_eval_batch(eval_batch_size: int, num_eval: int, multiple: int) -> int:
    """`train.eval_batch_size`, capped at the eval split rounded up to a multiple of the
    devices: a larger batch would evaluate the same examples with only padding added (and a
    huge setting would allocate that padding)."""
    return max(multiple, min(eval_batch_size, -(-num_eval // multiple) * multiple))


def host_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_memory(
    key: str, batch: int, image_shape, *, what: str = "batch", dtype: str = "float32"
) -> None:
    """`ConfigError` naming `key` when `batch` images of `image_shape` alone would exceed this
    machine's memory: said before any data is loaded or compiled."""
    needed = np.dtype(dtype).itemsize * batch * math.prod(int(n) for n in image_shape)
    available = host_memory_bytes()
    if available is not None and needed > available:
        shape = "x".join(str(int(n)) for n in image_shape)
        raise ConfigError(
            f"{key}: one {what} of {batch:,} {dtype} images of {shape} needs "
            f"{needed / 2**30:,.1f} GiB, more than this machine's {available / 2**30:,.1f} GiB; "
            "use a smaller value"
        )


@dataclasses.dataclass
class Feeder:
    """What the engine needs to know about a dataset; the subclasses say where batches come from."""

    name: str
    kind: str  # 'device' | 'streaming'
    image_shape: tuple[int, int, int]  # what the model sees
    num_classes: int
    num_train: int  # 0 when opened for evaluation only
    num_eval: int
    preprocess: PreprocessFn
    batch_size: int  # global
    eval_batch_size: int  # global

    @property
    def steps_per_epoch(self) -> int:
        return order.steps_per_epoch(self.num_train, self.batch_size)

    def train_batches(self, compiled, start_step: int) -> Iterator[dict]:
        raise NotImplementedError

    def eval_batches(self, compiled) -> Iterator[dict]:
        raise NotImplementedError


@dataclasses.dataclass
class ResidentFeeder(Feeder):
    """Both splits on every device as uint8; a step's batch is gathered there (no host work).

    Every process holds the whole split, so the global batch of a step is the same for any
    number of devices and processes.
    """

    train_arrays: tuple[np.ndarray, np.ndarray] = ()
    eval_arrays: tuple[np.ndarray, np.ndarray] = ()
    _eval_split: Any = None

    def train_batches(self, compiled, start_step: int) -> Iterator[dict]:
        images, labels = self.train_arrays
        split = compiled.replicate({"image": images, "label": labels.astype(np.int32)})
        n, spe = len(labels), self.steps_per_epoch
        step, perm_epoch, perm = start_step, None, None
        while True:
            if step // spe != perm_epoch:  # one permutation per epoch, computed on device
                perm_epoch = step // spe
                perm = compiled.permutation(perm_epoch, n)
            yield compiled.take(split, perm, (step % spe) * self.batch_size, self.batch_size)
            step += 1

    def eval_batches(self, compiled) -> Iterator[dict]:
        eb = self.eval_batch_size
        if self._eval_split is None or self._eval_split[0] is not compiled:  # placed once
            images, labels, mask = pad_to_batches(*self.eval_arrays, eb)
            placed = {"image": images, "label": labels.astype(np.int32), "mask": mask}
            in_order = np.arange(len(mask), dtype=np.int32)
            self._eval_split = (compiled, *compiled.replicate((placed, in_order)))
        _, split, in_order = self._eval_split
        for start in range(0, in_order.shape[-1], eb):
            yield compiled.take(split, in_order, start, eb)


@dataclasses.dataclass
class StreamingFeeder(Feeder):
    """tf.data batches read on the host (each process its shard) and made ahead by tf.data's
    threads, then copied to the devices (laid out for the mesh by `compiled.put_batch`) two
    steps ahead of use, so decoding and the copies overlap the running steps."""

    open_train: Callable[[int], Iterator[dict]] | None = None  # start_step -> host batches
    open_eval: Callable[[], Iterator[dict]] | None = None

    def train_batches(self, compiled, start_step: int) -> Iterator[dict]:
        return prefetch_to_device(self.open_train(start_step), compiled.put_batch)

    def eval_batches(self, compiled) -> Iterator[dict]:
        return prefetch_to_device(self.open_eval(), compiled.put_batch)


def make_feeder(config, num_devices: int, *, eval_only: bool = False) -> Feeder:
    """The configured dataset, device-resident or streaming (`dataset.feeder`; 'auto' keeps
    datasets that fit on the devices). `eval_only` skips loading the training split."""
    check_batch_sizes(config, num_devices)
    d, t = config.dataset, config.train
    data_dir = d.data_dir or None
    info = get_dataset_info(d.name, config, data_dir=data_dir)
    classes = list(d.classes) or None
    train_split = d.train_split or info.train_split
    eval_split = d.eval_split or info.test_split
    image_shape = model_image_shape(config, info)
    check_batch_memory(
        "dataset.image_size" if d.image_size else "train.batch_size", int(t.batch_size), image_shape
    )
    multiple = num_devices  # all devices of all processes
    common = {
        "name": info.name,
        "image_shape": image_shape,
        "num_classes": len(classes) if classes else info.num_classes,
        "preprocess": make_preprocess(config, info),
        "batch_size": int(t.batch_size),
    }
    load = functools.partial(
        load_split_arrays, d.name, data_dir=data_dir, classes=classes, config=config
    )
    if choose_feeder(info, config) == "device":
        eval_arrays = load(eval_split)
        train_arrays = (eval_arrays[0][:0], eval_arrays[1][:0]) if eval_only else load(train_split)
        num_eval = len(eval_arrays[1])
        return ResidentFeeder(
            kind="device",
            num_train=len(train_arrays[1]),
            num_eval=num_eval,
            eval_batch_size=effective_eval_batch(int(t.eval_batch_size), num_eval, multiple),
            train_arrays=train_arrays,
            eval_arrays=eval_arrays,
            **common,
        )
    from cnn_jax.data import streaming

    processes = jax.process_count()
    shard = (jax.process_index(), processes)
    count = functools.partial(
        _count_examples, info, classes=classes, data_dir=data_dir, config=config
    )
    # Train shards are made equal (drop remainder), so the global epoch is processes x shard.
    num_train = 0 if eval_only else count(train_split, shard=shard, drop_remainder=True) * processes
    num_eval = count(eval_split)
    eval_batch = effective_eval_batch(int(t.eval_batch_size), num_eval, multiple)
    local_eval_batch = eval_batch // processes
    # Every process must run the same number of eval steps (collectives): pad with empty batches.
    eval_steps = math.ceil(math.ceil(num_eval / processes) / local_eval_batch)
    source = {
        "data_dir": data_dir,
        "shard": shard,
        "image_size": int(d.image_size) or None,
        "classes": classes,
        "config": config,
    }
    from cnn_jax.train.loop import steps_per_call  # (the loop module imports this one)

    # Host batches made ahead (across epoch boundaries): at least two compiled calls' worth, so
    # that after the loop has waited for the devices (a log point, an evaluation) a whole call's
    # batches are ready at once; with fewer the devices idle while the host makes the rest
    # (benchmarks/input_pipeline.py --jpeg).
    prefetch = 2 * max(steps_per_call(config, jax.devices()), 4) + 2
    return StreamingFeeder(
        kind="streaming",
        num_train=num_train,
        num_eval=num_eval,
        open_train=lambda start_step: streaming.train_batches(
            d.name,
            train_split,
            batch_size=int(t.batch_size) // processes,
            seed=int(config.seed),
            start_step=start_step,
            prefetch=prefetch,
            **source,
        ),
        open_eval=lambda: streaming.eval_batches(
            d.name, eval_split, batch_size=local_eval_batch, num_batches=eval_steps, **source
        ),
        eval_batch_size=eval_batch,
        **common,
    )


def _count_examples(
    info, split: str, *, classes, data_dir, config, shard=None, drop_remainder=False
) -> int:
    """Examples in a split (or shard), after the class filter, without decoding any image."""
    from cnn_jax.data import _tf, loading

    if info.name == "synthetic":
        return len(
            load_split_arrays(
                "synthetic",
                split,
                shard=shard,
                classes=classes,
                config=config,
                drop_remainder=drop_remainder,
            )[1]
        )
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
