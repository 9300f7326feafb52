"""What a run may do to a workdir that already holds one (issue 12, items 1-5, 7, 9).

A resume with a changed config is refused unless asked for (and then recorded); results are
never trained over from scratch; a checkpoint that cannot be written stops the run at once with
one message; an evaluation never calls a checkpoint rotated away by a running training
"damaged"; signals give one line and a conventional exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from train_helpers import REPO, tiny_config

from cnn_jax.errors import CheckpointError
from cnn_jax.train import evaluate, load, train_and_evaluate
from cnn_jax.train.checkpoints import CheckpointStore, CheckpointWriteError
from cnn_jax.train.reporting import Reporter
from cnn_jax.train.signals import StopSignals

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class Recorder(Reporter):
    def __init__(self):
        self.start = None

    def on_start(self, info):
        self.start = info


def snapshot(workdir) -> dict[str, str]:
    """Every file of a workdir (but its lock) -> the hash of its bytes."""
    return {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir after 8 steps (checkpoint at step 8, metrics, events, config.json)."""
    workdir = tmp_path_factory.mktemp("guards") / "run"
    train_and_evaluate(tiny_config(), workdir, max_steps=8)
    return workdir


def copy_of(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


# -- item 2/3: resuming with a changed config -----------------------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.batch_size=16", "train.batch_size: 8 -> 16"),
        ("dataset.synthetic_size=512", "dataset.synthetic_size: 256 -> 512"),
        ("optimizer.learning_rate=0.1", "optimizer.learning_rate: 0.01 -> 0.1"),
        ("seed=1", "seed: 0 -> 1"),
        ("model.options.hidden_features=[16]", "model.options.hidden_features: [8] -> [16]"),
    ],
)
def test_resume_with_a_changed_config_is_refused_and_changes_nothing(
    trained, tmp_path, override, named
):
    workdir = copy_of(trained, tmp_path)
    before = snapshot(workdir)
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(tiny_config(override), workdir, max_steps=12)
    assert named in str(e.value) and "--resume-with-changed-config" in str(e.value)
    assert snapshot(workdir) == before  # config.json, metrics, checkpoints untouched


def test_changes_that_cannot_alter_the_run_are_allowed(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    recorder = Recorder()
    results = train_and_evaluate(
        tiny_config("train.log_every_steps=3", "train.num_epochs=3", "checkpoint.keep=5"),
        workdir,
        max_steps=12,
        reporter=recorder,
    )
    assert results["resumed_from"] == 8 and results["steps"] == 12
    changes = recorder.start["config_changes"]
    assert changes["train.log_every_steps"] == (10, 3)
    assert changes["train.num_epochs"] == (2, 3)
    store = CheckpointStore(workdir, read_only=True)
    history = store.read_meta(12)["config_changes"]
    store.close()
    assert history[0]["step"] == 8 and history[0]["forced"] is False


def test_a_forced_change_resumes_and_is_recorded(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    results = train_and_evaluate(
        tiny_config("optimizer.learning_rate=0.02"),
        workdir,
        max_steps=12,
        resume_with_changed_config=True,
    )
    assert results["resumed_from"] == 8
    store = CheckpointStore(workdir, read_only=True)
    (entry,) = store.read_meta(12)["config_changes"]
    store.close()
    assert entry == {
        "step": 8,
        "changes": {"optimizer.learning_rate": [0.01, 0.02]},
        "forced": True,
    }
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == 0.02


# -- item 4: never from scratch over results ------------------------------------------------------


def _damage_every_checkpoint(workdir):
    for data_dir in (workdir / "checkpoints").glob("*/variables/**/d"):
        shutil.rmtree(data_dir)


def test_all_checkpoints_damaged_refuses_twice_then_start_over_keeps_the_old_run(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    _damage_every_checkpoint(workdir)
    metrics = (workdir / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match="every checkpoint"):
        train_and_evaluate(tiny_config(), workdir, max_steps=4)
    for _ in range(2):  # the second identical run used to train from scratch here
        with pytest.raises(CheckpointError, match="no usable checkpoint") as e:
            train_and_evaluate(tiny_config(), workdir, max_steps=4)
        assert "metrics.jsonl" in str(e.value) and "--start-over" in str(e.value)
        assert (workdir / "metrics.jsonl").read_bytes() == metrics
    recorder = Recorder()
    results = train_and_evaluate(
        tiny_config(), workdir, max_steps=4, start_over=True, reporter=recorder
    )
    assert results["resumed_from"] is None and results["steps"] == 4
    (previous,) = (workdir / "previous-runs").iterdir()
    assert recorder.start["previous_run"] == previous
    assert (previous / "metrics.jsonl").read_bytes() == metrics
    assert list((previous / "checkpoints").glob("damaged-*"))
    assert (workdir / "checkpoints" / "4").is_dir()


@pytest.mark.parametrize("how", ["deleted", "a file"])
def test_missing_checkpoint_folder_refuses_before_training(trained, tmp_path, how):
    workdir = copy_of(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints")
    if how == "a file":
        (workdir / "checkpoints").write_text("not a folder")
    before = snapshot(workdir)
    expected = "no usable checkpoint" if how == "deleted" else "is not a folder"
    with pytest.raises(CheckpointError, match=expected):
        train_and_evaluate(tiny_config(), workdir, max_steps=4)
    assert snapshot(workdir) == before


def test_a_fresh_workdir_and_one_with_only_a_config_start_from_scratch(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")  # a run killed before its first step
    assert train_and_evaluate(tiny_config(), workdir, max_steps=2)["steps"] == 2


# -- metrics.jsonl lines that cannot be read (item 12) --------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [(b"[1, 2]", "not a metrics record"), (b"\xff\xfe{}", "not readable JSON")],
)
def test_unreadable_metrics_line_is_named_not_dropped(trained, tmp_path, line, expected):
    workdir = copy_of(trained, tmp_path)
    lines = (workdir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_bytes(b"".join([lines[0], line + b"\n", *lines[1:]]))
    before = snapshot(workdir)
    with pytest.raises(CheckpointError, match=f"metrics.jsonl line 2 is {expected}"):
        train_and_evaluate(tiny_config(), workdir, max_steps=12)
    assert snapshot(workdir) == before


def test_a_last_line_cut_by_a_kill_is_dropped(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    with (workdir / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 9, "spl')
    train_and_evaluate(tiny_config(), workdir, max_steps=12)
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line), dict)


# -- items 1 and 5: checkpoints that cannot be written --------------------------------------------


def _non_daemon_threads():
    return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]


def _chattr(flag: str, path) -> bool:
    return (
        subprocess.run(["chattr", flag, str(path)], check=False, capture_output=True).returncode
        == 0
    )


def test_an_unwritable_checkpoint_folder_stops_the_run_and_leaves_no_thread(trained, tmp_path):
    """Used to train on silently, then hang for ever on Orbax threads waiting for the folder."""
    workdir = copy_of(trained, tmp_path)
    if not _chattr("+i", workdir / "checkpoints"):
        pytest.skip("chattr +i needs root on a file system that supports it")
    try:
        before = snapshot(workdir / "checkpoints")
        began = time.monotonic()
        with pytest.raises(CheckpointWriteError, match="Operation not permitted"):
            train_and_evaluate(tiny_config(), workdir, max_steps=32)
        assert time.monotonic() - began < 60
    finally:
        _chattr("-i", workdir / "checkpoints")
    assert snapshot(workdir / "checkpoints") == before
    deadline = time.monotonic() + 10
    while _non_daemon_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _non_daemon_threads(), _non_daemon_threads()


def _cli(args, *, timeout=240, **popen):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "cnn_jax", *map(str, args)],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.fixture
def tiny_config_file(tmp_path):
    """A config file for the command line with the tiny synthetic run of `tiny_config`."""
    text = json.dumps(tiny_config().to_dict())
    (tmp_path / "tiny.py").write_text(
        "from cnn_jax.config import config_from_json\n"
        f"def get_config():\n    return config_from_json({text!r})\n"
    )
    return tmp_path / "tiny.py"


def test_disk_full_gives_one_message_and_exit_2(tiny_config_file, tmp_path):
    """A 3 MB file system: used to end with exit 1 after hundreds of lines of tracebacks."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
        check=False,
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        proc = _cli(
            ["train", tiny_config_file, "--workdir", mount / "run", "--no-pictures",
             "--set", "train.num_epochs=100", "--set", "checkpoint.keep=1000"]
        )  # fmt: skip
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, err[-3000:]
        assert "Traceback" not in out + err
        (message,) = [line for line in err.splitlines() if line.startswith("cnn-jax: error:")]
        assert "No space left on device" in message and str(mount / "run") in message
        resumable = [p.name for p in (mount / "run" / "checkpoints").iterdir() if p.name.isdigit()]
        assert resumable  # the checkpoints written before the disk filled are kept
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


# -- item 7: eval while a training run rotates its checkpoints --------------------------------


def _rotate_away_on_first_read(monkeypatch, store_cls=CheckpointStore):
    """Makes the first checkpoint read find its step gone, as when a training run's rotation
    renames it away between `resolve` and the read."""
    real = store_cls.restore_variables
    state = {"done": False}

    def restore_variables(self, step, target):
        if not state["done"]:
            state["done"] = True
            shutil.move(str(self.directory / str(step)), str(self.directory / "deleting"))
        return real(self, step, target)

    monkeypatch.setattr(store_cls, "restore_variables", restore_variables)


def test_eval_of_latest_rotated_away_reads_the_new_latest(trained, tmp_path, monkeypatch):
    workdir = copy_of(trained, tmp_path)
    train_and_evaluate(tiny_config("checkpoint.every_steps=2"), workdir, max_steps=12)
    (workdir / "checkpoints" / "deleting").mkdir(exist_ok=True)
    _rotate_away_on_first_read(monkeypatch)
    assert evaluate(workdir, "latest")["step"] == 10  # 12 went away while being read
    _, variables, _ = load(workdir, "latest")
    assert variables["params"]


def test_eval_of_a_named_step_rotated_away_says_removed_not_damaged(trained, tmp_path, monkeypatch):
    workdir = copy_of(trained, tmp_path)
    (workdir / "checkpoints" / "deleting").mkdir(exist_ok=True)
    _rotate_away_on_first_read(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        load(workdir, 8)
    assert "was removed" in str(e.value) and "damaged" not in str(e.value)


# -- item 9: signals ------------------------------------------------------------------------------


def test_signals_while_a_checkpoint_is_written_are_noted_not_raised(capsys):
    with StopSignals() as stop:
        stop.arm()
        with stop.writing():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: used to raise mid-save
            time.sleep(0.05)
        assert stop.requested() and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # outside a save, a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert capsys.readouterr().err.count("still writing a checkpoint") == 1


def test_signals_before_the_loop_is_armed_raise_at_once():
    from cnn_jax.train.signals import Terminated

    with StopSignals(), pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)


def _wait_for_line(proc, fragment: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if fragment in line:
            return
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"{fragment!r} never printed; stderr: {proc.stderr.read()[-2000:]}")


def test_sigterm_before_training_starts_exits_143_with_one_line(tiny_config_file, tmp_path):
    """Used to exit 143 without a word (the default SIGTERM action)."""
    proc = _cli(["train", tiny_config_file, "--workdir", tmp_path / "run", "--no-pictures"])
    _wait_for_line(proc, "workdir:")  # printed just before the data is loaded
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1] in (
        "cnn-jax: terminated (SIGTERM)",  # while loading or compiling
        # (or, on a fast machine, already inside the loop: a checkpoint was saved)
        *[line for line in err.splitlines() if "interrupted by SIGTERM" in line],
    )


def test_sigterm_during_training_saves_and_exits_143(tiny_config_file, tmp_path):
    proc = _cli(
        ["train", tiny_config_file, "--workdir", tmp_path / "run", "--no-pictures",
         "--set", "train.num_epochs=200"]
    )  # fmt: skip
    _wait_for_line(proc, "workdir:")
    time.sleep(0.5)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # training has started once a record is logged
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM at step" in err
    store = CheckpointStore(tmp_path / "run", read_only=True)
    steps = store.all_steps()
    store.close()
    assert steps  # a whole checkpoint to resume from
