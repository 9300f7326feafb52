"""The training loop: `train_and_evaluate`.

The loop drives the compiled steps in chunks: each call runs up to the next boundary (log /
eval / checkpoint / epoch end / `train.steps_per_call`), and between calls the host checks for
NaN, logs, evaluates, saves and looks at the stop flag set by SIGTERM/SIGINT. The data order
and all randomness are functions of (seed, step), so a run resumed from any checkpoint ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections

from cnn_jax import config as config_lib
from cnn_jax import parallel
from cnn_jax.errors import CnnJaxError
from cnn_jax.train import backends
from cnn_jax.train.metric_writers import MetricWriter
from cnn_jax.train.reporting import Reporter
from cnn_jax.train.run import (  # noqa: F401  (RunKeys, build_model, count_params: public here too)
    Run,
    RunKeys,
    build_model,
    check_device_divisibility,
    count_params,
)
from cnn_jax.train.signals import StopSignals
from cnn_jax.train.workdir import WorkdirLock, ensure_writable


class TrainingDivergedError(CnnJaxError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class _Window:
    """Train metrics accumulated since the last log record."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = {k: 0.0 for k in backends.TRAIN_SUMS}
        self.steps = 0
        self.seconds = 0.0

    def add(self, sums: dict, steps: int, seconds: float):
        for k in self.sums:
            self.sums[k] += float(sums[k])
        self.steps += steps
        self.seconds += seconds

    def means(self) -> dict:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


def _next_stop(step: int, end_step: int, run: Run) -> int:
    """The end of the next compiled call: the nearest log/epoch/checkpoint/end boundary."""
    t, spe = run.config.train, run.steps_per_epoch
    nxt = lambda every: (step // every + 1) * every
    candidates = [end_step, nxt(spe), nxt(int(t.log_every_steps))]
    if run.config.checkpoint.every_steps > 0:
        candidates.append(nxt(int(run.config.checkpoint.every_steps)))
    if t.steps_per_call > 0:
        candidates.append(step + int(t.steps_per_call))
    return min(candidates)


def _is_better(metrics: dict, best: dict | None, key: str, mode: str) -> bool:
    if best is None or key not in best:
        return True
    # ties go to the later step, as in the checkpoint store
    return metrics[key] >= best[key] if mode == "max" else metrics[key] <= best[key]


def _train_chunk(run: Run, state, resident_train, train_iter, first_step: int, num_steps: int):
    """Runs `num_steps` steps; returns (state, sums with first_bad_step) on the host."""
    if resident_train is not None:
        state, sums = run.backend.train_steps(state, resident_train, first_step, num_steps)
        return state, jax.device_get(sums)
    outputs = []
    for _ in range(num_steps):
        state, metrics = run.backend.train_batch(state, next(train_iter))
        outputs.append(metrics)
    outputs = jax.device_get(outputs)
    sums = {k: float(sum(o[k] for o in outputs)) for k in backends.TRAIN_SUMS}
    bad = [int(o["first_bad_step"]) for o in outputs if int(o["first_bad_step"]) >= 0]
    sums["first_bad_step"] = bad[0] if bad else -1
    return state, sums


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    max_steps: int | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Trains and evaluates the configured model, resuming from `workdir` if it has checkpoints.

    Writes `<workdir>/config.json`, `metrics.jsonl`, TensorBoard events (`tensorboard/`) and
    `checkpoints/`. `max_steps` stops at that global step (the schedule still spans the whole
    run, so resuming later continues exactly). SIGTERM/SIGINT save a checkpoint and return
    with results['interrupted'] = True.

    Returns: final_test_accuracy, final_test_loss, final_test_top5_accuracy, best_test_accuracy,
    best_step, steps, epochs, total_steps, wall_time_s, images_per_sec (training, after the
    first compiled call), num_params, num_devices, num_processes, interrupted, resumed_from,
    damaged_checkpoints.
    """
    wall_start = time.time()
    config = config_lib.validate_config(ml_collections.ConfigDict(config.to_dict()))
    parallel.initialize_distributed()
    reporter = reporter or Reporter()
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        ensure_writable(workdir)
    lock = WorkdirLock(workdir)
    if is_main:
        lock.acquire()
    try:
        run = Run(config, workdir)
        try:
            return _train(run, config, workdir, max_steps, reporter, wall_start, is_main)
        finally:
            run.store.close()
    finally:
        lock.release()


class _Trainer:
    """One `train_and_evaluate` call: the chunked loop and what happens between chunks."""

    def __init__(self, run: Run, end_step: int, reporter: Reporter, is_main: bool):
        self.run, self.config, self.reporter = run, run.config, reporter
        self.spe, self.end_step = run.steps_per_epoch, end_step
        self.state, self.start_step, meta, self.damaged = run.restore_or_init()
        self.resumed = bool(meta)
        self.best, self.last_eval = meta.get("best"), meta.get("last_eval")
        self.last_saved = self.start_step if self.resumed else None
        self.step = self.start_step
        self.writer = MetricWriter(run.workdir, resume_step=self.start_step, enabled=is_main)
        self.window = _Window()
        self.timed_images, self.timed_seconds, self.calls = 0, 0.0, 0
        self.resident_train = self.train_iter = None
        if self.start_step < end_step:
            if run.inputs.feeder == "device":
                self.resident_train = run.backend.put_resident(*run.inputs.train_arrays)
            else:
                self.train_iter = iter(run.inputs.train_batches(self.start_step))

    def start_info(self) -> dict:
        run = self.run
        return {
            "total_steps": run.total_steps,
            "end_step": self.end_step,
            "start_step": self.start_step,
            "resumed_from": self.start_step if self.resumed else None,
            "damaged_checkpoints": self.damaged,
            "steps_per_epoch": self.spe,
            "num_params": run.num_params,
            "input_shape": run.image_shape,
            "num_classes": run.inputs.num_classes,
            "num_devices": len(run.devices),
            "num_processes": jax.process_count(),
            "backend": run.backend.name,
            "feeder": run.inputs.feeder,
            "workdir": str(run.workdir),
        }

    def train(self, stop: StopSignals) -> bool:
        """Trains up to `end_step`; returns True if stopped early by a signal."""
        while self.step < self.end_step:
            if stop.requested():
                if self.last_saved != self.step:
                    self.save()
                return True
            stop_at = _next_stop(self.step, self.end_step, self.run)
            self.train_chunk(stop_at - self.step)
            epoch_end = self.step % self.spe == 0
            self.log_train(epoch_end)
            eval_metrics = self.evaluate() if self.eval_due(epoch_end) else None
            if eval_metrics is not None or self.checkpoint_due(epoch_end):
                self.save(eval_metrics)
        return False

    def train_chunk(self, num_steps: int) -> None:
        began = time.perf_counter()
        self.state, sums = _train_chunk(
            self.run, self.state, self.resident_train, self.train_iter, self.step, num_steps
        )
        seconds = time.perf_counter() - began
        if sums["first_bad_step"] >= 0:
            bad = int(sums["first_bad_step"])
            kept = f"step {self.last_saved}" if self.last_saved is not None else "none"
            raise TrainingDivergedError(
                f"training diverged: the loss became NaN or infinite at step {bad} (epoch "
                f"{bad // self.spe}); the last good checkpoint ({kept}) is kept. Try a lower "
                "optimizer.learning_rate or optimizer.grad_clip_norm > 0."
            )
        self.calls += 1
        self.step += num_steps
        if self.calls > 1 or self.step == self.end_step:  # the first call includes compiling
            self.timed_images += num_steps * self.run.batch_size
            self.timed_seconds += seconds
        self.window.add(sums, num_steps, seconds)

    def log_train(self, epoch_end: bool) -> None:
        w = self.window
        record = {
            **w.means(),
            "images_per_sec": w.steps * self.run.batch_size / max(w.seconds, 1e-9),
            "epoch": self.step / self.spe,
        }
        if (
            self.step % self.config.train.log_every_steps == 0
            or epoch_end
            or self.step == self.end_step
        ):
            self.writer.write(
                {"step": self.step, "split": "train", **record, "wall_time": time.time()}
            )
            w.reset()
        self.reporter.on_train_step(self.step, self.run.total_steps, record)

    def eval_due(self, epoch_end: bool) -> bool:
        every = self.config.train.eval_every_epochs
        return self.step == self.end_step or (epoch_end and (self.step // self.spe) % every == 0)

    def checkpoint_due(self, epoch_end: bool) -> bool:
        every = int(self.config.checkpoint.every_steps)
        if self.step == self.end_step:
            return True
        return self.step % every == 0 if every > 0 else epoch_end

    def evaluate(self) -> dict:
        metrics = self.run.evaluate(self.state)
        record = {"step": self.step, "epoch": self.step / self.spe, **metrics}
        self.writer.write({**record, "split": "test", "wall_time": time.time()})
        self.writer.flush()
        self.last_eval = {"step": self.step, **metrics}
        ck = self.config.checkpoint
        if _is_better(metrics, self.best, ck.best_metric, ck.best_mode):
            self.best = {"step": self.step, **metrics}
        self.reporter.on_eval(self.step, record)
        return metrics

    def save(self, eval_metrics: dict | None = None) -> None:
        """Starts an asynchronous checkpoint of the current step (with its eval, if any)."""
        run = self.run
        host_state = run.backend.to_host_layout(self.state)
        meta = run.meta(self.step, self.best, self.last_eval)
        run.store.save(self.step, host_state, meta, eval_metrics)
        self.last_saved = self.step

    def close(self) -> None:
        self.run.store.close()  # waits for the asynchronous writes
        self.writer.close()

    def results(self, interrupted: bool, wall_start: float) -> dict:
        if not interrupted and (self.last_eval is None or self.last_eval["step"] != self.step):
            self.last_eval = {
                "step": self.step,
                **self.run.evaluate(self.state),
            }  # e.g. resumed a finished run
        last, best = self.last_eval or {}, self.best or {}
        return {
            "final_test_accuracy": last.get("accuracy"),
            "final_test_loss": last.get("loss"),
            "final_test_top5_accuracy": last.get("top5_accuracy"),
            "best_test_accuracy": best.get("accuracy"),
            "best_step": best.get("step"),
            "steps": self.step,
            "epochs": self.step / self.spe,
            "total_steps": self.run.total_steps,
            "wall_time_s": time.time() - wall_start,
            "images_per_sec": self.timed_images / self.timed_seconds if self.timed_seconds else 0.0,
            "num_params": self.run.num_params,
            "num_devices": len(self.run.devices),
            "num_processes": jax.process_count(),
            "interrupted": interrupted,
            "resumed_from": self.start_step if self.resumed else None,
            "damaged_checkpoints": self.damaged,
        }


def _train(run: Run, config, workdir: Path, max_steps, reporter, wall_start, is_main) -> dict:
    if is_main:
        (workdir / "config.json").write_text(config_lib.config_to_json(config) + "\n")
    end_step = run.total_steps if not max_steps else min(run.total_steps, int(max_steps))
    trainer = _Trainer(run, end_step, reporter, is_main)
    reporter.on_start(trainer.start_info())
    try:
        with StopSignals() as stop:
            interrupted = trainer.train(stop)
    finally:
        trainer.close()
    results = trainer.results(interrupted, wall_start)
    reporter.on_end(results)
    return results
