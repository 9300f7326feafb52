"""Host-side batch helpers shared by both feeders: batch-size checks, padded evaluation batches,
and assembling global (multi-host) arrays from each process's local batch. No TensorFlow."""

from __future__ import annotations

import collections
import functools
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from cnn_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]


def check_batch_size(
    batch_size: int, num_devices: int, *, process_count: int = 1, key: str = "train.batch_size"
) -> int:
    """Checks that the global `batch_size` (config key `key`) splits evenly over devices and
    processes, before anything is compiled; returns the per-process batch size."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"config key {key!r} has invalid value {batch_size!r}; expected an integer > 0"
        )
    for count, what in ((num_devices, "devices"), (process_count, "processes")):
        if batch_size % count:
            lower = batch_size // count * count
            options = " or ".join(str(b) for b in (lower, lower + count) if b > 0)
            raise ConfigError(
                f"config key {key!r} has invalid value {batch_size}: it must be "
                f"divisible by the number of {what} ({count}), e.g. {options}"
            )
    return batch_size // process_count


def pad_to_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, *, num_batches: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads [N, ...] arrays with zeros to num_batches * batch_size examples (default: the fewest
    batches holding all N) and returns (images, labels, mask float32 [M]), mask 1 on real ones."""
    n = len(labels)
    if len(images) != n:
        raise DataError(f"images ({len(images)}) and labels ({n}) differ in length")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size!r}: expected an integer >= 1")
    needed = math.ceil(n / batch_size)
    num_batches = needed if num_batches is None else num_batches
    if num_batches < needed:
        raise DataError(
            f"num_batches={num_batches} is too few for {n} examples in batches of {batch_size}"
        )
    pad = num_batches * batch_size - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return images, labels, mask


def array_eval_batches(
    images: np.ndarray, labels: np.ndarray, *, batch_size: int, num_batches: int | None = None
) -> Iterator[Batch]:
    """Evaluation batches over in-memory arrays: every example exactly once, the last batch
    padded, {'image', 'label', 'mask' float32 [B]}. `num_batches` pads with empty (all-masked)
    batches so every process of a multi-host run takes the same number of steps."""
    n = len(labels)
    num_batches = math.ceil(n / batch_size) if num_batches is None else num_batches
    for i in range(num_batches):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        x, y, mask = pad_to_batches(images[sl], labels[sl], batch_size, num_batches=1)
        yield {"image": x, "label": y.astype(np.int32), "mask": mask}


def to_global_batch(batch: Any, sharding: Any) -> Any:
    """This process's part of a batch (numpy pytree, local leading dim) -> global jax.Arrays
    laid out by `sharding` (one sharding, or a pytree of them matching `batch`), via
    `jax.make_array_from_process_local_data`. On one process this is a sharded device_put."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch, sharding)


def prefetch_to_device(batches: Iterable[Any], put: Any, size: int = 2) -> Iterator[Any]:
    """Moves batches to the devices `size` steps ahead of use, so the host-to-device copy of the
    next batch overlaps the current step (the copies are asynchronous). `put` is a sharding
    (see `to_global_batch`) or a function from a host batch to device arrays."""
    if not callable(put):
        put = functools.partial(to_global_batch, sharding=put)
    queue: collections.deque = collections.deque()
    iterator = iter(batches)
    for batch in iterator:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def read_ahead(items: Iterable[Any], size: int, *, close_timeout: float = 10.0) -> Iterator[Any]:
    """Yields `items` in their order, produced by a thread of its own up to `size` items ahead
    of the caller, so producing them overlaps the caller's work, also where one underlying
    iterator ends and the next begins (a streamed epoch's pipeline starts while the caller still
    takes the previous epoch's batches). An exception raised while producing is raised here, at
    its place in the sequence. Closing this generator (or dropping it) stops the thread and waits
    for the item it is producing, up to `close_timeout` seconds, so nothing is read after."""
    if size < 1:
        raise ValueError(f"size={size!r}: expected an integer >= 1")
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
            put(("error", e))

    thread = threading.Thread(target=produce, name="cnn_jax-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, payload = buffer.get()
            if kind == "error":
                raise payload
            if kind == "end":
                return
            yield payload
    finally:
        stop.set()
        thread.join(close_timeout)
