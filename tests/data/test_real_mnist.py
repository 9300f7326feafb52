"""Import of the real MNIST files (../shared/data/mnist), checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sample_files import SHARED_MNIST

from cnn_jax.data import import_dataset
from cnn_jax.data.importers import IDX_FILES, read_idx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    if not all(
        (SHARED_MNIST / f"{stem}.gz").is_file() for pair in IDX_FILES.values() for stem in pair
    ):
        pytest.skip(f"the real MNIST IDX files are not present in {SHARED_MNIST}")
    data_dir = tmp_path_factory.mktemp("real_mnist")
    import_dataset("mnist", SHARED_MNIST, data_dir)
    return str(data_dir)


@pytest.mark.parametrize("split, size", [("train", 60000), ("test", 10000)])
def test_real_mnist_round_trip(mnist_dir, split, size):
    image_stem, label_stem = IDX_FILES[split]
    images = read_idx(SHARED_MNIST / f"{image_stem}.gz", 3)
    labels = read_idx(SHARED_MNIST / f"{label_stem}.gz", 1)
    builder = tfds.builder("mnist", data_dir=mnist_dir)
    assert builder.info.splits[split].num_examples == size
    loaded = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    assert loaded["image"].shape == (size, 28, 28, 1)
    # tfds stores a shuffled order: compare the sorted (pixels, label) rows.
    got = sorted(zip([im.tobytes() for im in loaded["image"]], loaded["label"].tolist()))
    want = sorted(zip([im.tobytes() for im in images], labels.tolist()))
    assert got == want
    assert np.bincount(loaded["label"], minlength=10).sum() == size
