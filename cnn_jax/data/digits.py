"""`digits`: the UCI 8x8 handwritten digits bundled with scikit-learn, as a tfds dataset.

A real dataset that needs no network: the data ship inside scikit-learn, so the builder's
`download_and_prepare()` downloads nothing. Importing this module registers the builder, after
which `tfds.load('digits', data_dir=...)` builds it on first use and then reads it like any other
tfds dataset (same pipeline as MNIST).

1797 images of 8x8 pixels with values 0..16, scaled to uint8 0..255 (round(v * 255 / 16)).
Split: stratified, seeded (`StratifiedShuffleSplit(test_size=0.2, random_state=0)`):
train 1437 examples, test 360, each with the class proportions of the whole set.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

TRAIN_SIZE = 1437
TEST_SIZE = 360
SPLIT_SEED = 0

_CITATION = """\
@misc{alpaydin1998digits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}
"""


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images uint8 [1797, 8, 8, 1] in 0..255, labels int64 [1797]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
    """Indices into `digits_arrays()` of the train and test splits (sorted)."""
    from sklearn.model_selection import StratifiedShuffleSplit

    _, labels = digits_arrays()
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=SPLIT_SEED)
    train, test = next(splitter.split(np.zeros(len(labels)), labels))
    return {"train": np.sort(train), "test": np.sort(test)}


class Digits(tfds.core.GeneratorBasedBuilder):
    """UCI handwritten digits (8x8, 10 classes) from scikit-learn; builds offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: stratified 80/20 split with seed 0."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "UCI Optical Recognition of Handwritten Digits (the copy bundled with "
                "scikit-learn): 1797 grayscale 8x8 digits, pixel values 0..16 scaled to 0..255. "
                "Stratified seeded split: 1437 train, 360 test."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

    def _generate_examples(self, indices):
        images, labels = digits_arrays()
        for i in indices:  # key: the index in scikit-learn's array, stable across versions
            yield int(i), {"image": images[i], "label": int(labels[i])}
