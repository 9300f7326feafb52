"""The training engine: compiled data-parallel steps, Optax, Orbax checkpoints, the loop.

  state.py        TrainState and its (abstract) init
  steps.py        make_train_step / make_eval_step: pure, no devices (jax, flax, optax only)
  optimizers.py   Optax optimizers and schedules from the config
  compile.py      the steps compiled with jit over a mesh, or pmap
  feeders.py      the dataset as the loop sees it: device-resident or streaming, one interface
  checkpoints.py  Orbax: variables and optimizer state as separate items; damage fallback
  loop.py         train_and_evaluate(config, workdir), top to bottom
  restore.py      load(workdir) -> (model, variables, config); evaluate; build_model

Names below are imported on first use, so `cnn_jax.train.steps` needs neither TensorFlow nor
Orbax.
"""

import importlib

_EXPORTS = {
    "train_and_evaluate": "loop",
    "TrainingDivergedError": "loop",
    "evaluate": "restore",
    "load": "restore",
    "build_model": "restore",
    "export_npz": "checkpoints",
    "load_npz": "checkpoints",
    "Reporter": "reporting",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cnn_jax.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cnn_jax.train' has no attribute {name!r}")


__all__ = list(_EXPORTS)
