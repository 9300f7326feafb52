"""Lazy TensorFlow / tensorflow-datasets imports that keep TensorFlow off the accelerators.

TensorFlow is only a host-side reader here. If it saw the GPUs it would reserve their memory
before JAX gets it, so every data module that needs TensorFlow imports it through `tf()`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os

# TensorFlow only decodes and augments images here: its oneDNN kernels buy nothing and announce
# themselves on every start, as do its C++ info logs. A user's own setting wins. Set before
# tensorflow_datasets (which imports TensorFlow lazily) is first imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@functools.cache
def tf():
    """Returns the `tensorflow` module, with every GPU hidden from it."""
    import tensorflow as tf_module

    try:
        tf_module.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices (by the user); leave it.
        pass
    return tf_module


def tfds():
    """Returns `tensorflow_datasets` (importing it does not import TensorFlow by itself)."""
    import tensorflow_datasets as tfds_module

    return tfds_module


@contextlib.contextmanager
def quiet_prepare():
    """Silences tfds' progress bars and its "Downloading and preparing..." prints while a dataset
    is written (the library never prints; the CLI reports instead)."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = tqdm_utils._active
    tqdm_utils.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tqdm_utils.display_progress_bar(was_active)
