"""SIGTERM/SIGINT as a flag the training loop checks between compiled calls."""

from __future__ import annotations

import signal
import threading
from typing import Self

import jax
import numpy as np


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks between compiled calls.

    A second SIGINT (Ctrl-C twice) interrupts immediately. Handlers are only installed from
    the main thread (Python's rule) and are restored on exit. In a multi-process job the
    processes agree (any process stopping stops all) so they leave at the same step.
    """

    def __init__(self):
        self.flag = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.flag))
        return bool(np.max(flags))

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
