"""`cnn_jax.bench.run_benchmark`: the documented keys, on a tiny config (not a timed test)."""

from __future__ import annotations

import json
import types

import pytest

from cnn_jax.bench import BENCH_MODELS, RESULT_KEYS, bench_spec, peak_bf16_flops, run_benchmark
from cnn_jax.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_result():
    return run_benchmark(
        "mlp",
        8,
        2,
        input_shape=(8, 8, 1),
        num_classes=3,
        windows=2,
        options={"hidden_features": (16,)},
    )


def test_run_benchmark_returns_documented_keys(tiny_result):
    r = tiny_result
    assert set(RESULT_KEYS) <= set(r)
    for key in ("model", "batch_size", "images_per_sec", "compile_seconds", "device"):
        assert key in r
    assert r["model"] == "mlp" and r["batch_size"] == 8 and r["steps"] == 2
    assert r["input_shape"] == [8, 8, 1] and r["num_classes"] == 3
    assert r["num_params"] == 8 * 8 * 16 + 16 + 16 * 3 + 3
    assert len(r["window_images_per_sec"]) == 2
    # Values are measurements: only their types and signs are checked, never their size.
    assert isinstance(r["images_per_sec"], float) and r["images_per_sec"] > 0
    assert isinstance(r["compile_seconds"], float) and r["compile_seconds"] >= 0
    assert isinstance(r["device"], str) and r["device"]
    json.dumps(r)  # the CLI's --json must be able to print it


def test_memory_and_mfu_are_reported_or_explained(tiny_result):
    r = tiny_result
    assert r["peak_memory_source"]
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
    if r["platform"] == "cpu":
        assert r["mfu"] is None and "CPU" in r["mfu_note"]


def test_compiled_loop_switch():
    r = run_benchmark(
        "mlp",
        8,
        3,
        input_shape=(4, 4, 1),
        num_classes=2,
        windows=1,
        steps_per_call=3,
        options={"hidden_features": (4,)},
    )
    assert r["compiled_loop"] is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model_name": "no_such_model"}, "unknown model"),
        ({"model_name": "mlp", "batch_size": 0}, "batch_size"),
        ({"model_name": "mlp", "steps": -1}, "steps"),
        ({"model_name": "mlp", "dtype": "float16"}, "dtype"),
        ({"model_name": "mlp", "backend": "tpu"}, "backend"),
        ({"model_name": "mlp", "input_shape": (8, 8)}, "input_shape"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run_benchmark(**kwargs)


def test_bench_specs_and_peak_table():
    assert bench_spec("lenet5")["input_shape"] == (28, 28, 1)
    assert bench_spec("resnet18")["options"] == {"cifar_stem": True}
    assert bench_spec("alexnet") == {"input_shape": (32, 32, 3), "num_classes": 10, "options": {}}
    assert set(BENCH_MODELS) == {
        "lenet5",
        "simple_convnet",
        "vgg16",
        "vgg16_bn",
        "resnet18",
        "resnet50",
    }
    dev = lambda platform, kind: types.SimpleNamespace(platform=platform, device_kind=kind)
    assert peak_bf16_flops(dev("cpu", "cpu")) is None
    assert peak_bf16_flops(dev("gpu", "NVIDIA H100 80GB HBM3")) == 989.4e12
    assert peak_bf16_flops(dev("gpu", "NVIDIA H100 PCIe")) == 756e12
    assert peak_bf16_flops(dev("gpu", "NVIDIA H200")) == 989.4e12
    assert peak_bf16_flops(dev("gpu", "Some Future GPU")) is None


_BLOCK_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is hidden for this test")

sys.meta_path.insert(0, NoTorch())
sys.argv = ["train_throughput.py", "--models", "lenet5", "--no-markdown"]
runpy.run_path("benchmarks/train_throughput.py", run_name="__main__")
"""


def test_throughput_script_without_torch_says_which_extra():
    """Without PyTorch the script stops at once and names the bench extra (it used to die with
    ModuleNotFoundError after compiling the first model)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _BLOCK_TORCH], cwd=repo, capture_output=True, check=False,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "install the bench extra" in result.stderr and "Traceback" not in result.stderr
