"""Where logged metrics go: `<workdir>/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import math
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
        from tensorboardX import SummaryWriter  # imported here: only the writing process needs it

        # purge_step hides events the interrupted run wrote after the checkpoint we resume from.
        self._tb = SummaryWriter(
            logdir=str(Path(workdir) / "tensorboard"),
            purge_step=resume_step if resume_step > 0 else None,
            flush_secs=30,
        )

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
        with self.path.open("a") as f:
            f.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
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
            self._tb.close()
            self._tb = None
