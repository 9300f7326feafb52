"""Trained runs back in Python: `load` a model and its variables, `evaluate` a checkpoint, and
`build_model`, the one place a config becomes a model. No optimizer is built for either."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from cnn_jax import config as config_lib
from cnn_jax.errors import CheckpointError
from cnn_jax.train.checkpoints import CheckpointStore, DamagedCheckpointError
from cnn_jax.train.state import variables_of


def fast_paths_wanted(config, devices=None) -> bool:
    """Whether `model.fast_paths` ('auto' | 'on' | 'off') asks for the CPU fast implementations
    on `devices` (default: all devices); 'auto' means yes when they are all CPUs."""
    setting = config.model.fast_paths
    if setting != "auto":
        return setting == "on"
    return all(d.platform == "cpu" for d in (jax.devices() if devices is None else devices))


def build_model(config, num_classes: int, *, fast_paths: bool = False, half_precision=None):
    """The model `config` describes, with `num_classes` outputs: `model.name` and
    `model.options`, bfloat16 compute (float32 parameters) when `train.half_precision` (or
    `half_precision`), and the CPU fast conv/pool implementations of `cnn_jax.fast_paths` when
    `fast_paths` (same variables, same function to float32 rounding)."""
    from cnn_jax import fast_paths as fast_paths_lib
    from cnn_jax.models import get_model, model_options

    options = dict(config.model.options.to_dict())
    if config.train.half_precision if half_precision is None else half_precision:
        options["dtype"] = jnp.bfloat16
    if fast_paths:
        fields = model_options(config.model.name)
        options.update({k: v for k, v in fast_paths_lib.modules().items() if k in fields})
    return get_model(config.model.name, num_classes=num_classes, **options)


def read_config(workdir: str | Path):
    """The config a run was trained with (`<workdir>/config.json`)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found: is {str(workdir)!r} a training workdir?")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the run config {str(path)!r}: {e}") from None
    return config_lib.config_from_json(text, source=str(path))


def _open_store(workdir: Path, config) -> CheckpointStore:
    ck = config.checkpoint
    return CheckpointStore(
        workdir, best_metric=ck.best_metric, best_mode=ck.best_mode, read_only=True
    )


def _restore_variables(store: CheckpointStore, step: int, model, image_shape) -> dict:
    """The `variables` item of checkpoint `step`, shaped for `model` on `image_shape` inputs, as
    {'params'[, 'batch_stats']} for `model.apply`."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))
    target = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    variables, _ = store.restore_variables(step, target)
    return variables_of(variables["params"], variables["batch_stats"])


def _read_resolved(store: CheckpointStore, checkpoint: str | int, read):
    """(step, read(step)) for the checkpoint `checkpoint` names. A training run may rotate that
    step away while it is read: 'latest'/'best' are then resolved again, an explicit step is
    reported as removed (not as damaged)."""
    for _ in range(5):
        step = store.resolve(checkpoint)
        try:
            return step, read(step)
        except DamagedCheckpointError:
            store.reload()
            if step in store.all_steps():
                raise  # still there: really damaged
            if checkpoint not in ("latest", "best"):
                raise CheckpointError(
                    f"checkpoint step {step} was removed from {str(store.directory)!r} while it "
                    "was being read (a training run keeping only its latest checkpoints?); "
                    f"available now: {store.all_steps()}"
                ) from None
    raise CheckpointError(
        f"the checkpoints in {str(store.directory)!r} kept being replaced while being read; "
        "try again, or name a step that the training run keeps"
    )


def load(workdir: str | Path, checkpoint: str | int = "latest") -> tuple[Any, dict, Any]:
    """(model, variables, config) of a trained run, for inference or reuse.

    checkpoint: 'latest', 'best' (by `checkpoint.best_metric`) or a step. The model is the
    config's, in float32 with the default (XLA) layers; variables {'params'[, 'batch_stats']}
    are float32 on the default device: `model.apply(variables, x, train=False)`. Needs neither
    the dataset nor an optimizer.
    """
    workdir = Path(workdir)
    config = read_config(workdir)
    store = _open_store(workdir, config)

    def read(step):
        meta = store.read_meta(step)
        model = build_model(config, int(meta["num_classes"]), half_precision=False)
        return model, _restore_variables(store, step, model, meta["image_shape"])

    try:
        _, (model, variables) = _read_resolved(store, checkpoint, read)
    finally:
        store.close()
    return model, variables, config


def evaluate(workdir: str | Path, checkpoint: str | int = "latest", config=None) -> dict:
    """Evaluates a checkpoint of `workdir` on its eval split: loss, accuracy, top5_accuracy,
    count, step. `config` None uses the run's own; pass one to change e.g. the eval batch size."""
    from cnn_jax import parallel
    from cnn_jax.train.feeders import make_feeder
    from cnn_jax.train.loop import compile_for, evaluate_variables

    workdir = Path(workdir)
    config = config_lib.validate_config(read_config(workdir) if config is None else config)
    parallel.initialize_distributed()
    store = _open_store(workdir, config)
    try:
        store.resolve(checkpoint)  # no such checkpoint: say so before loading any data
        devices = jax.devices()
        feeder = make_feeder(config, len(devices), eval_only=True)
        model = build_model(config, feeder.num_classes, fast_paths=fast_paths_wanted(config))
        step, variables = _read_resolved(
            store,
            checkpoint,
            lambda step: _restore_variables(store, step, model, feeder.image_shape),
        )
    finally:
        store.close()
    compiled = compile_for(config, model, None, feeder, devices)
    placed = compiled.replicate(variables)
    metrics = evaluate_variables(compiled, feeder, placed)
    metrics.pop("images_per_sec", None)
    return {**metrics, "step": step}
