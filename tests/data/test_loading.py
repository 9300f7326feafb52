"""Whole-split loading: mocked standard builders, the real digits dataset, shards, subsets,
and the offline error for datasets that are not prepared."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax.config import apply_overrides, default_config
from cnn_jax.data import digits, get_dataset_info, load_split_arrays
from cnn_jax.errors import DataError


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_standard_builders_with_mock_data(name):
    info = get_dataset_info(name)
    with tfds.testing.mock_data(num_examples=21):
        x, y = load_split_arrays(name, "train")
        x2, _ = load_split_arrays(name, info.test_split)
    assert x.shape == (21, *info.image_shape) and x.dtype == np.uint8
    assert y.shape == (21,) and y.dtype == np.int32
    assert 0 <= y.min() and y.max() < info.num_classes
    assert x2.shape == x.shape


def test_standard_builder_shards_are_disjoint_and_complete(tiny_mnist):
    # The real `mnist` builder reading a (tiny) prepared dataset: 23 examples over 4 processes.
    data_dir, arrays = tiny_mnist
    parts = [load_split_arrays("mnist", "train", data_dir=data_dir, shard=(i, 4)) for i in range(4)]
    assert [len(y) for _, y in parts] == [6, 6, 6, 5]
    rows = sorted(im.tobytes() + bytes([int(y)]) for x, ys in parts for im, y in zip(x, ys))
    images, labels = arrays["train"]
    assert rows == sorted(
        im[..., None].tobytes() + bytes([int(y)]) for im, y in zip(images, labels)
    )


def test_class_subset_is_relabelled():
    with tfds.testing.mock_data(num_examples=200):
        _, y_all = load_split_arrays("cifar10", "train")
        x, y = load_split_arrays("cifar10", "train", classes=[2, 3, 5, 8])
    keep = np.isin(y_all, [2, 3, 5, 8])
    assert len(y) == keep.sum() and x.shape[0] == len(y)
    assert np.array_equal(y, np.searchsorted([2, 3, 5, 8], y_all[keep]))
    with (
        pytest.raises(DataError, match="distinct class indices"),
        tfds.testing.mock_data(num_examples=5),
    ):
        load_split_arrays("cifar10", "train", classes=[2, 2])


def test_not_prepared_is_a_clear_error_without_download(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(DataError) as e:
        load_split_arrays("cifar10", "train", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "cnn-jax data import cifar10 --from PATH" in msg and "TFDS_DATA_DIR" in msg
    assert str(tmp_path) in msg and "not prepared" in msg


def test_unprepared_builder_reports_not_prepared_to_every_caller(tmp_path):
    """`open_builder`'s builder raises the same DataError from `as_dataset` whoever calls it (the
    streaming feeder's example count ended with tfds' AssertionError: issue 12 item 13)."""
    from cnn_jax.data import eval_batches, train_batches
    from cnn_jax.data.loading import open_builder

    builder = open_builder(get_dataset_info("mnist"), str(tmp_path))
    with pytest.raises(DataError, match="'mnist' .* not prepared .*cnn-jax data import mnist"):
        builder.as_dataset(split="train")
    with pytest.raises(DataError, match="not prepared in data dir"):
        next(eval_batches("fashion_mnist", batch_size=4, data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="does not read 'imagenette'") as e:
        next(train_batches("imagenette", batch_size=2, seed=0, data_dir=str(tmp_path)))
    assert "`tfds build imagenette/160px-v2 --data_dir DIR`" in str(e.value)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
    with pytest.raises(DataError, match="env_dir"):
        load_split_arrays("mnist", "test")


def test_building_digits_in_an_unwritable_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="could not build dataset 'digits'"):
        load_split_arrays("digits", "train", data_dir=str(blocker / "data"))


def test_digits_end_to_end(digits_dir):
    # Real data: exact sizes, the stratified split, and the same pixels as scikit-learn's.
    x_train, y_train = load_split_arrays("digits", "train", data_dir=digits_dir)
    x_test, y_test = load_split_arrays("digits", "test", data_dir=digits_dir)
    assert x_train.shape == (digits.TRAIN_SIZE, 8, 8, 1) == (1437, 8, 8, 1)
    assert x_test.shape == (digits.TEST_SIZE, 8, 8, 1) == (360, 8, 8, 1)
    all_images, all_labels = digits.digits_arrays()
    whole = np.bincount(all_labels) / len(all_labels)
    for y in (y_train, y_test):
        assert np.abs(np.bincount(y, minlength=10) / len(y) - whole).max() < 0.01  # stratified
    idx = digits.split_indices()
    assert set(idx["train"]).isdisjoint(idx["test"])
    want = sorted(zip([im.tobytes() for im in all_images[idx["test"]]], all_labels[idx["test"]]))
    got = sorted(zip([im.tobytes() for im in x_test], y_test))
    assert [(a, int(b)) for a, b in got] == [(a, int(b)) for a, b in want]
    assert x_train.max() == 255 and x_train.min() == 0
    info = get_dataset_info("digits")
    np.testing.assert_allclose(info.mean, [x_train.mean() / 255], atol=1e-4)
    np.testing.assert_allclose(info.std, [(x_train / 255).std()], atol=1e-4)


def test_plain_tfds_load_of_digits_after_importing_cnn_jax_data(digits_dir):
    ds = tfds.load("digits", split="test", data_dir=digits_dir, batch_size=-1)
    assert tfds.as_numpy(ds)["image"].shape == (360, 8, 8, 1)


@pytest.mark.parametrize("count", [2, 3, 7])
def test_shards_are_disjoint_and_complete(digits_dir, count):
    _, _whole = load_split_arrays("digits", "test", data_dir=digits_dir)
    parts = [load_split_arrays("digits", "test", data_dir=digits_dir, shard=(i, count))
             for i in range(count)]  # fmt: skip
    sizes = [len(y) for _, y in parts]
    assert sum(sizes) == 360 and max(sizes) - min(sizes) <= 1
    rows = [im.tobytes() + bytes([int(y)]) for x, ys in parts for im, y in zip(x, ys)]
    images, labels = load_split_arrays("digits", "test", data_dir=digits_dir)
    assert sorted(rows) == sorted(im.tobytes() + bytes([int(y)]) for im, y in zip(images, labels))
    equal = [load_split_arrays("digits", "test", data_dir=digits_dir, shard=(i, 7),
                               drop_remainder=True)[1].size for i in range(7)]  # fmt: skip
    assert len(set(equal)) == 1
    with pytest.raises(DataError, match="process_index"):
        load_split_arrays("digits", "test", data_dir=digits_dir, shard=(3, 3))


def test_unknown_split(digits_dir):
    with pytest.raises(DataError, match="bad split 'valid'"):
        load_split_arrays("digits", "valid", data_dir=digits_dir)


def test_synthetic_is_deterministic_and_configurable():
    config = apply_overrides(
        default_config(),
        ["dataset.synthetic_shape=[5, 6, 3]", "dataset.synthetic_classes=3",
         "dataset.synthetic_size=50"],
    )  # fmt: skip
    x, y = load_split_arrays("synthetic", "train", config=config)
    assert x.shape == (50, 5, 6, 3) and x.dtype == np.uint8 and set(y.tolist()) <= {0, 1, 2}
    x2, y2 = load_split_arrays("synthetic", "train", config=config)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    xt, _ = load_split_arrays("synthetic", "test", config=config)
    assert not np.array_equal(xt, x)
    parts = [
        load_split_arrays("synthetic", "train", config=config, shard=(i, 3))[1] for i in range(3)
    ]
    assert np.array_equal(np.concatenate(parts), y)


def test_importing_cnn_jax_data_does_not_import_tensorflow():
    code = "import sys, cnn_jax.data; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
