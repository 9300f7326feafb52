"""Using a trained run: `evaluate` a checkpoint, `load_trained` for inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from cnn_jax import config as config_lib
from cnn_jax import parallel
from cnn_jax.errors import CheckpointError
from cnn_jax.train import optimizers
from cnn_jax.train.checkpoints import CheckpointStore
from cnn_jax.train.run import Run, build_model
from cnn_jax.train.state import abstract_train_state


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
        run = Run(config, workdir, store=store, schedule=schedule)
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
    config = config_lib.config_from_json(json.dumps(meta["config"]))
    model = build_model(config, int(meta["num_classes"]), half_precision=False)
    tx = optimizers.make_optimizer(
        config, int(meta["data_position"]["steps_per_epoch"]), int(meta["total_steps"])
    )
    target = abstract_train_state(model, tx, tuple(meta["image_shape"]))
    state, _ = store.restore(step, target)
    store.close()
    return config, model, state.variables()
