"""The streaming feeder: tf.data pipelines for datasets that do not fit on the device.

Training batches come from tfds records read with a per-epoch file shuffle and a shuffle buffer,
both seeded with (seed, epoch), then decoded in parallel (+ Inception-style random-resized crop
or a resize), batched with drop_remainder and prefetched. The order is a pure function of
(seed, step), so `train_batches(..., start_step=s)` resumes exactly: it rebuilds epoch
s // steps_per_epoch and skips the batches already seen (skipping happens before decoding).

JPEG records (imagenet2012, imagenette, imported JPEG folders) are decoded and cropped in one
step: the crop box is sampled from the JPEG header's size and `tf.image.decode_and_crop_jpeg`
decodes only that window (the same pixels as decoding everything and slicing). The crop is then
resized on the host, so the batches that travel to the device are uint8 at the model's size; flip
and normalisation run inside the compiled step (`cnn_jax.data.augment.preprocess`), where they
cost nothing measurable, rather than on the host, where they cost CPU time and would quadruple
the bytes copied (float32): `benchmarks/input_pipeline.py --jpeg` measures both.

Every pipeline runs with tf.data autotuning on a private thread pool of `host_threads()` threads
(the cores this process may use), one thread per op, so decoding is spread over images.

Note: the streamed order is deterministic but is not the device-resident feeder's permutation
(`cnn_jax.data.order`): reading records in an arbitrary global order needs random access, which
tfrecord files do not give.

TensorFlow runs on the host only (GPUs hidden, see `_tf.tf`).
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cnn_jax.data import _tf
from cnn_jax.data.feeding import Batch, array_eval_batches, pad_to_batches, read_ahead
from cnn_jax.data.loading import (
    class_lookup,
    load_split_arrays,
    not_prepared_error,
    open_builder,
    shard_split,
)
from cnn_jax.data.order import steps_per_epoch
from cnn_jax.data.registry import DatasetInfo, get_dataset_info, resolve_data_dir
from cnn_jax.errors import ConfigError, DataError

# Centre crop for evaluation of ImageNet-like data: resize the shorter side to size / 0.875.
_EVAL_CROP_FRACTION = 0.875


def host_threads() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under taskset or a
    container's CPU set), which size tf.data's private thread pool."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def pipeline_options(threads: int | None = None):
    """tf.data options of every streaming pipeline: deterministic order (the resume contract),
    autotuned parallelism and buffers, a private pool of `threads` (default `host_threads()`)
    threads, and one thread per op (parallelism across images, not inside one)."""
    tf = _tf.tf()
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    options.threading.private_threadpool_size = int(threads or host_threads())
    options.threading.max_intra_op_parallelism = 1
    return options


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed for (seed, epoch): tf.data and tfds take plain integers."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] >> 1)


class _Source:
    """The raw examples of one split/shard: a tf.data.Dataset of {'image', 'label'} with images
    still encoded (decoded later, in parallel, after shuffling and skipping)."""

    def __init__(self, info: DatasetInfo, split: str, *, data_dir, shard, drop_remainder, config):
        self.info, self.split, self.config = info, split, config
        self.data_dir, self.shard, self.drop_remainder = data_dir, shard, drop_remainder
        self.channels = int(info.image_shape[2])
        if info.name == "synthetic":  # no tfds builder: in-memory arrays, already decoded
            self.arrays = load_split_arrays(
                "synthetic", split, shard=shard, config=config, drop_remainder=drop_remainder
            )
            self.decode = lambda image: image
            self.encoded = False
        else:
            self.builder = open_builder(info, data_dir)
            self.decode = self.builder.info.features["image"].decode_example
            self.encoded = True  # the records hold the files' bytes (JPEG, PNG, ...)

    def dataset(self, shuffle_seed: int | None = None):
        tf, tfds = _tf.tf(), _tf.tfds()
        if self.info.name == "synthetic":
            images, labels = self.arrays
            return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        try:
            ds = self.builder.as_dataset(
                split=shard_split(self.split, self.shard, drop_remainder=self.drop_remainder),
                shuffle_files=shuffle_seed is not None,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False),
            )
        except AssertionError as e:  # not prepared
            raise not_prepared_error(self.info, self.data_dir) from e
        except ValueError as e:
            raise DataError(f"dataset {self.info.name!r}: bad split {self.split!r}: {e}") from e
        return ds


def _relabel(ds, classes: Sequence[int] | None, num_classes: int):
    """Keeps `classes` relabelled 0..k-1 (see loading.filter_classes)."""
    tf = _tf.tf()
    if not classes:
        return ds
    table = tf.constant(class_lookup(classes, num_classes))
    ds = ds.map(lambda ex: {**ex, "label": tf.gather(table, tf.cast(ex["label"], tf.int32))})
    return ds.filter(lambda ex: ex["label"] >= 0)


def _count(ds) -> int:
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.map(lambda ex: ex["label"]).reduce(np.int64(0), lambda c, _: c + 1))


def _to_uint8(image):
    tf = _tf.tf()
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _resize(image, size: tuple[int, int], *, antialias: bool = True):
    tf = _tf.tf()
    return _to_uint8(tf.image.resize(image, size, method="bilinear", antialias=antialias))


def _resize_crop(crop, size: tuple[int, int]):
    """A random crop brought to the model's size: bilinear without antialiasing, as reference
    ImageNet pipelines do (the crops of ImageNet-sized photos are scaled by 0.5..2 around 224);
    the antialiasing kernel cost more host time than decoding the JPEG
    (`benchmarks/input_pipeline.py --jpeg`)."""
    return _resize(crop, size, antialias=False)


def crop_box(image_shape, seed):
    """Inception crop box for an image of `image_shape` [h, w, c]: a random box of 8%..100% of
    the area, aspect 3/4..4/3 (`tf.image.stateless_sample_distorted_bounding_box`, a pure
    function of the shape and `seed`). Returns (begin [y, x, 0], size [h, w, -1])."""
    tf = _tf.tf()
    begin, box, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.08,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, box


def _random_resized_crop(image, size: tuple[int, int], seed):
    """Inception crop of a decoded image, resized to `size`."""
    tf = _tf.tf()
    begin, box = crop_box(tf.shape(image), seed)
    return _resize_crop(tf.slice(image, begin, box), size)


def decode_random_crop(encoded, seed, *, channels: int, decode):
    """The Inception crop (`crop_box`) of an encoded image, uint8 [h', w', channels]. A JPEG is
    decoded only inside the box (`tf.image.decode_and_crop_jpeg`, the box sampled from the size
    in its header): the same pixels as `decode` and then slicing, with less work. Other formats
    (PNG...) go through `decode` (the tfds feature's decoder) and a slice."""
    tf = _tf.tf()

    def fused():
        shape = tf.image.extract_jpeg_shape(encoded)
        begin, box = crop_box(shape, seed)
        # One more column on each side (inside the image): libjpeg interpolates subsampled colour
        # from the neighbouring columns, which a window ending at the box would lack (its edge
        # columns would differ); with them the pixels are those of a whole-image decode.
        left = tf.maximum(begin[1] - 1, 0)
        right = tf.minimum(begin[1] + box[1] + 1, shape[1])
        window = tf.stack([begin[0], left, box[0], right - left])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=channels)
        return image[:, begin[1] - left : begin[1] - left + box[1]]

    def unfused():
        image = decode(encoded)
        begin, box = crop_box(tf.shape(image), seed)
        return tf.slice(image, begin, box)

    return tf.cond(tf.io.is_jpeg(encoded), fused, unfused)


def _center_crop(image, size: tuple[int, int]):
    """Resizes the shorter side to size / 0.875, then takes the central size crop."""
    tf = _tf.tf()
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = max(size) / _EVAL_CROP_FRACTION / tf.reduce_min(shape)
    resized = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, method="bilinear", antialias=True)
    top = (resized[0] - size[0]) // 2
    left = (resized[1] - size[1]) // 2
    return _to_uint8(image[top : top + size[0], left : left + size[1]])


def _output_size(info: DatasetInfo, image_size) -> tuple[int, int] | None:
    """(h, w) the images are brought to on the host; None keeps the native size."""
    if image_size:
        return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return None if info.device_resident else tuple(info.image_shape[:2])


def train_batches(
    name: str,
    split: str | None = None,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    data_dir: str | None = None,
    shard: tuple[int, int] | None = None,
    image_size: int | Sequence[int] | None = None,
    random_resized_crop: bool | None = None,
    classes: Sequence[int] | None = None,
    config: Any = None,
    shuffle_buffer: int = 16_384,
    prefetch: int = 4,
    threads: int | None = None,
    fused_jpeg_crop: bool = True,
) -> Iterator[Batch]:
    """Endless training batches {'image': uint8 [B, H, W, C], 'label': int32 [B]} (numpy).

    batch_size: per process (global batch / process count). shard: (process_index,
    process_count); shards are made equal (drop remainder) so every process has the same number
    of steps per epoch. Batch `start_step` is the first one yielded. image_size: output size
    (default: native for device-sized datasets, the registry's crop size for ImageNet-like
    ones). random_resized_crop: default on for ImageNet-like datasets, otherwise a plain resize.
    prefetch: batches made ahead of use, across epoch boundaries (`feeding.read_ahead`; the
    engine asks for two compiled calls' worth).
    threads: tf.data's private thread pool (default `host_threads()`). fused_jpeg_crop: decode
    only the crop box of JPEG records (`decode_random_crop`); False decodes whole images and
    slices (the same pixels; for comparisons).
    """
    for key, value, least in (("prefetch", prefetch, 1), ("threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < least):  # fmt: skip
            raise ConfigError(f"{key}={value!r} is not valid; expected an integer >= {least}")
    tf = _tf.tf()
    info = get_dataset_info(name, config, data_dir=data_dir)
    data_dir = resolve_data_dir(data_dir, config)
    source = _Source(
        info, split or info.train_split, data_dir=data_dir, shard=shard,
        drop_remainder=True, config=config,
    )  # fmt: skip
    size = _output_size(info, image_size)
    if random_resized_crop is None:
        random_resized_crop = not info.device_resident
    if random_resized_crop and size is None:
        size = tuple(info.image_shape[:2])
    spe = steps_per_epoch(_count(_relabel(source.dataset(), classes, info.num_classes)), batch_size)

    def transform(position, ex, epoch_seed):
        if random_resized_crop:
            seed = tf.stack([tf.constant(epoch_seed, tf.int64), position])
            if source.encoded and fused_jpeg_crop:
                crop = decode_random_crop(
                    ex["image"], seed, channels=source.channels, decode=source.decode
                )
                image = _resize_crop(crop, size)
            else:
                image = _random_resized_crop(source.decode(ex["image"]), size, seed)
        else:
            image = source.decode(ex["image"])
            if size is not None:
                image = _resize(image, size)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    def epoch_pipeline(epoch: int, skip: int):
        epoch_seed = _epoch_seed(seed, epoch)
        ds = _relabel(source.dataset(shuffle_seed=epoch_seed), classes, info.num_classes)
        ds = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.enumerate().skip(skip * batch_size)  # positions count from the epoch's start
        # Encoded records buffered ahead: the shuffle then runs in a thread of its own instead of
        # in the parallel decoder's input loop, which it held back to about one core.
        ds = ds.prefetch(2 * batch_size)
        ds = ds.map(
            lambda i, ex, s=epoch_seed: transform(i, ex, s),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
        return ds.with_options(pipeline_options(threads))

    # The batches are read by a thread of their own, `prefetch` ahead (`read_ahead`), epoch
    # after epoch: the next epoch's shuffle buffer fills while the caller still takes the last
    # batches of the previous one, so the devices do not wait at epoch boundaries. The epochs'
    # pipelines are built here, in the caller's thread, one epoch ahead of use (tfds'
    # `as_dataset` is not made to be called from several threads at once).
    pipelines: queue.Queue = queue.Queue()

    def batches_of_built_epochs() -> Iterator[Batch]:
        while True:
            yield from pipelines.get().as_numpy_iterator()

    step = int(start_step)
    epoch, skip = divmod(step, spe)
    pipelines.put(epoch_pipeline(epoch, skip))
    pipelines.put(epoch_pipeline(epoch + 1, 0))
    for batch in read_ahead(batches_of_built_epochs(), prefetch):
        if step % spe == 0 and step > start_step:  # the first batch of epoch step // spe
            pipelines.put(epoch_pipeline(step // spe + 1, 0))
        yield batch
        step += 1


def eval_batches(
    source: str | tuple[np.ndarray, np.ndarray],
    split: str | None = None,
    *,
    batch_size: int,
    data_dir: str | None = None,
    shard: tuple[int, int] | None = None,
    image_size: int | Sequence[int] | None = None,
    classes: Sequence[int] | None = None,
    config: Any = None,
    num_batches: int | None = None,
    threads: int | None = None,
) -> Iterator[Batch]:
    """Evaluation batches {'image', 'label', 'mask' float32 [B]}: every example of the split
    (or of this process's shard) exactly once, in a fixed order; the last batch is padded with
    zeros and mask 0. `num_batches` adds empty batches so all processes take the same number.

    `source` is a dataset name (streamed from tfds, centre-cropped for ImageNet-like data) or
    in-memory `(images, labels)` arrays (the other arguments then do not apply). threads: as for
    `train_batches`.
    """
    if not isinstance(source, str):
        images, labels = source
        yield from array_eval_batches(
            images, labels, batch_size=batch_size, num_batches=num_batches
        )
        return
    tf = _tf.tf()
    info = get_dataset_info(source, config, data_dir=data_dir)
    data_dir = resolve_data_dir(data_dir, config)
    src = _Source(
        info, split or info.test_split, data_dir=data_dir, shard=shard,
        drop_remainder=False, config=config,
    )  # fmt: skip
    size = _output_size(info, image_size)

    def transform(ex):
        image = src.decode(ex["image"])
        if size is not None:
            image = _resize(image, size) if info.device_resident else _center_crop(image, size)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    ds = _relabel(src.dataset(), classes, info.num_classes)
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(2).with_options(pipeline_options(threads))
    count, last = 0, None
    for batch in ds.as_numpy_iterator():
        images, labels, mask = pad_to_batches(batch["image"], batch["label"], batch_size)
        last = {"image": images, "label": labels, "mask": mask}
        count += 1
        yield last
    if num_batches is not None and num_batches < count:
        raise DataError(f"num_batches={num_batches} is fewer than the {count} batches of the split")
    while num_batches is not None and count < num_batches:
        if last is None:
            h, w, c = (*size, info.image_shape[2]) if size else info.image_shape
            last = {"image": np.zeros((batch_size, h, w, c), np.uint8),
                    "label": np.zeros(batch_size, np.int32)}  # fmt: skip
        yield {"image": np.zeros_like(last["image"]), "label": np.zeros_like(last["label"]),
               "mask": np.zeros(batch_size, np.float32)}  # fmt: skip
        count += 1
