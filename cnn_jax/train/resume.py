"""Whether a run may continue what its workdir holds, checked before anything is written.

- A workdir with checkpoints is resumed only with the config its checkpoints were made with
  (`<workdir>/config.json`). Keys that only say how or how often things are done (logging,
  evaluation and checkpoint cadence, the back end, the run length) may change; any other change
  would mix two runs in one workdir and is refused, naming each key with its old and new value,
  unless the caller passes `resume_with_changed_config` (recorded in the checkpoints' meta).
- A workdir with results (metrics, TensorBoard events, damaged checkpoints) but no usable
  checkpoint is never trained over from scratch: the caller must ask to `start_over`, which moves
  the earlier run into `previous-runs/<time>/` instead of deleting it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cnn_jax import config as config_lib
from cnn_jax.errors import CheckpointError
from cnn_jax.train.checkpoints import CHECKPOINT_DIR, CheckpointStore
from cnn_jax.train.restore import read_config
from cnn_jax.train.workdir import LOCK_NAME

PREVIOUS_RUNS = "previous-runs"

# Keys whose change cannot alter what is trained: how often things are logged, evaluated or
# saved, how steps are executed (back end, steps per call, fast paths, feeder; float rounding
# aside) and where the data is read from. The run length (num_epochs, num_steps) may change too:
# the learning-rate schedule then spans the new length from the resumed step on.
RESUME_SAFE_KEYS = (
    "experiment",
    "checkpoint.",  # every checkpoint.* key
    "train.log_every_steps",
    "train.eval_every_epochs",
    "train.eval_batch_size",
    "train.steps_per_call",
    "train.backend",
    "train.num_epochs",
    "train.num_steps",
    "model.fast_paths",
    "dataset.feeder",
    "dataset.data_dir",
)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_changes(old, new) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every leaf that differs (absent = None)."""
    a, b = _leaves(old.to_dict()), _leaves(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_safe_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE_KEYS)


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return "\n  ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_config(workdir: Path, config, *, allow_changes: bool) -> dict[str, tuple[Any, Any]]:
    """The changes from the config the workdir's checkpoints were made with to `config`.

    Raises `CheckpointError` naming every change that alters the run, unless `allow_changes`;
    changes of `RESUME_SAFE_KEYS` are always allowed (and returned).
    """
    path = workdir / "config.json"
    if not path.is_file():
        if allow_changes:
            return {}
        raise CheckpointError(
            f"{str(workdir)!r} has checkpoints but no config.json to compare this run's config "
            "with; resume anyway with --resume-with-changed-config, or use another --workdir"
        )
    try:
        saved = read_config(workdir)
    except (config_lib.ConfigError, CheckpointError) as e:
        if allow_changes:
            return {}
        raise CheckpointError(
            f"{e}\nthe checkpoints' config is unreadable, so this run cannot be checked against "
            "it; resume anyway with --resume-with-changed-config, or use another --workdir"
        ) from None
    changes = config_changes(saved, config)
    meaningful = {k: v for k, v in changes.items() if not is_safe_change(k)}
    if meaningful and not allow_changes:
        raise CheckpointError(
            f"the config differs from the one the checkpoints in {str(workdir)!r} were made "
            f"with, in keys that change the run:\n  {_describe(meaningful)}\n"
            "Resuming would mix two runs. Use another --workdir for the new config, or, to "
            "continue this run with the new values anyway, pass --resume-with-changed-config "
            "(recorded in the checkpoints)."
        )
    return changes


def earlier_results(workdir: Path) -> list[Path]:
    """What an earlier run left that training from scratch would overwrite: non-empty metrics,
    TensorBoard events, checkpoints set aside as damaged."""
    found = []
    metrics = workdir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics)
    events = workdir / "tensorboard"
    if events.is_dir() and any(p.is_file() for p in events.rglob("*")):
        found.append(events)
    checkpoints = workdir / CHECKPOINT_DIR
    if checkpoints.is_dir():
        found += sorted(checkpoints.glob("damaged-*"))
    return found


def saved_steps(workdir: Path) -> list[int]:
    """The checkpoint steps in the workdir (read-only: nothing is created or cleaned)."""
    if not (workdir / CHECKPOINT_DIR).is_dir():
        return []
    reader = CheckpointStore(workdir, read_only=True)
    try:
        return reader.all_steps()
    finally:
        reader.close()


def check_checkpoint_dir(workdir: Path) -> None:
    checkpoints = workdir / CHECKPOINT_DIR
    if checkpoints.exists() and not checkpoints.is_dir():
        raise CheckpointError(
            f"{str(checkpoints)!r} is not a folder; it must hold this run's checkpoints (move "
            "it away, or use another --workdir)"
        )


def refuse_scratch_over_results(workdir: Path) -> None:
    """Raises `CheckpointError` if the workdir has results but training would start at step 0."""
    found = earlier_results(workdir)
    if found:
        listed = ", ".join(str(p.relative_to(workdir)) for p in found)
        raise CheckpointError(
            f"{str(workdir)!r} holds results of an earlier run ({listed}) but no usable "
            "checkpoint; not training from scratch over them. Pass --start-over to move them "
            f"into {PREVIOUS_RUNS}/ and train again, or use another --workdir."
        )


def set_aside_previous_run(workdir: Path) -> Path | None:
    """Moves everything of an earlier run in `workdir` into `previous-runs/<UTC time>/` (one
    rename per entry, nothing deleted). Returns that folder, or None if there was nothing."""
    entries = [p for p in workdir.iterdir() if p.name not in (LOCK_NAME, PREVIOUS_RUNS)]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = workdir / PREVIOUS_RUNS / stamp
    n = 1
    while target.exists():
        n += 1
        target = workdir / PREVIOUS_RUNS / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for entry in entries:
        entry.rename(target / entry.name)
    return target
