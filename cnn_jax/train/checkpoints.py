"""Orbax checkpoints of the train state, and parameter export.

Layout: `<workdir>/checkpoints/<step>/{variables, train, meta, metrics}` written by one Orbax
`CheckpointManager` (asynchronously; a step directory appears under its final name only once
complete, so a kill never leaves a half-written checkpoint that looks valid). Old checkpoints
are deleted the same way round: Orbax first renames them into `checkpoints/deleting/` (one
atomic rename) and the store empties that folder later, so a kill during a deletion cannot
leave a half-deleted step directory that still looks valid either. It keeps the
latest `keep` checkpoints plus the best one by an eval metric: one manager does both, with
`preservation_policy = AnyPreservationPolicy([LatestN(keep), BestN(best_fn, n=1)])`
(Orbax 0.12's plain `max_to_keep` + `best_fn` would keep the best k instead and could delete
the latest). Checkpoints saved without an eval get the worst possible score, so they are
kept only as "latest".

Items: `variables` = the model variables {'params', 'batch_stats'} (all a trained model needs,
so `cnn_jax.load` restores them without building an optimizer); `train` = what only training
needs {'step', 'opt_state', 'rng'}; `meta` (JSON) = the data position (step, epoch), the eval
results and the shapes needed to rebuild the model. The run's config is `<workdir>/config.json`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cnn_jax.errors import CheckpointError
from cnn_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"
DELETING_DIR = "deleting"  # old checkpoints are renamed here, then removed (see module docstring)


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or unreadable."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint of a different model or optimizer (shapes or entries differ)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (no space, no permission, read-only file system); the
    earlier checkpoints are untouched."""


# Messages of TensorStore's write errors (raised as ValueError) that mean the storage refused.
_STORAGE_REFUSALS = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "No space left", "Read-only")


def _write_failure(directory: Path, error: BaseException) -> CheckpointWriteError | None:
    """A `CheckpointWriteError` for an error that says the storage refused a write, else None."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        where = error.filename or directory
    elif isinstance(error, (ValueError, RuntimeError)) and any(
        m in str(error) for m in _STORAGE_REFUSALS
    ):
        text = str(error)
        reason = (
            "No space left on device"
            if "No space left" in text or "RESOURCE_EXHAUSTED" in text
            else text.splitlines()[0]
        )
        where = directory
    else:
        return None
    return CheckpointWriteError(
        f"could not write a checkpoint under {str(where)!r}: {reason}. The earlier checkpoints "
        "are kept; free some space or fix the folder's permissions, then run the same command "
        "again to resume"
    )


def _path_str(path) -> str:
    """A key path as 'params/block1/conv/kernel' (attribute, dict key or index entries)."""
    parts = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _shapes_by_path(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        _path_str(p): (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
        for p, leaf in leaves
        if leaf is not None and hasattr(leaf, "shape")
    }


def compare_shapes(saved_tree, target_tree) -> list[str]:
    """Differences between a checkpoint's tree metadata and the target state, one line each."""
    saved, target = _shapes_by_path(saved_tree), _shapes_by_path(target_tree)
    problems = []
    for key in sorted(set(saved) | set(target)):
        if key not in saved:
            problems.append(
                f"{key}: missing from the checkpoint (model/optimizer expects {target[key][0]})"
            )
        elif key not in target:
            problems.append(
                f"{key}: in the checkpoint {saved[key][0]} but not in the model/optimizer"
            )
        elif saved[key][0] != target[key][0]:
            problems.append(
                f"{key}: checkpoint has shape {saved[key][0]}, model/optimizer expects {target[key][0]}"
            )
    return problems


class CheckpointStore:
    """Saves and restores `TrainState`s under `<workdir>/checkpoints` (see module docstring)."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        keep: int = 3,
        best_metric: str = "accuracy",
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
        self.best_metric, self.best_mode = best_metric, best_mode
        worst = -math.inf if best_mode == "max" else math.inf
        self._score = lambda metrics: float((metrics or {}).get(best_metric, worst))
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {str(self.directory)!r}")
        options = ocp.CheckpointManagerOptions(
            best_fn=self._score,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(n=keep),
                    policies.BestN(
                        get_metric_fn=self._score,
                        reverse=best_mode == "min",
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
            enable_async_checkpointing=async_save,
            # Created in the caller's thread, a directory that cannot be made raises in `save`;
            # made in the background, its failure left Orbax's writer threads waiting for it
            # (20 minutes) and kept the process alive.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            cleanup_tmp_directories=not read_only,  # leftovers of a killed async save
            # Readers never save; Orbax's own read_only mode would only add log warnings.
            create=not read_only,
            save_root_metadata=not read_only,
            # Orbax would otherwise delete old steps file by file in place: a kill in the
            # middle left a half-deleted `<step>/` that is still listed as a checkpoint.
            todelete_subdir=None if read_only else DELETING_DIR,
        )
        # Naming the handlers lets a fresh process read metadata before any save/restore.
        self.read_only = read_only
        self._write_error: CheckpointWriteError | None = None
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "variables": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        if not read_only:
            self._purge_deleted()

    # -- queries -----------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def reload(self) -> None:
        """Lists the steps on disk again (another process may have saved or removed some)."""
        self.manager.reload()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def eval_metrics(self, step: int) -> dict:
        return dict(self.manager.metrics(step) or {})

    def best_step(self) -> int | None:
        """The step with the best saved eval metric, or None if no checkpoint has one."""
        scored = [(s, self.eval_metrics(s).get(self.best_metric)) for s in self.all_steps()]
        scored = [(s, v) for s, v in scored if v is not None]
        if not scored:
            return None
        sign = 1.0 if self.best_mode == "max" else -1.0
        return max(scored, key=lambda sv: (sign * sv[1], sv[0]))[0]  # ties: the later step

    def resolve(self, checkpoint: str | int) -> int:
        """'latest' | 'best' | a step number -> an existing step, else `CheckpointError`."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {str(self.directory)!r}")
        if checkpoint == "latest":
            return steps[-1]
        if checkpoint == "best":
            best = self.best_step()
            if best is None:
                raise CheckpointError(
                    f"no checkpoint in {str(self.directory)!r} has the eval metric "
                    f"{self.best_metric!r}; use checkpoint='latest' or a step ({steps})"
                )
            return best
        try:
            step = int(checkpoint)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"checkpoint {checkpoint!r}: expected 'latest', 'best' or a step number"
            ) from None
        if step not in steps:
            raise CheckpointError(
                f"checkpoint step {step} not found in {str(self.directory)!r}; available: {steps}"
            )
        return step

    # -- save / restore ----------------------------------------------------------------------
    def save(
        self, step: int, state: TrainState, meta: dict, eval_metrics: dict | None = None
    ) -> bool:
        """Starts saving `state` (host layout) as checkpoint `step`; False if it exists already.

        Returns once the arrays are copied off the devices; the files are written in the
        background (`wait()` blocks until done).
        """
        if self.read_only:
            raise CheckpointError(f"checkpoint store {str(self.directory)!r} is open read-only")
        if step in self.manager.all_steps():
            return False
        metrics = {k: float(v) for k, v in (eval_metrics or {}).items()}
        with self._writing():
            self.manager.wait_until_finished()  # as `manager.save` would; then nothing moves
            self._purge_deleted()  # old steps into `deleting/` while it is emptied
            variables, train = _split_state(state)
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    variables=ocp.args.StandardSave(variables),
                    train=ocp.args.StandardSave(train),
                    meta=ocp.args.JsonSave(_jsonable(meta)),
                ),
                metrics=metrics,
                force=True,
            )

    @contextlib.contextmanager
    def _writing(self):
        """Turns a refused write into one `CheckpointWriteError` (raised once: later waits
        and `close` then stay quiet, so the first message is the one reported)."""
        if self._write_error is not None:
            raise self._write_error
        try:
            yield
        except Exception as e:
            failure = _write_failure(self.directory, e)
            if failure is None:
                raise
            self._write_error = failure
            raise failure from None

    def check_pending(self) -> None:
        """Raises `CheckpointWriteError` if a background save has failed; never blocks."""
        if self.manager is not None and not self.manager.is_saving_in_progress():
            with self._writing():
                self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise self._damaged(step, e) from e
        return dict(restored["meta"])

    def _damaged(self, step: int, error: Exception) -> DamagedCheckpointError:
        return DamagedCheckpointError(
            f"checkpoint {self.directory / str(step)} is damaged or unreadable: "
            f"{type(error).__name__}: {error}"
        )

    def check_compatible(self, step: int, targets: dict[str, Any]) -> None:
        """Raises `CheckpointError` naming every entry whose shape differs from `targets`
        ({item name: abstract tree}, e.g. {'variables': ..., 'train': ...})."""
        handler = ocp.StandardCheckpointHandler()  # item by item: others are not read
        try:
            metadata = {
                name: handler.metadata(self.directory / str(step) / name) for name in targets
            }
            saved = {name: getattr(m, "tree", m) for name, m in metadata.items()}
        except Exception as e:
            raise self._damaged(step, e) from e
        finally:
            handler.close()
        problems = []
        for name, target in targets.items():
            if saved[name] is None:
                raise DamagedCheckpointError(
                    f"checkpoint {self.directory / str(step)} is damaged: its {name} metadata is "
                    "missing"
                )
            problems += [f"{name}/{p}" for p in compare_shapes(saved[name], target)]
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit the configured model/optimizer "
                f"({len(problems)} mismatched entries):\n  {shown}{more}\n"
                "Use a fresh --workdir for a different model or optimizer."
            )

    def _restore(self, step: int, targets: dict[str, Any]) -> dict:
        """The items in `targets` ({name: abstract tree}) and meta, onto the first local device;
        shapes are compared first, so a different model or optimizer fails with a
        `CheckpointError` naming the entries instead of a partial load."""
        self.check_compatible(step, targets)
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        args = {
            name: ocp.args.StandardRestore(jax.tree.map(place, t)) for name, t in targets.items()
        }
        try:
            return self.manager.restore(
                step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise self._damaged(step, e) from e

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
        """(state, meta) of checkpoint `step`. target: the abstract state (`abstract_train_state`)."""
        variables, train = _split_state(target)
        restored = self._restore(step, {"variables": variables, "train": train})
        return _join_state(restored["variables"], restored["train"]), dict(restored["meta"])

    def restore_variables(self, step: int, target: dict) -> tuple[dict, dict]:
        """(variables, meta) of checkpoint `step`, without the optimizer state. target: the
        abstract {'params', 'batch_stats'} of the model (`batch_stats` {} if it has none)."""
        restored = self._restore(step, {"variables": target})
        return dict(restored["variables"]), dict(restored["meta"])

    def set_aside(self, step: int) -> Path:
        """Renames a damaged checkpoint to `damaged-<step>-<time>` (kept for inspection, no
        longer a step, so training can write that step again). Returns the new path."""
        target = self.directory / f"damaged-{step}-{int(time.time())}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        _sync_processes(f"cnn_jax_set_aside_{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and releases the manager (safe to call twice). After a
        failed write it only releases: the failure has been raised already."""
        if self.manager is None:
            return
        manager = self.manager
        try:
            if self._write_error is None:
                with self._writing():
                    manager.wait_until_finished()
        finally:
            self.manager = None
            try:
                manager.close()
            except Exception as e:
                if _write_failure(self.directory, e) is None:
                    raise
        if not self.read_only and self._write_error is None:
            self._purge_deleted()

    def _purge_deleted(self) -> None:
        """Removes the old checkpoints Orbax has renamed into `deleting/` (process 0)."""
        if jax.process_index() != 0:
            return
        for path in (self.directory / DELETING_DIR).glob("*"):
            shutil.rmtree(path, ignore_errors=True)


def _split_state(state: TrainState) -> tuple[dict, dict]:
    """(variables, train): the `variables` and `train` items of a checkpoint."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return variables, {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _join_state(variables: dict, train: dict) -> TrainState:
    return TrainState(params=variables["params"], batch_stats=variables["batch_stats"], **train)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


# -- parameter export --------------------------------------------------------------------------


def export_npz(variables: dict, path: str | Path) -> Path:
    """Writes model variables ({'params': ..., 'batch_stats': ...}) to an .npz file.

    Keys are '/'-joined paths ('params/block1/conv/kernel'); `numpy.load` reads it without
    orbax, flax or this package. Returns the path.
    """
    flat = {
        _path_str(key_path): np.asarray(jax.device_get(leaf))
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:  # written beside, then renamed: a full disk or a kill never leaves half a file
        with tmp.open("wb") as f:  # a file object: numpy would otherwise append '.npz'
            np.savez(f, **flat)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_npz(path: str | Path) -> dict:
    """Reads `export_npz` output back into nested dicts of numpy arrays."""
    try:
        archive = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read parameter file {str(path)!r}: {e}") from e
    variables: dict = {}
    with archive:
        for key in archive.files:
            node = variables
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = archive[key]
    return variables
