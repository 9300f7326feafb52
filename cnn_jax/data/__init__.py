"""Input pipelines on tensorflow-datasets that run offline.

Contract for the training engine (shapes: images NHWC; pixels uint8 until `preprocess`):

Registry (`registry.py`)
  `get_dataset_info(name, config=None) -> DatasetInfo` (name, tfds_name, image_shape (H, W, C),
  num_classes, class_names, mean, std per channel in [0, 1] pixel units, train_split, test_split,
  device_resident); `available_datasets()`; unknown name -> DataError listing the names.
  `imported_datasets(data_dir)`: the image folders imported there (found by name, too).
  `choose_feeder(info, config) -> 'device' | 'streaming'` (config.dataset.feeder, 'auto' keeps
  MNIST, Fashion-MNIST, CIFAR, digits and synthetic on the device).

Device-resident feeder
  `load_split_arrays(name, split, *, data_dir, shard=(process_index, process_count), classes,
  config, drop_remainder=False) -> (images uint8 [N, H, W, C], labels int32 [N])`, numpy.
  Training order (`order.py`), all jit-able with a traced step:
    `batch_indices(data_key, step, num_examples=N, batch_size=B)` -> int32 [B]: epoch
    e = step // (N // B) uses `jax.random.permutation(jax.random.fold_in(data_key, e), N)`,
    batch i of the epoch is perm[i*B:(i+1)*B] (remainder dropped); `epoch_permutation`,
    `steps_per_epoch`. `batch_indices` re-sorts N keys per call (tens of ms on CPU for
    N = 60,000): compute `epoch_permutation` once per epoch and slice it in the step with
    `batch_from_permutation(perm, step, batch_size=B)` (same indices). Multi-host: pass
    drop_remainder=True with the shard so every process has the same N.
  Augmentation (`augment.py`), with the key `jax.random.fold_in(aug_key, step)`:
    `preprocess(images_u8, key, *, train, mean, std, image_size=None, crop_padding=0,
    flip=False) -> float32 [B, S, S, C]` = resize, (train) random crop + flip, normalise;
    also `resize`, `random_crop`, `random_flip`, `normalize`.

Streaming feeder (`streaming.py`, tf.data on the host, TensorFlow kept off the GPUs)
  `train_batches(name, split, *, batch_size (per process), seed, start_step, data_dir, shard,
  image_size, classes, config) -> iterator of {'image': uint8 [B, H, W, C], 'label': int32 [B]}`;
  deterministic in (seed, step) and resumable exactly at start_step (but not the same order as
  `order.py`: see streaming.py). Then `preprocess(..., image_size=None)` on the device.

Evaluation
  `eval_batches(name or (images, labels), split, *, batch_size, num_batches=None, ...)` ->
  {'image', 'label', 'mask' float32 [B]}: every example exactly once, last batch zero-padded
  with mask 0. `pad_to_batches` does the same for whole device-resident arrays.

Hosts and devices (`feeding.py`)
  `check_batch_size(batch_size, num_devices, process_count=1)` -> per-process batch, or a
  ConfigError before anything compiles; `to_global_batch(local_batch, sharding)` via
  `jax.make_array_from_process_local_data`; `prefetch_to_device(batches, sharding, size)`.

Offline import (`importers.py`)
  `import_dataset(name, source_path, data_dir=None, overwrite=False) -> Path`: mnist and
  fashion_mnist from the IDX files, cifar10/cifar100 from the python-pickle tarball or folder,
  any other name from a class-per-folder image tree. Afterwards `tfds.load(name, data_dir=...)`
  works with no network.

Nothing downloads: a dataset that is not prepared raises DataError naming
`cnn-jax data import NAME --from PATH` and TFDS_DATA_DIR. `digits` (the UCI digits bundled with
scikit-learn) builds locally on first use; importing this package registers its tfds builder.
"""

from cnn_jax.data import _tf  # noqa: F401  (quiets TensorFlow before anything imports it)
from cnn_jax.data import digits as _digits  # noqa: F401  (registers the `digits` tfds builder)
from cnn_jax.data.augment import normalize, preprocess, random_crop, random_flip, resize
from cnn_jax.data.feeding import (
    check_batch_size,
    pad_to_batches,
    prefetch_to_device,
    to_global_batch,
)
from cnn_jax.data.importers import import_dataset
from cnn_jax.data.loading import load_split_arrays, shard_split
from cnn_jax.data.order import (
    batch_from_permutation,
    batch_indices,
    epoch_permutation,
    steps_per_epoch,
)
from cnn_jax.data.registry import (
    DatasetInfo,
    available_datasets,
    choose_feeder,
    get_dataset_info,
    imported_datasets,
    resolve_data_dir,
)
from cnn_jax.data.streaming import eval_batches, train_batches

__all__ = [
    "DatasetInfo",
    "available_datasets",
    "batch_from_permutation",
    "batch_indices",
    "check_batch_size",
    "choose_feeder",
    "epoch_permutation",
    "eval_batches",
    "get_dataset_info",
    "import_dataset",
    "imported_datasets",
    "load_split_arrays",
    "normalize",
    "pad_to_batches",
    "prefetch_to_device",
    "preprocess",
    "random_crop",
    "random_flip",
    "resize",
    "resolve_data_dir",
    "shard_split",
    "steps_per_epoch",
    "to_global_batch",
    "train_batches",
]
