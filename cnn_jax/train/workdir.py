"""Run directory guards: checked up front, so a bad workdir fails before the first step."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Self

from cnn_jax.errors import CheckpointError

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


class WorkdirLock:
    """An exclusive `fcntl.flock` on `<workdir>/.lock`, which also records the holder's pid and
    host for the error message.

    The lock is the kernel's: taking it is atomic (two processes racing can never both get it)
    and it is released when its holder exits, however it dies, so there are no stale locks to
    detect. The file itself stays (deleting a lock file lets a racing process lock the deleted
    copy). A lock on a network file system without flock support is refused with a message.
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._owner()
            os.close(fd)
            here = socket.gethostname()
            where = "" if owner.get("host") in (None, here) else f" on host {owner.get('host')}"
            raise CheckpointError(
                f"workdir {str(self.path.parent)!r} is in use by another run (process id "
                f"{owner.get('pid', 'unknown')}{where}); wait for it, stop it, or use another "
                "--workdir"
            ) from None
        except OSError as e:
            os.close(fd)
            raise CheckpointError(f"cannot lock the workdir {str(self.path.parent)!r}: {e}") from e
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # the holder is between taking the lock and writing its pid
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
