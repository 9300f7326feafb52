"""Interrupted runs, in real subprocesses: SIGKILL between checkpoints, SIGTERM, a kill soak.

Every restarted run must end with the same parameters, bit for bit, as the uninterrupted run.
"""

import json
import random
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from train_helpers import config_arg, flatten, run_script, tiny_config

from cnn_jax.train import load_npz
from cnn_jax.train.checkpoints import CheckpointStore
from cnn_jax.train.optimizers import make_optimizer
from cnn_jax.train.restore import build_model
from cnn_jax.train.state import TrainState, abstract_train_state

pytestmark = pytest.mark.slow

TOTAL_STEPS = 128  # 4 epochs of 32 steps: room for ten kills before a run could finish
CONFIG = config_arg(tiny_config("train.num_epochs=4"))
# The same training with a checkpoint every 4 steps: most of a run's time has a save in flight.
SOAK_CONFIG = config_arg(tiny_config("train.num_epochs=4", "checkpoint.every_steps=4"))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """Subprocesses share a compilation cache: only the first one compiles."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _run(workdir, env, *extra, out=None, config=CONFIG):
    args = ["--config", config, "--workdir", workdir, *extra]
    if out:
        args += ["--out", out]
    return run_script(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    line = [x for x in stdout.splitlines() if x.startswith("results ")][-1]
    return json.loads(line[len("results ") :])


def _read_until(proc, prefix: str) -> str | None:
    """Reads output lines until one starts with `prefix`; returns the rest, None at the end."""
    for line in iter(proc.stdout.readline, ""):
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def _wait_for_progress(proc, at_least: int) -> int:
    """Reads progress lines until step >= at_least; returns that step."""
    for line in proc.stdout:
        if line.startswith("progress "):
            step = int(line.split()[1])
            if step >= at_least:
                return step
    raise AssertionError(f"the run ended before reaching step {at_least}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_env):
    """Final parameters of the uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    results = _finish(_run(root / "run", cache_env, out=root / "params.npz"))
    assert results["steps"] == TOTAL_STEPS
    return load_npz(root / "params.npz")


def _assert_same_params(path, reference):
    a, b = flatten(load_npz(path)), flatten(reference)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(tmp_path, cache_env, reference):
    proc = _run(tmp_path / "run", cache_env, "--step-delay", "0.3")
    _wait_for_progress(proc, 40)
    committed = tmp_path / "run" / "checkpoints" / "32"  # end of epoch 1, written asynchronously
    deadline = time.monotonic() + 60
    while not committed.is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    _wait_for_progress(proc, 41)  # a step between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    store = CheckpointStore(tmp_path / "run", read_only=True)
    assert store.latest_step() == 32
    store.close()
    results = _finish(_run(tmp_path / "run", cache_env, out=tmp_path / "params.npz"))
    assert results["resumed_from"] == 32 and results["steps"] == TOTAL_STEPS
    _assert_same_params(tmp_path / "params.npz", reference)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_env, reference):
    proc = _run(tmp_path / "run", cache_env, "--step-delay", "0.3")
    step = _wait_for_progress(proc, 10)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    results = _finish(proc)  # exit status 0
    assert time.monotonic() - began < 30
    assert results["interrupted"] and 10 <= results["steps"] < TOTAL_STEPS
    assert results["steps"] >= step
    store = CheckpointStore(tmp_path / "run", read_only=True)
    assert store.latest_step() == results["steps"]  # the checkpoint of the stop step
    store.close()
    resumed = _finish(_run(tmp_path / "run", cache_env, out=tmp_path / "params.npz"))
    assert resumed["resumed_from"] == results["steps"] and resumed["steps"] == TOTAL_STEPS
    _assert_same_params(tmp_path / "params.npz", reference)


def _restore_every_checkpoint(workdir) -> list[int]:
    """Fully restores (every array, into the abstract train state) each checkpoint the store
    lists as complete; returns their steps. An incomplete one fails here."""
    if not (workdir / "checkpoints").is_dir():
        return []
    store = CheckpointStore(workdir, read_only=True)
    try:
        steps = store.all_steps()
        for step in steps:
            meta = store.read_meta(step)
            config = tiny_config("train.num_epochs=4", "checkpoint.every_steps=4")
            tx = make_optimizer(
                config, meta["data_position"]["steps_per_epoch"], meta["total_steps"]
            )
            model = build_model(config, meta["num_classes"])
            target = abstract_train_state(model, tx, tuple(meta["image_shape"]))
            state, meta = store.restore(step, target)
            assert int(state.step) == step == meta["step"]
            for leaf in jax.tree.leaves(state):
                if np.issubdtype(leaf.dtype, np.floating):
                    assert np.isfinite(np.asarray(leaf)).all(), step
    finally:
        store.close()
    return steps


@pytest.mark.heavy
def test_kill_soak(tmp_path, cache_env, reference):
    """SIGKILL at 10 seeded random moments, 4 of them right after an asynchronous checkpoint
    save has started (its files still being written), restarting each time. (The kill moments
    are seeded; where they land still depends on the machine's speed.)

    Every restart must resume from the newest complete checkpoint, every checkpoint listed after
    a kill must restore completely, and the final parameters must equal the uninterrupted run's.
    """
    rng = random.Random(7)
    moments = ["save"] * 4 + ["any"] * 6
    rng.shuffle(moments)
    workdir = tmp_path / "run"
    newest, history, during_save = None, [], 0
    for kill, moment in enumerate(moments):
        # ~0.2 s per 2-4 steps: a life trains at most ~16 steps, so ten fit in the 128
        proc = _run(workdir, cache_env, "--step-delay", "0.2", config=SOAK_CONFIG)
        info = _read_until(proc, "start ")
        assert info is not None, proc.communicate()[1][-3000:]
        info = json.loads(info)
        assert info["resumed_from"] == newest, history  # the newest complete checkpoint
        assert info["damaged_checkpoints"] == []
        announced = []  # steps whose asynchronous save was started
        if moment == "save":  # right after the 1st or 2nd save of this life started
            for _ in range(rng.randint(1, 2)):
                saving = _read_until(proc, "saving ")
                assert saving is not None, proc.communicate()[1][-3000:]
                announced.append(int(saving))
            time.sleep(rng.uniform(0.0, 0.005))  # its files are being written in the background
        else:  # anywhere once training runs: training, saving, evaluating, reporting
            assert _read_until(proc, "progress ") is not None, proc.communicate()[1][-3000:]
            time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"the run ended before kill {kill}: {history}"
        announced += [int(x.split()[1]) for x in rest.splitlines() if x.startswith("saving ")]
        steps = _restore_every_checkpoint(workdir)
        newest = steps[-1] if steps else None
        # The newest started save never completed: the kill landed while it was being written.
        killed_saving = bool(announced) and announced[-1] not in steps
        during_save += killed_saving
        deleting = workdir / "checkpoints" / "deleting"  # old steps not yet removed
        pending = deleting.is_dir() and any(deleting.iterdir())
        history.append((kill, moment, info["resumed_from"], steps, killed_saving, pending))
    print(
        "kills (kill, moment, resumed_from, complete steps after, during a save, "
        f"old step pending removal): {history}; during a save: {during_save}"
    )
    assert during_save >= 3, history
    results = _finish(_run(workdir, cache_env, out=tmp_path / "params.npz", config=SOAK_CONFIG))
    assert results["resumed_from"] == newest and results["steps"] == TOTAL_STEPS
    _assert_same_params(tmp_path / "params.npz", reference)


def test_old_checkpoints_are_renamed_away_before_they_are_deleted(tmp_path):
    """Orbax deletes an old step in place, file by file: killed midway, a half-deleted `<step>/`
    would still be listed. The store has it renamed into `deleting/` first and empties that."""
    store = CheckpointStore(tmp_path, keep=1, async_save=True)
    for step in (1, 2, 3):
        w = np.full(3, step, np.float32)
        state = TrainState(step=np.int32(step), params={"w": w}, batch_stats={},
                           opt_state={"m": w}, rng=np.zeros(2, np.uint32))  # fmt: skip
        store.save(step, state, {"step": step})
    store.wait()
    assert store.all_steps() == [3]
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints" / "deleting").iterdir())
    assert leftovers == ["2"]  # renamed away by the last save's cleanup, removed by the next
    store.close()
    assert not any((tmp_path / "checkpoints" / "deleting").iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name[0] != "_") == [
        "3",
        "deleting",
    ]
