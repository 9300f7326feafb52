"""Run directory guards: checked up front, so a bad workdir fails before the first step."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Self

from cnn_jax.errors import CheckpointError

LOCK_NAME = ".lock"


def ensure_writable(workdir: Path) -> None:
    """Creates `workdir` if needed and proves a file can be written there."""
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class WorkdirLock:
    """An exclusive lock file `<workdir>/.lock` holding the owner's pid and host.

    A second run on the same workdir is refused with the holder's pid; a lock left by a dead
    process on this host is taken over. (Another host's lock cannot be checked: it is
    respected, and the message says how to remove it.)
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (
                    owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1)))
                ):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                where = "" if owner.get("host") == me["host"] else f" on host {owner.get('host')}"
                raise CheckpointError(
                    f"workdir {str(self.path.parent)!r} is in use by another run (process id "
                    f"{owner.get('pid')}{where}); wait for it, stop it, or use another --workdir "
                    f"(if that process is gone, delete {str(self.path)!r})"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise CheckpointError(f"could not take the workdir lock {str(self.path)!r}")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written: treat as stale

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
