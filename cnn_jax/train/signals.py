"""SIGTERM/SIGINT: a flag the training loop checks between compiled calls, quiet while a
checkpoint is being written, and an exception everywhere else in the command line."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Self


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (loading data, compiling, evaluating): the command
    line reports it in one line and exits with 143, as Ctrl-C gives 130."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def raise_on_sigterm():
    """Within the block SIGTERM raises `Terminated` (a `KeyboardInterrupt`) in the main thread,
    so `finally` blocks run and the caller can say what happened, instead of the process
    vanishing without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks between compiled calls, once `arm`ed
    (before, while data is loaded and steps compiled, they raise `Terminated` or
    `KeyboardInterrupt`: there is nothing to save yet).

    A second SIGINT (Ctrl-C twice) interrupts at once, except while a checkpoint is being
    written (`writing()`): then signals only print a note, so a save is never cut in half.
    Handlers are only installed from the main thread (Python's rule) and are restored on exit.
    In a multi-process job the processes agree (any process stopping stops all) so they leave
    at the same step.
    """

    def __init__(self):
        self.flag = False
        self.signum: int | None = None
        self._armed = False
        self._writing = False
        self._noted = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if not self._armed and not self._writing:  # nothing to save yet: stop at once
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if self._writing:
            if not self._noted:
                print(
                    "cnn-jax: still writing a checkpoint; stopping when it is complete",
                    file=sys.stderr,
                    flush=True,
                )
                self._noted = True
            self.flag = True
            self.signum = self.signum or signum
            return
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.signum = signum

    def arm(self) -> None:
        """From now on a signal sets the flag (the loop saves and stops); before, it raises."""
        self._armed = True

    @contextlib.contextmanager
    def writing(self):
        """Signals during the block are noted, never raised."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False

    def requested(self) -> bool:
        import jax  # here: the command line imports this module before jax
        import numpy as np
        from jax.experimental import multihost_utils

        if jax.process_count() == 1:
            return self.flag

        flags = multihost_utils.process_allgather(np.int32(self.flag))
        return bool(np.max(flags))

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
