"""End to end on tfds datasets: mocked MNIST (Flax-examples style) and the real `digits`."""

import pytest
import tensorflow_datasets as tfds
from train_helpers import tiny_config

from cnn_jax.config import apply_overrides, load_config
from cnn_jax.train import train_and_evaluate


@pytest.mark.parametrize("feeder", ["device", "streaming"])
def test_train_and_evaluate_on_mock_mnist(tmp_path, feeder):
    config = tiny_config(
        "dataset.name=mnist",
        f"dataset.feeder={feeder}",
        f"dataset.data_dir={tmp_path / 'data'}",
        "train.num_epochs=1",
        "train.eval_batch_size=16",
    )
    with tfds.testing.mock_data(num_examples=40):
        results = train_and_evaluate(config, tmp_path / "run")
    assert results["steps"] == 40 // 8
    assert 0.0 <= results["final_test_accuracy"] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "5").is_dir()


@pytest.mark.slow
def test_lenet5_on_real_digits_reaches_97_percent(tmp_path):
    """The main job (`make run`): LeNet-5 on scikit-learn's digits, >= 97% test accuracy."""
    config = apply_overrides(
        load_config("lenet5_digits"), [f"dataset.data_dir={tmp_path / 'data'}"]
    )
    results = train_and_evaluate(config, tmp_path / "run")
    assert results["final_test_accuracy"] >= 0.97
    assert results["num_params"] == 61706
