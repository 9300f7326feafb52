"""Run directory guards: checked up front, so a bad workdir fails before the first step."""

from __future__ import annotations

import os
from pathlib import Path

from cnn_jax.errors import CheckpointError
from cnn_jax.file_lock import FileLock, LockHeld

LOCK_NAME = ".lock"


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` if it is a regular file (so no folder can be
    made there), else None."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def ensure_writable(workdir: Path) -> None:
    """Creates `workdir` if needed and proves a file can be written there."""
    blocker = file_in_the_way(workdir / "x")
    if blocker is not None:
        raise CheckpointError(
            f"workdir {str(workdir)!r} cannot be created: {str(blocker)!r} is a file, not a folder"
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"workdir {str(workdir)!r} is not writable ({e.strerror or e}); "
            "choose another --workdir or free some space"
        ) from e


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it over `path`: a full disk
    or a kill leaves the old file whole, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class WorkdirLock(FileLock):
    """An exclusive lock on `<workdir>/.lock` (`cnn_jax.file_lock.FileLock`: the kernel's
    `fcntl.flock`, atomic, released however its holder dies). A lock on a network file system
    without flock support is refused with a message."""

    def __init__(self, workdir: Path):
        super().__init__(Path(workdir) / LOCK_NAME)

    def acquire(self) -> None:
        try:
            super().acquire()
        except LockHeld as e:
            raise CheckpointError(
                f"workdir {str(self.path.parent)!r} is in use by another run ({e.describe()}); "
                "wait for it, stop it, or use another --workdir"
            ) from None
        except OSError as e:
            raise CheckpointError(f"cannot lock the workdir {str(self.path.parent)!r}: {e}") from e
