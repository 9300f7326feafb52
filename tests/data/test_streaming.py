"""The streaming tf.data feeder: batches, determinism, exact resume, evaluation coverage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax.data import eval_batches, train_batches
from cnn_jax.data.streaming import _center_crop


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_train_batches_shapes_and_determinism(digits_dir):
    kw = {"batch_size": 32, "seed": 3, "data_dir": digits_dir}
    a = _take(train_batches("digits", **kw), 3)
    b = _take(train_batches("digits", **kw), 3)
    c = _take(train_batches("digits", **{**kw, "seed": 4}), 3)
    assert a[0]["image"].shape == (32, 8, 8, 1) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].shape == (32,) and a[0]["label"].dtype == np.int32
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_resume_at_start_step_is_exact_across_epochs(digits_dir):
    # 1437 // 200 = 7 steps per epoch: steps 5..9 cross into epoch 1.
    kw = {"batch_size": 200, "seed": 0, "data_dir": digits_dir, "image_size": 12}
    full = _take(train_batches("digits", **kw), 10)
    resumed = _take(train_batches("digits", start_step=5, **kw), 5)
    for x, y in zip(full[5:], resumed):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    assert full[0]["image"].shape == (200, 12, 12, 1)
    epoch0 = np.concatenate([b["label"] for b in full[:7]])
    assert len(epoch0) == 1400  # drop remainder
    # Epochs are shuffled differently.
    assert not np.array_equal(full[0]["label"], full[7]["label"])


def test_class_subset_and_shards(digits_dir):
    batches = _take(
        train_batches("digits", batch_size=16, seed=0, data_dir=digits_dir, classes=[3, 7]), 4
    )
    assert set(np.concatenate([b["label"] for b in batches]).tolist()) == {0, 1}
    first = [_take(train_batches("digits", batch_size=8, seed=0, data_dir=digits_dir,
                                 shard=(i, 2)), 1)[0] for i in range(2)]  # fmt: skip
    assert first[0]["image"].shape == first[1]["image"].shape == (8, 8, 8, 1)


@pytest.mark.parametrize("batch", [7, 100, 360, 500])
def test_streamed_eval_covers_the_split_once(digits_dir, batch):
    batches = list(eval_batches("digits", "test", batch_size=batch, data_dir=digits_dir))
    assert len(batches) == -(-360 // batch)
    assert sum(b["mask"].sum() for b in batches) == 360
    assert all(b["image"].shape[0] == batch for b in batches)
    real = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    want = tfds.as_numpy(tfds.load("digits", split="test", data_dir=digits_dir, batch_size=-1))
    assert sorted(im.tobytes() for im in real) == sorted(im.tobytes() for im in want["image"])


def test_streamed_eval_shards_and_common_batch_count(digits_dir):
    total = 0
    for i in range(3):
        batches = list(eval_batches("digits", "test", batch_size=50, data_dir=digits_dir,
                                    shard=(i, 3), num_batches=4))  # fmt: skip
        assert len(batches) == 4
        total += sum(b["mask"].sum() for b in batches)
    assert total == 360


def test_shuffling_is_seeded_with_mock_data():
    with tfds.testing.mock_data(num_examples=64):
        a = _take(train_batches("cifar10", batch_size=16, seed=1), 4)
        b = _take(train_batches("cifar10", batch_size=16, seed=1), 4)
        c = _take(train_batches("cifar10", batch_size=16, seed=2), 4)
    assert a[0]["image"].shape == (16, 32, 32, 3) and a[0]["label"].dtype == np.int32
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    epoch0 = {im.tobytes() for batch in a for im in batch["image"]}
    assert len(epoch0) == 64  # one epoch visits every example once


def test_imagenet_like_stream_with_mock_data():
    # Varying image sizes: random-resized crop for training, centre crop for evaluation.
    with tfds.testing.mock_data(num_examples=24):
        batch = next(train_batches("imagenette", batch_size=8, seed=0, image_size=32))
        ev = list(eval_batches("imagenette", batch_size=10, image_size=32))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].max() < 10
    assert [b["mask"].sum() for b in ev] == [10, 10, 4] and ev[0]["image"].shape == (10, 32, 32, 3)


def test_center_crop_keeps_the_middle():
    import tensorflow as tf

    image = np.zeros((70, 140, 3), np.uint8)
    image[:, 60:80] = 255  # a bright band in the middle
    out = _center_crop(tf.constant(image), (8, 8)).numpy()
    assert out.shape == (8, 8, 3) and out[:, 3:5].min() > 200 and out[:, 0].max() < 50


def test_synthetic_streams_from_memory():
    batch = next(train_batches("synthetic", batch_size=16, seed=0))
    assert batch["image"].shape == (16, 28, 28, 1)
