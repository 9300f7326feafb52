"""`train_and_evaluate(config, workdir)`: the training loop, top to bottom.

config -> feeder (dataset) + model + optimizer -> compiled steps -> state (restored or new) ->
steps in calls of up to the next log/eval/checkpoint/epoch boundary; between calls the host
checks for NaN, logs, evaluates, saves and looks at the stop flag set by SIGTERM/SIGINT.
The data order and all randomness are functions of (seed, step), so a run resumed from any
checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from cnn_jax import config as config_lib
from cnn_jax import fast_paths, parallel
from cnn_jax.errors import CheckpointError, CnnJaxError
from cnn_jax.models.summary import count_params
from cnn_jax.pretrained import finetune
from cnn_jax.train import optimizers, resume
from cnn_jax.train.checkpoints import CheckpointStore, DamagedCheckpointError, _sync_processes
from cnn_jax.train.compile import BACKENDS, TRAIN_SUMS, Compiled, StepSettings
from cnn_jax.train.feeders import Feeder, make_feeder
from cnn_jax.train.metric_writers import MetricWriter
from cnn_jax.train.reporting import Reporter
from cnn_jax.train.restore import build_model, fast_paths_wanted
from cnn_jax.train.signals import StopSignals
from cnn_jax.train.state import abstract_train_state
from cnn_jax.train.steps import EVAL_SUMS, summarize_eval
from cnn_jax.train.workdir import WorkdirLock, ensure_writable, write_atomically


class TrainingDivergedError(CnnJaxError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


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


def total_steps(config, steps_per_epoch: int) -> int:
    t = config.train
    return int(t.num_steps) if t.num_steps > 0 else int(t.num_epochs) * steps_per_epoch


def steps_per_call(config, devices) -> int:
    """Steps per compiled call: `train.steps_per_call`, or 1 on CPU (XLA:CPU runs convolution
    gradients inside loops several times slower, benchmarks/RESULTS.md) and 16 elsewhere."""
    n = int(config.train.steps_per_call)
    return n if n > 0 else (1 if devices[0].platform == "cpu" else 16)


def compile_for(config, model, tx, feeder: Feeder, devices) -> Compiled:
    """The configured back end (`train.backend`) compiled for `model`, `tx` and `feeder`."""
    keys = RunKeys.from_seed(int(config.seed))
    use_fast = fast_paths_wanted(config, devices)
    settings = StepSettings(
        data_key=keys.data,
        aug_key=keys.aug,
        label_smoothing=float(config.train.label_smoothing),
        grad_accum_steps=int(config.train.grad_accum_steps),
        compiler_options=fast_paths.compiler_options(devices) if use_fast else None,
    )
    return BACKENDS[config.train.backend](model, tx, feeder.preprocess, settings, devices)


def evaluate_variables(compiled: Compiled, feeder: Feeder, variables) -> dict:
    """Every example of the eval split exactly once -> loss, accuracy, top5_accuracy, count,
    images_per_sec. variables: {'params'[, 'batch_stats']} laid out by `compiled`."""
    start = time.perf_counter()
    sums = compiled.zero_sums(EVAL_SUMS)
    for batch in feeder.eval_batches(compiled):
        sums = _settle(compiled, compiled.evaluate(variables, sums, batch))
    metrics = summarize_eval(jax.device_get(compiled.host(sums)))
    if int(metrics["count"]) != feeder.num_eval:
        raise RuntimeError(
            f"evaluation saw {int(metrics['count'])} examples, expected {feeder.num_eval}"
        )
    metrics["images_per_sec"] = metrics["count"] / max(time.perf_counter() - start, 1e-9)
    return metrics


def _settle(compiled: Compiled, outputs):
    """Waits for `outputs` when the devices are several CPU devices of one process (forced with
    --xla_force_host_platform_device_count): XLA:CPU may then run the collectives of programs
    queued one after another interleaved, and under load they deadlock (its rendezvous aborts the
    process after 40 s). One program in flight at a time avoids it; elsewhere dispatch stays
    asynchronous."""
    if compiled.devices[0].platform == "cpu" and len(compiled.devices) > 1:
        jax.block_until_ready(outputs)
    return outputs


def run_steps(compiled: Compiled, state, sums, batches, num_steps: int, group: int):
    """Runs `num_steps` steps on the next batches of the iterator `batches`: one dispatch per
    step (`group` 1) or `group` steps per compiled loop. Grouping never changes the result."""
    if group == 1:
        for _ in range(num_steps):
            state, sums = _settle(compiled, compiled.train(state, sums, next(batches)))
        return state, sums
    while num_steps > 0:
        count = min(group, num_steps)
        taken = [next(batches) for _ in range(count)]
        taken += taken[-1:] * (group - count)  # unused padding: one program for any count
        state, sums = _settle(
            compiled,
            compiled.train_group(state, sums, tuple(taken), compiled.replicate(np.int32(count))),
        )
        num_steps -= count
    return state, sums


def restore_or_init(
    store: CheckpointStore,
    compiled: Compiled,
    abstract_state,
    image_shape,
    rng,
    *,
    strict: bool,
    initial_variables: dict | None = None,
):
    """(state, start step, meta or {}, damaged checkpoints skipped): resumes from the newest
    readable checkpoint. A damaged one is moved aside and reported (or raises when `strict`); a
    checkpoint of another model/optimizer raises `CheckpointError`. Without checkpoints, a new
    state (from `initial_variables` where they have a leaf: pretrained weights)."""
    damaged = []
    for step in reversed(store.all_steps()):
        try:
            host_state, meta = store.restore(step, abstract_state)
        except DamagedCheckpointError as e:
            if strict:
                raise
            damaged.append(f"{e} (moved to {store.set_aside(step)})")
            continue
        return compiled.replicate(jax.tree.map(np.asarray, host_state)), step, meta, damaged
    if damaged:
        raise CheckpointError(
            f"every checkpoint in {str(store.directory)!r} is damaged; not training from scratch "
            "over them (move them away to start again):\n  " + "\n  ".join(damaged)
        )
    return compiled.init_state(image_shape, rng, initial_variables), 0, {}, damaged


class _Window:
    """Train metrics summed since the last log record, and the timed throughput of the run."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.calls, self.timed_images, self.timed_seconds = 0, 0, 0.0
        self.reset()

    def reset(self):
        self.sums, self.steps, self.seconds = dict.fromkeys(TRAIN_SUMS, 0.0), 0, 0.0

    def add(self, sums: dict, steps: int, seconds: float, *, timed: bool):
        for k in TRAIN_SUMS:
            self.sums[k] += float(sums[k])
        self.steps, self.seconds = self.steps + steps, self.seconds + seconds
        self.calls += 1
        if timed:  # the first call includes compiling
            self.timed_images += steps * self.batch_size
            self.timed_seconds += seconds

    def means(self) -> dict:
        means = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        return {**means, "images_per_sec": self.steps * self.batch_size / max(self.seconds, 1e-9)}


def _next_boundary(step: int, end_step: int, spe: int, log_every: int, save_every: int) -> int:
    """The end of the next call: the nearest end/epoch/log/checkpoint boundary after `step`."""
    every = [spe, log_every] + ([save_every] if save_every > 0 else [])
    return min(end_step, *((step // n + 1) * n for n in every))


def _diverged(bad_step: int, spe: int, last_saved: int | None) -> TrainingDivergedError:
    kept = f"step {last_saved}" if last_saved is not None else "none"
    return TrainingDivergedError(
        f"training diverged: the loss became NaN or infinite at step {bad_step} (epoch "
        f"{bad_step // spe}); the last good checkpoint ({kept}) is kept. Try a lower "
        "optimizer.learning_rate or optimizer.grad_clip_norm > 0."
    )


def _is_better(metrics: dict, best: dict | None, key: str, mode: str) -> bool:
    if best is None or key not in best:
        return True
    # ties go to the later step, as in the checkpoint store
    return metrics[key] >= best[key] if mode == "max" else metrics[key] <= best[key]


def train_and_evaluate(
    config,
    workdir: str | Path,
    *,
    max_steps: int | None = None,
    reporter: Reporter | None = None,
    start_over: bool = False,
    resume_with_changed_config: bool = False,
) -> dict:
    """Trains and evaluates the configured model, resuming from `workdir` if it has checkpoints.

    Writes `<workdir>/config.json`, `metrics.jsonl`, TensorBoard events (`tensorboard/`) and
    `checkpoints/`. `max_steps` stops at that global step (the schedule still spans the whole
    run, so resuming later continues exactly). SIGTERM/SIGINT save a checkpoint and return
    with results['interrupted'] = True.

    A workdir is only resumed with the config its checkpoints were made with, apart from the
    keys in `resume.RESUME_SAFE_KEYS`; `resume_with_changed_config` allows any change and
    records it in the checkpoints' meta ('config_changes'). A workdir with results but no
    usable checkpoint raises `CheckpointError` unless `start_over`, which first moves its
    contents into `previous-runs/<time>/`.

    Returns: final_test_accuracy, final_test_loss, final_test_top5_accuracy, best_test_accuracy,
    best_step, steps, epochs, total_steps, wall_time_s, images_per_sec (training, after the
    first compiled call), num_params, num_devices, num_processes, interrupted, interrupted_by
    ("SIGTERM" | "SIGINT" | None), resumed_from,
    damaged_checkpoints.
    """
    wall_start = time.time()
    config = config_lib.validate_config(config)  # a checked copy: fast_paths is resolved below
    parallel.initialize_distributed()
    reporter = reporter or Reporter()
    workdir, is_main = Path(workdir), jax.process_index() == 0
    if is_main:
        ensure_writable(workdir)
    lock = WorkdirLock(workdir)
    if is_main:
        lock.acquire()
    try:
        # -- may this run continue what the workdir holds? (nothing is written before) ---------
        devices = jax.devices()
        config.model.fast_paths = "on" if fast_paths_wanted(config, devices) else "off"
        changes, resuming = {}, False
        if not start_over:
            resume.check_checkpoint_dir(workdir)
            if resume.saved_steps(workdir):
                resuming = True
                changes = resume.check_config(
                    workdir, config, allow_changes=resume_with_changed_config
                )
            else:
                resume.refuse_scratch_over_results(workdir)
        t, ck = config.train, config.checkpoint
        store = writer = None
        with StopSignals() as stop:
            try:
                # -- what this run is: data, model, optimizer, compiled steps --------------------
                feeder = make_feeder(config, len(devices))
                spe = feeder.steps_per_epoch
                num_total = total_steps(config, spe)
                end_step = min(num_total, int(max_steps)) if max_steps else num_total
                model = build_model(
                    config, feeder.num_classes, fast_paths=config.model.fast_paths == "on"
                )
                # fine-tuning: a frozen backbone's BatchNorm, the head, the weights file's variables
                model, head, pretrained = finetune.prepare(
                    config, model, feeder.image_shape, resuming=resuming
                )
                tx = optimizers.make_optimizer(config, spe, num_total, head_paths=head)
                compiled = compile_for(config, model, tx, feeder, devices)
                abstract_state = abstract_train_state(model, tx, feeder.image_shape)
                num_params = count_params(abstract_state.params)
                group = steps_per_call(config, devices)
                # -- every check passed: from here on the workdir is written -----------------
                previous_run = None
                if start_over and is_main:
                    previous_run = resume.set_aside_previous_run(workdir)
                _sync_processes("cnn_jax_start_over")
                store = CheckpointStore(
                    workdir,
                    keep=int(ck.keep),
                    best_metric=ck.best_metric,
                    best_mode=ck.best_mode,
                    async_save=bool(ck.async_save),
                )
                # -- where it starts: the newest readable checkpoint, or a new state ----------------
                state, start_step, meta, damaged = restore_or_init(
                    store,
                    compiled,
                    abstract_state,
                    feeder.image_shape,
                    RunKeys.from_seed(int(config.seed)).init,
                    strict=bool(ck.strict_resume),
                    initial_variables=pretrained,
                )
                if is_main:
                    write_atomically(
                        workdir / "config.json", config_lib.config_to_json(config) + "\n"
                    )
                resumed = start_step if meta else None
                config_history = list(meta.get("config_changes") or [])
                if changes and resumed is not None:
                    config_history.append(
                        {
                            "step": start_step,
                            "changes": {k: list(v) for k, v in changes.items()},
                            "forced": any(not resume.is_safe_change(k) for k in changes),
                        }
                    )
                best, last_eval = meta.get("best"), meta.get("last_eval")
                last_saved = start_step if meta else None
                writer = MetricWriter(workdir, resume_step=start_step, enabled=is_main)
                reporter.on_start(
                    {
                        "total_steps": num_total,
                        "end_step": end_step,
                        "start_step": start_step,
                        "resumed_from": resumed,
                        "damaged_checkpoints": damaged,
                        "config_changes": changes if resumed is not None else {},
                        "previous_run": previous_run,
                        "steps_per_epoch": spe,
                        "num_params": num_params,
                        "input_shape": feeder.image_shape,
                        "num_classes": feeder.num_classes,
                        "num_devices": len(devices),
                        "num_processes": jax.process_count(),
                        "backend": compiled.name,
                        "feeder": feeder.kind,
                        "workdir": str(workdir),
                    }
                )

                def evaluate(step: int) -> dict:
                    nonlocal best, last_eval
                    metrics = evaluate_variables(compiled, feeder, state.variables())
                    record = {"step": step, "epoch": step / spe, **metrics}
                    writer.write({**record, "split": "test", "wall_time": time.time()})
                    writer.flush()
                    last_eval = {"step": step, **metrics}
                    if _is_better(metrics, best, ck.best_metric, ck.best_mode):
                        best = {"step": step, **metrics}
                    reporter.on_eval(step, record)
                    return metrics

                def save(step: int, eval_metrics: dict | None = None) -> None:
                    """Starts an asynchronous checkpoint of `state` (with its eval, if any)."""
                    nonlocal last_saved
                    with stop.writing():
                        store.save(
                            step,
                            compiled.host(state),
                            {
                                "step": step,
                                "epoch": step // spe,
                                "data_position": {
                                    "step": step,
                                    "epoch": step // spe,
                                    "step_in_epoch": step % spe,
                                    "steps_per_epoch": spe,
                                    "examples_seen": step * feeder.batch_size,
                                },
                                "total_steps": num_total,
                                "image_shape": list(feeder.image_shape),
                                "num_classes": feeder.num_classes,
                                "best": best,
                                "last_eval": last_eval,
                                "config_changes": config_history,
                            },
                            eval_metrics,
                        )
                    last_saved = step

                # -- the loop ---------------------------------------------------------------------
                step, interrupted, window = start_step, False, _Window(feeder.batch_size)
                batches = feeder.train_batches(compiled, step) if step < end_step else None
                stop.arm()
                while step < end_step:
                    store.check_pending()  # a failed background save stops the run here
                    if stop.requested():
                        if last_saved != step:
                            save(step)
                        interrupted = True
                        break
                    stop_at = _next_boundary(step, end_step, spe, t.log_every_steps, ck.every_steps)
                    began = time.perf_counter()
                    state, sums = run_steps(
                        compiled, state, compiled.zero_sums(), batches, stop_at - step, group
                    )
                    sums = jax.device_get(compiled.host(sums))  # waits for the steps
                    if sums["first_bad_step"] >= 0:
                        raise _diverged(int(sums["first_bad_step"]), spe, last_saved)
                    window.add(
                        sums,
                        stop_at - step,
                        time.perf_counter() - began,
                        timed=window.calls > 0 or stop_at == end_step,
                    )
                    step = stop_at

                    # -- between calls: log, evaluate, checkpoint -------------------------------
                    epoch_end = step % spe == 0
                    record = {**window.means(), "epoch": step / spe}
                    if step % t.log_every_steps == 0 or epoch_end or step == end_step:
                        writer.write(
                            {"step": step, "split": "train", **record, "wall_time": time.time()}
                        )
                        window.reset()
                    reporter.on_train_step(step, num_total, record)
                    eval_due = epoch_end and (step // spe) % t.eval_every_epochs == 0
                    eval_metrics = evaluate(step) if eval_due or step == end_step else None
                    every = int(ck.every_steps)
                    save_due = step % every == 0 if every > 0 else epoch_end
                    if eval_metrics is not None or save_due or step == end_step:
                        save(step, eval_metrics)
                if not interrupted and (last_eval is None or last_eval["step"] != step):
                    # e.g. resumed a run that had already finished: report its final evaluation
                    last_eval = {
                        "step": step,
                        **evaluate_variables(compiled, feeder, state.variables()),
                    }
            finally:
                if store is not None:
                    with stop.writing():
                        store.close()  # waits for the asynchronous writes
                if writer is not None:
                    writer.close()
    finally:
        lock.release()
    last, best = last_eval or {}, best or {}
    results = {
        "final_test_accuracy": last.get("accuracy"),
        "final_test_loss": last.get("loss"),
        "final_test_top5_accuracy": last.get("top5_accuracy"),
        "best_test_accuracy": best.get("accuracy"),
        "best_step": best.get("step"),
        "steps": step,
        "epochs": step / spe,
        "total_steps": num_total,
        "wall_time_s": time.time() - wall_start,
        "images_per_sec": window.timed_images / window.timed_seconds
        if window.timed_seconds
        else 0.0,
        "num_params": num_params,
        "num_devices": len(devices),
        "num_processes": jax.process_count(),
        "interrupted": interrupted,
        "interrupted_by": stop.signal_name if interrupted else None,
        "resumed_from": resumed,
        "damaged_checkpoints": damaged,
    }
    reporter.on_end(results)
    return results
