"""cnn_jax: convolutional neural networks in JAX/Flax.

The modules (`cnn_jax.ops`, `filters`, `layers`, `models`, `train.steps`, `train.state`) need only
jax, flax, optax and numpy; the engine, data pipelines and pictures need the `full` extra.
`cnn_jax.load(workdir)` gives a trained run's (model, variables, config).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load":  # imported on first use: it needs Orbax (the `full` extra)
        from cnn_jax.train.restore import load

        return load
    raise AttributeError(f"module 'cnn_jax' has no attribute {name!r}")


__all__ = ["load"]
