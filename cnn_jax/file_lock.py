"""An exclusive lock on a file, shared by the workdir lock and the dataset-import lock.

The lock is the kernel's `fcntl.flock`: taking it is atomic (two processes racing can never both
get it) and it is released when its holder exits, however it dies, so there are no stale locks
to detect. The file itself stays (deleting a lock file lets a racing process lock the deleted
copy); it records the holder's pid and host, for the message of whoever finds it taken.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Self


class LockHeld(Exception):
    """The lock is held by another process; `owner` is what it recorded ({'pid', 'host'})."""

    def __init__(self, owner: dict):
        super().__init__(f"held by {owner}")
        self.owner = owner

    def describe(self) -> str:
        """'process id 123' (plus ' on host h' when another machine holds it)."""
        where = self.owner.get("host")
        there = "" if where in (None, socket.gethostname()) else f" on host {where}"
        return f"process id {self.owner.get('pid', 'unknown')}{there}"


class FileLock:
    """`acquire()` raises `LockHeld` when another process holds `path`, `OSError` when the
    file cannot be made or locked; `release()` (or leaving the `with` block) lets go."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(self._owner()) from None
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        try:  # only for others' messages: a full disk must not stop the holder
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        except OSError:
            pass

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
