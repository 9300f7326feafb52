"""benchmarks/gpu_check.sh: the dry run exercises every phase on CPU, the parent's bookkeeping
(time limits, targets, report-only) works, and a machine without an accelerator is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def _run(args, **kw):
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests
    # One device, as on the lent GPU machine: `make test` forces 8 CPU devices, and the dry run's
    # batch of 4 does not split over 8 (its stand-in phase failed after 2 s there).
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        **kw,
    )


def test_dry_run_exercises_every_phase(tmp_path):
    pytest.importorskip("torch", reason="the PyTorch side needs the bench extra (torch)")
    results_md = REPO / "benchmarks" / "RESULTS.md"
    before = (_digest(results_md), sorted(os.listdir(REPO / "benchmarks" / "results")))
    done = _run(["--dry-run", "--out-dir", str(tmp_path)], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    phases = data["phases"]
    assert {n: p["status"] for n, p in phases.items()} == {
        "probe": "ok", "resnet50": "ok", "lenet5_mnist": "ok"
    }  # fmt: skip
    # The GPU rows' models built in both frameworks with equal parameter counts.
    builds = {b["model"]: b for b in phases["probe"]["result"]["builds"]}
    assert set(builds) == {"resnet50", "resnet18", "vgg16"}
    assert all(b["equal"] and b["jax_params"] > 1e6 for b in builds.values())
    # One timed window per framework, bf16 on the cnn_jax side, FLOPs counted.
    row = phases["resnet50"]["result"]
    assert len(row["window_images_per_sec"]) == len(row["torch_window_images_per_sec"]) == 1
    assert row["images_per_sec"] > 0 and row["torch_images_per_sec"] > 0
    assert row["dtype"] == "bfloat16" and row["flops_per_step"] > 0
    assert row["flops_compiled_over_lowered"] == pytest.approx(1.0)  # CPU counts the lowered one
    tta = phases["lenet5_mnist"]["result"]
    assert tta["epochs_run"] == 1 and 0 <= tta["final_test_accuracy"] <= 1
    assert tta["num_train"] == 96 and tta["steps_per_epoch"] == 3
    # The table went to the dry run's own RESULTS.md, never to the project's.
    table = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- gpu_check_dry_run:start -->" in table and "DRY RUN" in table
    assert "| simple_convnet (dry-run stand-in for resnet50) | 16x16x3 | 4 |" in table
    assert "| vgg16 | 32x32x3 | 134,301,514 | 134,301,514 | True |" in table
    assert "XLA's FLOPs per training image: simple_convnet" in table
    assert (_digest(results_md), sorted(os.listdir(REPO / "benchmarks" / "results"))) == before


def test_refuses_a_machine_without_an_accelerator(tmp_path):
    done = _run(["--out-dir", str(tmp_path), "--phases", "lenet5_mnist"], timeout=300)
    assert done.returncode == 2
    assert "no accelerator" in done.stdout + done.stderr
    assert not list(tmp_path.glob("*.json"))


def test_a_phase_past_its_limit_is_killed_with_what_it_started():
    child = (
        "import subprocess, time\n"
        "p = subprocess.Popen(['sleep', '60'])\n"
        "print('grandchild', p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.perf_counter()
    outcome = gpu_check.run_phase([sys.executable, "-c", child], 2, label="t")
    assert outcome["status"] == "timed out" and time.perf_counter() - t0 < 20
    pid = int(outcome["output_tail"][0].split()[1])
    for _ in range(50):  # the orphan is reaped by init shortly after the kill
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the phase's own child {pid} survived the time limit")
    failed = gpu_check.run_phase([sys.executable, "-c", "raise SystemExit(3)"], 30, label="t")
    assert failed["status"] == "failed" and failed["returncode"] == 3


def _fake_run(ips: float, torch_ips: float, lenet_seconds: float | None) -> dict:
    row = {
        "images_per_sec": ips, "torch_images_per_sec": torch_ips, "ratio": ips / torch_ips,
        "mfu": 0.2, "torch_mfu": 0.2 * torch_ips / ips, "peak_memory_bytes": 2**34,
        "torch_peak_memory_bytes": 2**33, "compile_seconds": 40.0,
        "torch_first_call_seconds": 80.0,
    }  # fmt: skip
    tta = {
        "experiment": "lenet5_mnist", "overrides": [], "batch_size": 128,
        "training_seconds_to_target": lenet_seconds, "epochs_to_target": 4,
        "train_images_per_sec": 500_000.0, "compile_seconds": 3.0, "eval_seconds": 0.2,
        "final_test_accuracy": 0.991, "num_train": 60_000, "num_test": 10_000, "mnist": "m",
    }  # fmt: skip
    machine = {"cpu": "x", "cores": 16, "accelerator": "1 x H100", "os": "Linux",
               "load_average_at_start": 0.1}  # fmt: skip
    probe = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "num_devices": 1,
             "peak_bf16_flops": 989.4e12, "machine": machine, "versions": {"jax": "x"}}  # fmt: skip
    ok = lambda result: {"status": "ok", "seconds": 1.0, "result": result}
    return {
        "meta": {"date": "d", "dry_run": False, "budget_s": 450, "command": "c",
                 "platform": "gpu", "total_seconds": 300, "load_average_at_end": 0.1},
        "phases": {"probe": ok(probe), "resnet50": ok(row), "lenet5_mnist": ok(tta),
                   "resnet18": {"status": "timed out", "seconds": 130.0},
                   "vgg16": {"status": "skipped", "seconds": 0.0,
                             "reason": "time budget spent (3 s left)"}},
    }  # fmt: skip


def test_table_says_which_targets_are_met():
    good = gpu_check.markdown(_fake_run(5200.0, 5000.0, 0.6))
    assert "| 5,200 | 5,000 | 1.04 | 20.0% / 19.2% | 16.0 / 8.0 | 40 / 80 | met (>= 5,000" in good
    assert "met (>= PyTorch)" in good and "**not met**" not in good
    assert "| 128 | 0.60 | 4 | 500,000 | 3.0 | 0.2 | 0.9910 | met |" in good
    assert "| resnet18 | 32x32x3 | 256 | timed out after 130 s |" in good
    assert "| vgg16 | 32x32x3 | 256 | time budget spent (3 s left) |" in good
    bad = gpu_check.markdown(_fake_run(4000.0, 4500.0, 1.5))
    assert bad.count("**not met**") == 3  # 5,000 img/s, >= PyTorch, LeNet-5 under 1 s


def test_report_rewrites_the_section_from_a_json(tmp_path):
    source = tmp_path / "from_gpu.json"
    source.write_text(json.dumps(_fake_run(5200.0, 5000.0, 0.6)))
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\n<!-- gpu_check_gpu:start -->\nold\n"
                          "<!-- gpu_check_gpu:end -->\n\nkept\n")  # fmt: skip
    out_dir = tmp_path / "results"
    code = gpu_check.main(["--report", str(source), "--out-dir", str(out_dir),
                           "--results-md", str(results_md)])  # fmt: skip
    assert code == 0
    text = results_md.read_text()
    assert "old" not in text and "kept" in text and "| 5,200 | 5,000 |" in text
    assert json.loads((out_dir / "gpu_check_gpu.json").read_text())["meta"]["platform"] == "gpu"
