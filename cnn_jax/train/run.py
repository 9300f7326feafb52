"""Everything one training (or evaluation) run builds from its config.

config -> dataset (`inputs`) + model + optimizer -> back end (compiled steps) + checkpoint store;
`Run.restore_or_init` gives the state to start from and `Run.evaluate` the eval metrics.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from cnn_jax.errors import CheckpointError, ConfigError
from cnn_jax.models.summary import count_params
from cnn_jax.train import backends, optimizers
from cnn_jax.train import inputs as inputs_lib
from cnn_jax.train.checkpoints import CheckpointStore, DamagedCheckpointError
from cnn_jax.train.state import TrainState
from cnn_jax.train.steps import summarize_eval


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


class Run:
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
