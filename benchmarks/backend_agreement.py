"""How far apart the jit and pmap back ends end up on the same devices, and why.

    python benchmarks/backend_agreement.py [--experiment lenet5_digits] [--steps 44]

First the gradient of the first step under each back end, from the same initial state and
batch (read out through one plain SGD step: g = (params before - after) / learning rate),
and their largest difference relative to the largest gradient entry; then the experiment
trained for `--steps` with each back end, and both test accuracies. Both back ends see the
same batches and augmentation, so first-step gradients equal to float32 rounding (~1e-7) say
the programs compute the same function; whatever differs later is that rounding amplified by
training. `--fast-paths off` removes the one difference in the programs themselves (jit
compiles with the CPU fast-path compiler options, which pmap cannot take).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np

from cnn_jax.config import apply_overrides, load_config
from cnn_jax.train import optimizers, train_and_evaluate
from cnn_jax.train.feeders import make_feeder
from cnn_jax.train.loop import RunKeys, compile_for, run_steps
from cnn_jax.train.restore import build_model, fast_paths_wanted


def first_step_gradient(config) -> list[np.ndarray]:
    """The gradient of step 0 of `config`'s run, through the engine's compiled step."""
    config = apply_overrides(
        config, ["optimizer.name=sgd", "optimizer.momentum=0", "optimizer.schedule=constant"]
    )
    devices = jax.devices()
    feeder = make_feeder(config, len(devices))
    model = build_model(config, feeder.num_classes, fast_paths=fast_paths_wanted(config))
    tx = optimizers.make_optimizer(config, feeder.steps_per_epoch, 1)
    compiled = compile_for(config, model, tx, feeder, devices)
    state = compiled.init_state(feeder.image_shape, RunKeys.from_seed(int(config.seed)).init)
    before = [np.asarray(x) for x in jax.tree.leaves(compiled.host(state).params)]
    batches = feeder.train_batches(compiled, 0)
    state, _ = run_steps(compiled, state, compiled.zero_sums(), batches, 1, 1)
    after = [np.asarray(x) for x in jax.tree.leaves(compiled.host(state).params)]
    lr = float(config.optimizer.learning_rate)
    return [(b - a) / lr for b, a in zip(before, after)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="lenet5_digits")
    p.add_argument("--steps", type=int, default=44)
    p.add_argument("--fast-paths", choices=("auto", "on", "off"), default="auto")
    args = p.parse_args()
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), JAX {jax.__version__}")
    configs = {
        backend: apply_overrides(
            load_config(args.experiment),
            [f"train.backend={backend}", f"model.fast_paths={args.fast_paths}"],
        )
        for backend in ("jit", "pmap")
    }
    grads = {backend: first_step_gradient(config) for backend, config in configs.items()}
    scale = max(float(np.abs(g).max()) for g in grads["jit"])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(grads["jit"], grads["pmap"]))
    print(f"first-step gradients: max |jit - pmap| = {diff:.3g}, {diff / scale:.3g} of the "
          f"largest entry (float32 eps {np.finfo(np.float32).eps:.3g})")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for backend, config in configs.items():
            r = train_and_evaluate(config, Path(tmp) / backend, max_steps=args.steps)
            print(
                f"after {r['steps']} steps ({r['epochs']:.2f} epochs), {backend}: test accuracy "
                f"{100 * r['final_test_accuracy']:.2f}%, loss {r['final_test_loss']:.4f}"
            )


if __name__ == "__main__":
    main()
