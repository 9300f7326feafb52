"""Every experiment runs end to end for a couple of steps: configs through `cnn-jax train`
(real digits, mock data for datasets that cannot be present offline) and the script experiments.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cnn_jax import cli
from cnn_jax.config import available_experiments, load_config, validate_config

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
CONFIGS = [
    "lenet5_digits",
    "lenet5_mnist",
    "lenet5_fashion_mnist",
    "simple_convnet_cifar4",
    "vgg16_cifar10",
    "resnet18_cifar10",
    "resnet50_imagenet",
    "resnet18_digits_finetune",  # needs a weights file: tests/train/test_finetune.py runs it
]
# Tiny runs: batches divisible by the 8 forced CPU devices of `make test`.
TINY = ["train.batch_size=8", "train.eval_batch_size=8", "checkpoint.async_save=False"]


@pytest.fixture(scope="module", autouse=True)
def data_dir(tmp_path_factory):
    """A private tfds data dir (the digits dataset is built there on first use)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("tfds")
        mp.setenv("TFDS_DATA_DIR", str(path))
        yield path


def run_script(name, argv):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def assert_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_every_config_is_listed_and_valid():
    assert available_experiments() == sorted(CONFIGS)
    from cnn_jax.data import get_dataset_info
    from cnn_jax.models import model_options

    for name in CONFIGS:
        config = validate_config(load_config(name))
        assert config.experiment == name
        assert set(config.model.options) <= set(model_options(config.model.name))
        get_dataset_info(config.dataset.name, config)


@pytest.mark.slow
def test_lenet5_digits_train_resume_and_pictures(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "lenet5_digits", "--workdir", str(workdir), "--set", *TINY]
    assert cli.main([*argv, "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "model lenet5: 61,706 parameters, input 32x32x1, 10 classes" in out
    assert "results: best test accuracy" in out
    for name in ("curves.png", "pictures/filters.png", "pictures/feature_maps.png"):
        assert_png(workdir / name)
        assert str(workdir / name) in out
    assert cli.main([*argv, "--max-steps", "3", "--no-pictures"]) == 0
    out = capsys.readouterr().out
    assert "resuming from the checkpoint of step 2" in out
    assert "3 steps" in out

    # A damaged newest checkpoint: --strict stops; otherwise the run resumes from the one before.
    for data_file in (workdir / "checkpoints" / "3" / "variables").rglob("d/*"):
        data_file.write_bytes(b"")
    assert cli.main([*argv, "--max-steps", "4", "--no-pictures", "--strict"]) == 2
    _, err = capsys.readouterr()
    assert "damaged" in err and "Traceback" not in err
    assert cli.main([*argv, "--max-steps", "4", "--no-pictures"]) == 0
    out, err = capsys.readouterr()
    assert "warning: skipped a damaged checkpoint" in err
    assert "resuming from the checkpoint of step 2" in out


MOCKED = [
    pytest.param("lenet5_mnist", [], id="lenet5_mnist"),
    pytest.param("lenet5_fashion_mnist", [], id="lenet5_fashion_mnist"),
    pytest.param("simple_convnet_cifar4", [], id="simple_convnet_cifar4"),
]
# The big models run in a one-device subprocess: compiling them for the 8 forced CPU devices of
# `make test` takes minutes, and multi-device training is tested in tests/train.
MOCKED_BIG = [
    pytest.param("vgg16_cifar10", [], id="vgg16_cifar10"),
    pytest.param("resnet18_cifar10", [], id="resnet18_cifar10"),
    # 32x32 instead of 224x224 keeps the CPU run short; the model and recipe are unchanged.
    pytest.param("resnet50_imagenet", ["dataset.image_size=32"], id="resnet50_imagenet"),
]
MOCK_MAIN = """
import sys
import tensorflow_datasets as tfds
from cnn_jax import cli
with tfds.testing.mock_data(num_examples=64):
    sys.exit(cli.main(sys.argv[1:]))
"""


def train_argv(name, workdir, extra):
    return ["train", name, "--workdir", str(workdir), "--max-steps", "2", "--no-pictures",
            "--set", *TINY, *extra]  # fmt: skip


@pytest.mark.parametrize("name, extra", MOCKED)
def test_config_runs_on_mock_data(tmp_path, capsys, name, extra):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=64):
        code = cli.main(train_argv(name, tmp_path, extra))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "results: best test accuracy" in out
    assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("name, extra", MOCKED_BIG)
def test_big_config_runs_on_mock_data(tmp_path, name, extra):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    argv = [sys.executable, "-c", MOCK_MAIN, *train_argv(name, tmp_path, extra)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "results: best test accuracy" in done.stdout
    assert (tmp_path / "metrics.jsonl").exists()


def test_filters_script_through_the_cli(tmp_path, capsys):
    assert cli.main(["run", "filters", "--workdir", str(tmp_path)]) == 0
    for name in ("filters_digit.png", "filters_photo.png"):
        assert_png(tmp_path / name)
    rows = json.loads((tmp_path / "output_sizes.json").read_text())
    assert len(rows) == 8
    assert all(r["formula"] == r["conv_output_size"] == r["conv2d"] for r in rows)
    assert "| photo | 427x640 | 3 | 2 | 1 | 214x320 |" in capsys.readouterr().out


@pytest.mark.slow
def test_feature_maps_script_trains_then_draws(tmp_path, capsys):
    argv = ["--workdir", str(tmp_path), "--max-steps", "2", "--set", *TINY]
    assert run_script("feature_maps", argv) == 0
    for name in ("filters.png", "feature_maps.png", "probabilities.png"):
        assert_png(tmp_path / "pictures" / name)
    assert "(label 8)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.heavy
def test_mlp_vs_cnn_script(tmp_path):
    argv = ["--workdir", str(tmp_path), "--max-steps", "2", "--max-shift", "1", "--set", *TINY]
    assert run_script("mlp_vs_cnn", argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in results["models"]] == ["cnn (lenet5)", "mlp [64, 32]"]
    for row in results["models"]:
        assert set(row["shift_accuracy"]) == {"0", "1"}
        assert 0 <= row["shift_accuracy"]["1"] <= 1
    cnn, mlp = (r["parameters"] for r in results["models"])
    assert 0.8 < mlp / cnn < 1.25  # comparable parameter budgets
    assert_png(tmp_path / "shift_robustness.png")
    assert "| model | parameters |" in (tmp_path / "results.md").read_text()
