"""Where logged metrics go: `<workdir>/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from cnn_jax.errors import CheckpointError
from cnn_jax.train.workdir import write_atomically


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


class MetricWriter:
    """Appends one JSON object per logged point and mirrors scalars to TensorBoard.

    Records: {'step', 'epoch', 'split': 'train'|'test', 'loss', 'accuracy', 'top5_accuracy',
    'images_per_sec', 'wall_time', ...}. On resume from step s, records after s (written by
    the interrupted run after its last checkpoint) are dropped so every step appears once.
    `enabled=False` (processes other than 0) writes nothing.
    """

    def __init__(self, workdir: Path, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self._drop_records_after(resume_step)
        self._tb = _EventFile(Path(workdir) / "tensorboard", purge_step=resume_step)

    def _drop_records_after(self, step: int) -> None:
        """Rewrites metrics.jsonl without the records after `step` (atomically: a full disk
        leaves the old file). Only the last line may be unreadable (cut short by a kill); any
        other bad line is reported, not silently dropped."""
        if not self.path.exists():
            return
        lines = self.path.read_bytes().splitlines()
        kept = []
        for number, raw in enumerate(lines, 1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if number == len(lines):
                    continue  # a line cut short by a kill
                raise CheckpointError(
                    f"{self.path} line {number} is not readable JSON ({e}); repair or remove "
                    "that line (or move the file away) to resume"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
                raise CheckpointError(
                    f"{self.path} line {number} is not a metrics record (expected a JSON object "
                    f"with an integer 'step', got {raw[:80].decode('utf-8', 'replace')!r}); "
                    "repair or remove that line (or move the file away) to resume"
                )
            if record.get("step", 0) <= step:
                kept.append(raw.decode("utf-8"))
        write_atomically(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        except OSError as e:  # name the file: a bare "No space left on device" says nowhere
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        split, step = record.get("split", "train"), int(record["step"])
        for key, value in record.items():
            if key in ("step", "split", "wall_time") or isinstance(value, (bool, str)):
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            tb.close()


class _EventFile:
    """TensorBoard scalars written in the caller's thread, with tensorboardX's event writer and
    summary protos. (tensorboardX's `SummaryWriter` writes from a background thread: a full disk
    killed that thread with a traceback, and the next events then waited for it for ever.)"""

    def __init__(self, logdir: Path, *, purge_step: int = 0):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self._event_pb2, self.logdir = event_pb2, Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        with self._naming_the_file():
            self._writer = EventsWriter(str(self.logdir / "events"))
            if purge_step > 0:  # hides the events an interrupted run wrote after this step
                log = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
                self._writer.write_event(event_pb2.Event(step=purge_step, session_log=log))

    @contextlib.contextmanager
    def _naming_the_file(self):
        try:
            yield
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.logdir)) from None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        event = self._event_pb2.Event(wall_time=time.time(), step=step, summary=scalar(tag, value))
        with self._naming_the_file():
            self._writer.write_event(event)

    def flush(self) -> None:
        with self._naming_the_file():
            self._writer.flush()

    def close(self) -> None:
        with self._naming_the_file():
            self._writer.close()
