"""The training loop: `train_and_evaluate`, `evaluate` and `load_trained`.

One run = config -> dataset + model + optimizer -> TrainState -> compiled steps, driven in
chunks: each compiled call runs up to the next boundary (log / eval / checkpoint / epoch end /
`train.steps_per_call`), and between calls the host checks for NaN, logs, evaluates, saves and
looks at the stop flag set by SIGTERM/SIGINT. The data order and all randomness are functions
of (seed, step), so an interrupted run resumed from any checkpoint ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from pathlib import Path
from typing import Any, Self

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_jax import config as config_lib
from cnn_jax import parallel
from cnn_jax.errors import CheckpointError, CnnJaxError, ConfigError
from cnn_jax.train import backends, optimizers
from cnn_jax.train import inputs as inputs_lib
from cnn_jax.train.checkpoints import CheckpointStore, DamagedCheckpointError
from cnn_jax.train.metric_writers import MetricWriter
from cnn_jax.train.reporting import Reporter
from cnn_jax.train.state import TrainState
from cnn_jax.train.steps import summarize_eval
from cnn_jax.train.workdir import WorkdirLock, ensure_writable


class TrainingDivergedError(CnnJaxError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# -- building blocks ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """The PRNG keys of a run, all derived from `config.seed`."""

    init: jax.Array  # parameter init + the state's dropout key
    data: jax.Array  # epoch permutations
    aug: jax.Array  # augmentation of step s: fold_in(aug, s)

    @classmethod
    def from_seed(cls, seed: int) -> RunKeys:
        init, data, aug = jax.random.split(jax.random.PRNGKey(seed), 3)
        return cls(init=init, data=data, aug=aug)


def check_device_divisibility(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Every device must get the same share of every (micro-)batch."""
    t = config.train
    checks = [
        ("train.batch_size", t.batch_size, t.batch_size),
        ("train.eval_batch_size", t.eval_batch_size, t.eval_batch_size),
        ("train.grad_accum_steps", t.grad_accum_steps, t.batch_size // t.grad_accum_steps),
    ]
    for key, value, per_step in checks:
        if per_step % num_devices:
            what = "a micro-batch" if key == "train.grad_accum_steps" else "the batch"
            raise ConfigError(
                f"config key {key!r} has invalid value {value!r}: {what} of {per_step} examples "
                f"cannot be split evenly over {num_devices} devices; expected a multiple of "
                f"{num_devices}"
            )


def build_model(config: ml_collections.ConfigDict, num_classes: int, *, half_precision=None):
    """The configured model; bfloat16 compute (float32 params) when train.half_precision."""
    from cnn_jax.models import get_model

    options = dict(config.model.options.to_dict())
    if config.train.half_precision if half_precision is None else half_precision:
        options["dtype"] = jnp.bfloat16
    return get_model(config.model.name, num_classes=num_classes, **options)


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    t = config.train
    return int(t.num_steps) if t.num_steps > 0 else int(t.num_epochs) * steps_per_epoch


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


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


# -- the run -----------------------------------------------------------------------------------


class _Run:
    """Everything one `train_and_evaluate` call builds from the config."""

    def __init__(
        self,
        config,
        workdir: Path,
        *,
        store: CheckpointStore | None = None,
        schedule: tuple[int, int] | None = None,
    ):
        """schedule: (steps_per_epoch, total_steps) of a finished run (evaluation only: no
        training split is loaded); store: an already open checkpoint store."""
        self.config = config
        self.workdir = workdir
        t = config.train
        self.devices = jax.devices()
        check_device_divisibility(config, len(self.devices))
        self.keys = RunKeys.from_seed(int(config.seed))
        eval_only = schedule is not None
        self.inputs = inputs_lib.load_inputs(config, eval_only=eval_only)
        self.batch_size = int(t.batch_size)
        if eval_only:
            self.steps_per_epoch, self.total_steps = schedule
        else:
            self.steps_per_epoch = inputs_lib.steps_per_epoch(
                self.inputs.num_train, self.batch_size
            )
            self.total_steps = total_steps(config, self.steps_per_epoch)
        self.model = build_model(config, self.inputs.num_classes)
        self.tx = optimizers.make_optimizer(config, self.steps_per_epoch, self.total_steps)
        settings = backends.StepSettings(
            batch_size=self.batch_size,
            eval_batch_size=int(t.eval_batch_size),
            steps_per_epoch=self.steps_per_epoch,
            data_key=self.keys.data,
            aug_key=self.keys.aug,
            label_smoothing=float(t.label_smoothing),
            grad_accum_steps=int(t.grad_accum_steps),
            compiled_loop=(
                t.steps_per_call > 1
                if t.steps_per_call > 0
                else backends.default_compiled_loop(self.devices)
            ),
        )
        self.backend = backends.make_backend(
            t.backend, self.model, self.tx, self.inputs.preprocess, settings, devices=self.devices
        )
        self.image_shape = tuple(self.inputs.image_shape)
        self.abstract_state = self.backend.abstract_state(self.image_shape)
        self.num_params = count_params(self.abstract_state.params)
        ck = config.checkpoint
        self.store = store or CheckpointStore(
            workdir,
            keep=int(ck.keep),
            best_metric=ck.best_metric,
            best_mode=ck.best_mode,
            async_save=bool(ck.async_save),
        )
        self._resident_eval = None

    # -- state ---------------------------------------------------------------------------------
    def restore_or_init(self) -> tuple[TrainState, int, dict, list[str]]:
        """(state, start step, meta of the checkpoint or {}, damaged checkpoints skipped).

        Resumes from the newest readable checkpoint; a damaged one is reported and skipped
        (never silently: its name is returned and ends up in the results). A checkpoint of a
        different model/optimizer raises `CheckpointError`.
        """
        damaged = []
        for step in reversed(self.store.all_steps()):
            try:
                host_state, meta = self.store.restore(step, self.abstract_state)
            except DamagedCheckpointError as e:
                if self.config.checkpoint.strict_resume:
                    raise
                damaged.append(f"{e} (moved to {self.store.set_aside(step)})")
                continue
            return self.backend.to_device_state(host_state), step, meta, damaged
        if damaged:
            raise CheckpointError(
                "every checkpoint in "
                f"{str(self.store.directory)!r} is damaged; not training from scratch over them "
                "(move them away to start again):\n  " + "\n  ".join(damaged)
            )
        state = self.backend.create_state(self.image_shape, self.keys.init)
        return state, 0, {}, damaged

    def meta(self, step: int, best: dict | None, last_eval: dict | None) -> dict:
        return {
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "data_position": {
                "step": step,
                "epoch": step // self.steps_per_epoch,
                "step_in_epoch": step % self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "examples_seen": step * self.batch_size,
            },
            "total_steps": self.total_steps,
            "image_shape": list(self.image_shape),
            "num_classes": self.inputs.num_classes,
            "best": best,
            "last_eval": last_eval,
            "config": self.config.to_dict(),
        }

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, state: TrainState) -> dict:
        """Every example of the eval split exactly once -> loss, accuracy, top5_accuracy, count."""
        start = time.perf_counter()
        if self.inputs.feeder == "device":
            if self._resident_eval is None:
                images, labels = self.inputs.eval_arrays
                padded = backends.pad_eval_split(
                    images, labels, self.backend.settings.eval_batch_size
                )
                self._resident_eval = self.backend.put_resident(*padded)
            sums = self.backend.evaluate_resident(state, self._resident_eval)
        else:
            sums = None
            for batch in self.inputs.eval_batches():
                part = self.backend.eval_batch(state, batch)
                sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
        metrics = summarize_eval(jax.device_get(sums))
        if int(metrics["count"]) != self.inputs.num_eval:
            raise RuntimeError(
                f"evaluation saw {int(metrics['count'])} examples, expected {self.inputs.num_eval}"
            )
        metrics["images_per_sec"] = metrics["count"] / max(time.perf_counter() - start, 1e-9)
        return metrics


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


def _next_stop(step: int, end_step: int, run: _Run) -> int:
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


def _train_chunk(run: _Run, state, resident_train, train_iter, first_step: int, num_steps: int):
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
        run = _Run(config, workdir)
        return _train(run, config, workdir, max_steps, reporter, wall_start, is_main)
    finally:
        lock.release()


def _train(run: _Run, config, workdir: Path, max_steps, reporter, wall_start, is_main) -> dict:
    if is_main:
        (workdir / "config.json").write_text(config_lib.config_to_json(config) + "\n")
    spe = run.steps_per_epoch
    end_step = run.total_steps if not max_steps else min(run.total_steps, int(max_steps))
    state, start_step, meta, damaged = run.restore_or_init()
    best, last_eval = meta.get("best"), meta.get("last_eval")
    writer = MetricWriter(workdir, resume_step=start_step, enabled=is_main)
    resident_train = train_iter = None
    if run.inputs.feeder == "device" and start_step < end_step:
        resident_train = run.backend.put_resident(*run.inputs.train_arrays)
    elif start_step < end_step:
        train_iter = iter(run.inputs.train_batches(start_step))
    reporter.on_start(
        {
            "total_steps": run.total_steps,
            "end_step": end_step,
            "start_step": start_step,
            "resumed_from": start_step if meta else None,
            "damaged_checkpoints": damaged,
            "steps_per_epoch": spe,
            "num_params": run.num_params,
            "input_shape": run.image_shape,
            "num_classes": run.inputs.num_classes,
            "num_devices": len(run.devices),
            "num_processes": jax.process_count(),
            "backend": run.backend.name,
            "feeder": run.inputs.feeder,
            "workdir": str(workdir),
        }
    )
    ck = config.checkpoint
    step, interrupted = start_step, False
    window, timed_images, timed_seconds, calls = _Window(), 0, 0.0, 0
    last_saved = start_step if meta else None

    def save(at_step: int, eval_metrics: dict | None = None) -> None:
        nonlocal last_saved
        host_state = run.backend.to_host_layout(state)
        run.store.save(at_step, host_state, run.meta(at_step, best, last_eval), eval_metrics)
        last_saved = at_step

    try:
        with StopSignals() as stop:
            while step < end_step:
                if stop.requested():
                    interrupted = True
                    break
                stop_at = _next_stop(step, end_step, run)
                began = time.perf_counter()
                state, sums = _train_chunk(
                    run, state, resident_train, train_iter, step, stop_at - step
                )
                seconds = time.perf_counter() - began
                if sums["first_bad_step"] >= 0:
                    bad = int(sums["first_bad_step"])
                    raise TrainingDivergedError(
                        f"training diverged: the loss became NaN or infinite at step {bad} "
                        f"(epoch {bad // spe}); the last good checkpoint "
                        f"({'step ' + str(last_saved) if last_saved is not None else 'none'}) "
                        "is kept. Try a lower optimizer.learning_rate or "
                        "optimizer.grad_clip_norm > 0."
                    )
                calls += 1
                if calls > 1 or stop_at == end_step:  # the first call includes compilation
                    timed_images += (stop_at - step) * run.batch_size
                    timed_seconds += seconds
                window.add(sums, stop_at - step, seconds)
                step = stop_at
                epoch_end = step % spe == 0
                record = {
                    **window.means(),
                    "images_per_sec": window.steps * run.batch_size / max(window.seconds, 1e-9),
                    "epoch": step / spe,
                }
                if step % config.train.log_every_steps == 0 or epoch_end or step == end_step:
                    writer.write(
                        {"step": step, "split": "train", **record, "wall_time": time.time()}
                    )
                    window.reset()
                reporter.on_train_step(step, run.total_steps, record)
                eval_due = step == end_step or (
                    epoch_end and (step // spe) % config.train.eval_every_epochs == 0
                )
                eval_metrics = None
                if eval_due:
                    eval_metrics = run.evaluate(state)
                    eval_record = {"epoch": step / spe, **eval_metrics}
                    writer.write(
                        {"step": step, "split": "test", **eval_record, "wall_time": time.time()}
                    )
                    writer.flush()
                    last_eval = {"step": step, **eval_metrics}
                    if _is_better(eval_metrics, best, ck.best_metric, ck.best_mode):
                        best = {"step": step, **eval_metrics}
                    reporter.on_eval(step, {"step": step, **eval_record})
                every = int(ck.every_steps)
                if (
                    eval_due
                    or step == end_step
                    or (every > 0 and step % every == 0)
                    or (every == 0 and epoch_end)
                ):
                    save(step, eval_metrics)
            if interrupted and last_saved != step:
                save(step)
    finally:
        run.store.close()  # waits for the asynchronous writes
        writer.close()

    if not interrupted and (last_eval is None or last_eval.get("step") != step):
        last_eval = {"step": step, **run.evaluate(state)}  # e.g. resumed a finished run
    results = {
        "final_test_accuracy": last_eval["accuracy"] if last_eval else None,
        "final_test_loss": last_eval["loss"] if last_eval else None,
        "final_test_top5_accuracy": last_eval["top5_accuracy"] if last_eval else None,
        "best_test_accuracy": best["accuracy"] if best else None,
        "best_step": best["step"] if best else None,
        "steps": step,
        "epochs": step / spe,
        "total_steps": run.total_steps,
        "wall_time_s": time.time() - wall_start,
        "images_per_sec": timed_images / timed_seconds if timed_seconds else 0.0,
        "num_params": run.num_params,
        "num_devices": len(run.devices),
        "num_processes": jax.process_count(),
        "interrupted": interrupted,
        "resumed_from": start_step if meta else None,
        "damaged_checkpoints": damaged,
    }
    reporter.on_end(results)
    return results


# -- using a trained run -----------------------------------------------------------------------


def _saved_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} not found: is {str(workdir)!r} a training workdir?")
    return config_lib.config_from_json(path.read_text())


def evaluate(
    config: ml_collections.ConfigDict | None, workdir: str | Path, checkpoint: str | int = "latest"
) -> dict:
    """Evaluates a checkpoint ('latest' | 'best' | step) of `workdir` on the eval split.

    `config` None uses the run's saved config.json. Returns loss, accuracy, top5_accuracy,
    count, step.
    """
    workdir = Path(workdir)
    config = _saved_config(workdir) if config is None else config
    config = config_lib.validate_config(ml_collections.ConfigDict(config.to_dict()))
    parallel.initialize_distributed()
    ck = config.checkpoint
    store = CheckpointStore(
        workdir, best_metric=ck.best_metric, best_mode=ck.best_mode, read_only=True
    )
    try:
        step = store.resolve(checkpoint)
        position = store.read_meta(step)
        schedule = (int(position["data_position"]["steps_per_epoch"]), int(position["total_steps"]))
        run = _Run(config, workdir, store=store, schedule=schedule)
        host_state, _ = store.restore(step, run.abstract_state)
    finally:
        store.close()
    metrics = run.evaluate(run.backend.to_device_state(host_state))
    metrics.pop("images_per_sec", None)
    return {**metrics, "step": step}


def load_trained(
    workdir: str | Path, checkpoint: str | int = "latest"
) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """(config, model, variables) of a trained run, for inference.

    variables: {'params': ..., 'batch_stats': ...} (float32, on the default device); the model
    is built in float32 whatever train.half_precision was. Needs no dataset.
    """
    workdir = Path(workdir)
    store = CheckpointStore(workdir, read_only=True)
    step = store.resolve(checkpoint)
    meta = store.read_meta(step)
    config = config_lib.config_from_json(_json_dumps(meta["config"]))
    model = build_model(config, int(meta["num_classes"]), half_precision=False)
    tx = optimizers.make_optimizer(
        config, int(meta["data_position"]["steps_per_epoch"]), int(meta["total_steps"])
    )
    from cnn_jax.train.state import abstract_train_state

    target = abstract_train_state(model, tx, tuple(meta["image_shape"]))
    state, _ = store.restore(step, target)
    store.close()
    return config, model, state.variables()


def _json_dumps(value) -> str:
    import json

    return json.dumps(value)
