"""Prepared data dirs shared per test session: tfds builds take seconds, so each is built once."""

from __future__ import annotations

import pytest
from sample_files import make_idx_folder


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """A data dir with the digits dataset built (once per test session)."""
    from cnn_jax.data import load_split_arrays

    data_dir = str(tmp_path_factory.mktemp("digits_data"))
    load_split_arrays("digits", "train", data_dir=data_dir)
    return data_dir


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> tuple[str, dict]:
    """(data dir with a tiny `mnist` imported from IDX files, the source arrays)."""
    from cnn_jax.data import import_dataset

    root = tmp_path_factory.mktemp("tiny_mnist")
    arrays = make_idx_folder(root / "src", n_train=23, n_test=11)
    import_dataset("mnist", root / "src", root / "data")
    return str(root / "data"), arrays
