"""Batch-size checks, padded evaluation batches and global arrays."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_jax.data import check_batch_size, eval_batches, pad_to_batches, to_global_batch
from cnn_jax.data.feeding import prefetch_to_device
from cnn_jax.errors import ConfigError


def test_check_batch_size():
    assert check_batch_size(128, 8) == 128
    assert check_batch_size(128, 8, process_count=2) == 64
    with pytest.raises(
        ConfigError, match=r"train.batch_size.*100.*number of devices \(8\).*96 or 104"
    ):
        check_batch_size(100, 8)
    with pytest.raises(ConfigError, match="processes"):
        check_batch_size(6, 2, process_count=4)
    with pytest.raises(ConfigError, match="integer > 0"):
        check_batch_size(0, 1)


@pytest.mark.parametrize("n, batch", [(10, 4), (12, 4), (1, 8), (37, 10)])
def test_eval_batches_cover_every_example_once(n, batch):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    labels = np.arange(n, dtype=np.int32)
    batches = list(eval_batches((images, labels), batch_size=batch))
    assert len(batches) == -(-n // batch)
    assert all(
        b["image"].shape == (batch, 1, 1, 1) and b["mask"].dtype == np.float32 for b in batches
    )
    seen = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(n))
    assert sum(b["mask"].sum() for b in batches) == n


def test_eval_batches_pad_to_a_common_count():
    images, labels = np.zeros((5, 2, 2, 1), np.uint8), np.zeros(5, np.int32)
    batches = list(eval_batches((images, labels), batch_size=4, num_batches=4))
    assert [b["mask"].sum() for b in batches] == [4, 1, 0, 0]


def test_pad_to_batches():
    x, y, mask = pad_to_batches(np.ones((5, 3), np.uint8), np.ones(5, np.int32), 4)
    assert x.shape == (8, 3) and y.tolist() == [1] * 5 + [0] * 3 and mask.sum() == 5
    assert x[5:].sum() == 0


def test_to_global_batch_shards_over_devices():
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    n = 2 * len(devices)
    batch = {"image": np.zeros((n, 4, 4, 1), np.uint8), "label": np.arange(n, dtype=np.int32)}
    out = to_global_batch(batch, sharding)
    assert out["label"].sharding == sharding and np.array_equal(out["label"], batch["label"])
    assert len(out["image"].addressable_shards) == len(devices)
    moved = list(prefetch_to_device([batch] * 3, sharding, size=2))
    assert len(moved) == 3 and isinstance(moved[0]["image"], jax.Array)
