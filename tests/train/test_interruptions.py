"""Interrupted runs, in real subprocesses: SIGKILL between checkpoints, SIGTERM, a kill soak.

Every restarted run must end with the same parameters, bit for bit, as the uninterrupted run.
"""

import json
import random
import signal
import subprocess
import time

import numpy as np
import pytest
from train_helpers import config_arg, flatten, run_script, tiny_config

from cnn_jax.train import load_npz
from cnn_jax.train.checkpoints import CheckpointStore

pytestmark = pytest.mark.slow

CONFIG = config_arg(tiny_config())


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """Subprocesses share a compilation cache: only the first one compiles."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _run(workdir, env, *extra, out=None):
    args = ["--config", CONFIG, "--workdir", workdir, *extra]
    if out:
        args += ["--out", out]
    return run_script(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    line = [x for x in stdout.splitlines() if x.startswith("results ")][-1]
    return json.loads(line[len("results ") :])


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
    assert results["steps"] == 64
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
    assert results["resumed_from"] == 32 and results["steps"] == 64
    _assert_same_params(tmp_path / "params.npz", reference)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_env, reference):
    proc = _run(tmp_path / "run", cache_env, "--step-delay", "0.3")
    step = _wait_for_progress(proc, 10)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    results = _finish(proc)  # exit status 0
    assert time.monotonic() - began < 30
    assert results["interrupted"] and 10 <= results["steps"] < 64
    assert results["steps"] >= step
    store = CheckpointStore(tmp_path / "run", read_only=True)
    assert store.latest_step() == results["steps"]  # the checkpoint of the stop step
    store.close()
    resumed = _finish(_run(tmp_path / "run", cache_env, out=tmp_path / "params.npz"))
    assert resumed["resumed_from"] == results["steps"] and resumed["steps"] == 64
    _assert_same_params(tmp_path / "params.npz", reference)


def test_kill_soak(tmp_path, cache_env, reference):
    """SIGKILL at random moments (some during asynchronous checkpoint writes), restart each time."""
    rng = random.Random(0)
    workdir = tmp_path / "run"
    kills = 0
    for _ in range(6):
        proc = _run(workdir, cache_env, "--step-delay", "0.15")
        try:
            _wait_for_progress(proc, 1)
        except AssertionError:  # nothing left to train: an earlier restart finished the run
            proc.wait(timeout=60)
            break
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        store = CheckpointStore(workdir, read_only=True)
        for step in store.all_steps():  # every checkpoint that looks complete restores
            store.read_meta(step)
        store.close()
    assert kills >= 3
    results = _finish(_run(workdir, cache_env, out=tmp_path / "params.npz"))
    assert results["steps"] == 64
    _assert_same_params(tmp_path / "params.npz", reference)
