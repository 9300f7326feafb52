"""`train_and_evaluate` end to end on the synthetic dataset: outputs, resume, errors."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import assert_trees_equal, tiny_config

from cnn_jax.errors import CheckpointError, ConfigError
from cnn_jax.train import (
    Reporter,
    TrainingDivergedError,
    evaluate,
    export_npz,
    load,
    load_npz,
    train_and_evaluate,
)
from cnn_jax.train.checkpoints import CheckpointStore, DamagedCheckpointError
from cnn_jax.train.workdir import WorkdirLock

REPO = Path(__file__).resolve().parents[2]
RESULT_KEYS = {
    "final_test_accuracy", "best_test_accuracy", "best_step", "final_test_loss", "steps",
    "epochs", "wall_time_s", "images_per_sec", "num_params",
}  # fmt: skip


class Recorder(Reporter):
    def __init__(self):
        self.calls = []

    def on_start(self, info):
        self.calls.append(("start", info))

    def on_train_step(self, step, total_steps, metrics):
        self.calls.append(("train", step, total_steps, metrics))

    def on_eval(self, step, metrics):
        self.calls.append(("eval", step, metrics))

    def on_end(self, results):
        self.calls.append(("end", results))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted 2-epoch run (64 steps of 8 examples) shared by the tests below."""
    workdir = tmp_path_factory.mktemp("baseline")
    recorder = Recorder()
    results = train_and_evaluate(tiny_config(), workdir, reporter=recorder)
    _, variables, _ = load(workdir)
    return workdir, results, recorder, variables


def test_results_and_reporter_hooks(baseline):
    _, results, recorder, _ = baseline
    assert RESULT_KEYS <= set(results)
    assert results["steps"] == 64 and results["epochs"] == 2.0
    assert results["final_test_accuracy"] > 0.3  # learnable prototypes (chance: 0.1)
    assert not results["interrupted"] and results["resumed_from"] is None
    kinds = [c[0] for c in recorder.calls]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("eval") == 2
    start = recorder.calls[0][1]
    assert start["total_steps"] == 64 and start["num_params"] == results["num_params"]
    assert start["input_shape"] == (8, 8, 1) and start["num_classes"] == 10


def test_workdir_outputs(baseline):
    workdir, results, _, _ = baseline
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"]["name"] == "synthetic"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in test] == [32, 64]
    assert [r["step"] for r in train] == [10, 20, 30, 32, 40, 50, 60, 64]  # every 10 + epoch ends
    for r in records:
        assert {"step", "epoch", "split", "loss", "accuracy", "images_per_sec", "wall_time"} <= set(
            r
        )
    assert test[-1]["accuracy"] == results["final_test_accuracy"]
    assert test[-1]["count"] == 256  # every test example once
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    store = CheckpointStore(workdir, read_only=True)
    assert 64 in store.all_steps() and store.best_step() == results["best_step"]
    meta = store.read_meta(64)
    store.close()
    assert meta["data_position"] == {
        "step": 64, "epoch": 2, "step_in_epoch": 0, "steps_per_epoch": 32, "examples_seen": 512
    }  # fmt: skip
    assert "config" not in meta  # one copy of the config per run: config.json
    assert json.loads((workdir / "config.json").read_text())["train"]["batch_size"] == 8


def test_evaluate_and_load_trained(baseline, tmp_path):
    workdir, results, _, variables = baseline
    metrics = evaluate(workdir, "latest")
    assert metrics["accuracy"] == pytest.approx(results["final_test_accuracy"])
    assert metrics["count"] == 256 and metrics["step"] == 64
    model, loaded, config = load(workdir, checkpoint="best")
    assert config.model.name == "simple_convnet"
    logits = model.apply(loaded, np.zeros((3, 8, 8, 1), np.float32), train=False)
    assert logits.shape == (3, 10)
    path = export_npz(variables, tmp_path / "p.npz")
    assert_trees_equal(load_npz(path), variables)


def test_resume_after_max_steps_is_bit_identical(baseline, tmp_path):
    """Stop mid-epoch (step 20), resume: same final parameters as the uninterrupted run."""
    first = train_and_evaluate(tiny_config(), tmp_path, max_steps=20)
    assert first["steps"] == 20
    second = train_and_evaluate(tiny_config(), tmp_path)
    assert second["resumed_from"] == 20 and second["steps"] == 64
    _, variables, _ = load(tmp_path)
    assert_trees_equal(variables, baseline[3])
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps)  # one record per logged point, none repeated
    again = train_and_evaluate(tiny_config(), tmp_path)  # finished: nothing to do
    assert again["steps"] == 64 and again["final_test_accuracy"] == second["final_test_accuracy"]


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    train_and_evaluate(tiny_config(), tmp_path, max_steps=4)
    diverging = tiny_config("optimizer.learning_rate=1e30")  # same optimizer, absurd step
    with pytest.raises(
        TrainingDivergedError, match=r"NaN or infinite at step \d+.*checkpoint \(step 4\)"
    ):
        train_and_evaluate(diverging, tmp_path, resume_with_changed_config=True)
    store = CheckpointStore(tmp_path, read_only=True)
    assert store.all_steps() == [4]
    store.close()
    params = load(tmp_path)[1]["params"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=12", "train.batch_size"),  # not divisible by 8 devices
        ("optimizer.learning_rate=-1.0", "optimizer.learning_rate"),
        ("optimizer.name='lion'", "optimizer.name"),
        ("train.batch_size=0", "train.batch_size"),
    ],
)
def test_invalid_config_is_rejected_before_anything_runs(tmp_path, override, key):
    if key == "train.batch_size" and "12" in override and 12 % jax.device_count() == 0:
        pytest.skip("needs a device count that does not divide 12")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train_and_evaluate(tiny_config(override), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_refused_resume_leaves_config_json_as_it_was(baseline, tmp_path):
    """A run refused because the checkpoint does not fit used to rewrite config.json first, so a
    later `eval` on the workdir broke: nothing in the workdir changes before the checks pass."""
    workdir = tmp_path / "run"
    shutil.copytree(baseline[0], workdir)
    before = (workdir / "config.json").read_text()
    wider = tiny_config("model.options.hidden_features=[16]")
    with pytest.raises(CheckpointError, match=r"hidden_features: \[8\] -> \[16\]"):
        train_and_evaluate(wider, workdir)  # refused by the config check
    with pytest.raises(CheckpointError, match="does not fit"):  # forced: the shapes still differ
        train_and_evaluate(wider, workdir, resume_with_changed_config=True)
    assert (workdir / "config.json").read_text() == before
    assert evaluate(workdir)["count"] == 256


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
    held = WorkdirLock(tmp_path)  # another run holds the workdir
    with held, pytest.raises(CheckpointError, match=f"process id {os.getpid()}"):
        train_and_evaluate(tiny_config(), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_lock_file_of_a_dead_process_does_not_block(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    results = train_and_evaluate(tiny_config(), tmp_path, max_steps=2)
    assert results["steps"] == 2
    with WorkdirLock(tmp_path):  # released at the end
        pass


_RACER = """
import sys, time
from pathlib import Path
from cnn_jax.errors import CheckpointError
from cnn_jax.train.workdir import WorkdirLock
start = float(sys.argv[2])
lock = WorkdirLock(Path(sys.argv[1]))
time.sleep(max(start - time.time(), 0))
try:
    lock.acquire()
except CheckpointError:
    print("refused")
else:
    time.sleep(start + 1.5 - time.time())  # hold it while every racer has tried
    print("got")
"""


def test_racing_processes_never_both_get_the_lock(tmp_path):
    """Many processes try to take one workdir at the same instant, in fresh and in reused lock
    files (a lock file created but still empty was taken as stale by the old pid-file lock)."""
    for round_ in range(3):
        start = time.time() + 3.0
        racers = [
            subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(start)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            for _ in range(8)
        ]  # fmt: skip
        outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
        assert outcomes == ["got"] + ["refused"] * 7, (round_, outcomes)


def test_unwritable_workdir_fails_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="'.*file' is a file, not a folder"):
        train_and_evaluate(tiny_config(), blocker / "run")


def _damaged_copy(baseline_dir, tmp_path, step):
    workdir = tmp_path / "run"
    shutil.copytree(baseline_dir, workdir)
    for data_dir in (workdir / "checkpoints" / str(step) / "variables").rglob("d"):
        shutil.rmtree(data_dir)
    return workdir


# Orbax's failed read of a damaged checkpoint leaves an asyncio callback that fires after its
# event loop closed (harmless; reported by pytest as an unraisable exception).
_ORBAX_DAMAGE_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_DAMAGE_NOISE
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(baseline, tmp_path):
    workdir = _damaged_copy(baseline[0], tmp_path, 64)
    results = train_and_evaluate(tiny_config(), workdir)
    assert results["resumed_from"] == 32 and results["steps"] == 64
    assert (
        len(results["damaged_checkpoints"]) == 1
        and "checkpoints/64" in results["damaged_checkpoints"][0]
    )
    assert list((workdir / "checkpoints").glob("damaged-64-*"))  # kept aside for inspection
    assert_trees_equal(load(workdir)[1], baseline[3])


@_ORBAX_DAMAGE_NOISE
def test_damaged_checkpoint_with_strict_resume_stops(baseline, tmp_path):
    workdir = _damaged_copy(baseline[0], tmp_path, 64)
    with pytest.raises(DamagedCheckpointError, match="checkpoints/64 is damaged"):
        train_and_evaluate(tiny_config("checkpoint.strict_resume=True"), workdir)
