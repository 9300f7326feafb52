"""The training engine: compiled data-parallel steps, Optax, Orbax checkpoints, the loop.

Public entry points (see CONTRACT/README): `train_and_evaluate`, `evaluate`, `load_trained`,
`export_npz`, `load_npz`, `Reporter`. Importing this package does not import TensorFlow.
"""

from cnn_jax.train.checkpoints import export_npz, load_npz
from cnn_jax.train.inference import evaluate, load_trained
from cnn_jax.train.loop import TrainingDivergedError, train_and_evaluate
from cnn_jax.train.reporting import Reporter

__all__ = [
    "Reporter",
    "TrainingDivergedError",
    "evaluate",
    "export_npz",
    "load_npz",
    "load_trained",
    "train_and_evaluate",
]
