"""Input-pipeline throughput alone (no model): images/s the feeders can deliver.

    .venv/bin/python benchmarks/input_pipeline.py [--batch-size 128] [--steps 200]

Two feeders, each for MNIST-shaped (28x28x1) and CIFAR-10-shaped (32x32x3) data:
- device: the whole split on the device as uint8 (random pixels, N = 10,000 and 60,000); each
  step gathers its batch by the order contract and runs `augment.preprocess` (CIFAR: crop 4 +
  flip) in one compiled call, as the train step will; the epoch's permutation is computed once
  per epoch (`order.batch_from_permutation`), or, for comparison, in every step
  (`order.batch_indices`).
- streaming: `streaming.train_batches` reading a tfds dataset from disk (PNG decode, shuffle,
  batch, prefetch on the host), then the host-to-device copy and the same compiled preprocess.
  The datasets are imported into a temporary data dir with `import_dataset`: MNIST from the
  real files when ../shared/data/mnist is there (10,000 images), CIFAR from random pixels
  (incompressible, so PNG decoding is a worst case).

Other benchmarks can call `measure_pipeline(...)` and put the train step's images/s beside it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from cnn_jax.data import augment, import_dataset, order, streaming
from cnn_jax.data.importers import IDX_FILES, read_idx

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
AUGMENT = {
    "mnist": {"crop_padding": 0, "flip": False},
    "cifar10": {"crop_padding": 4, "flip": True},
}


def _timed(run_step, steps: int, warmup: int, batch_size: int) -> dict:
    for _ in range(warmup):  # compile, fill prefetch buffers
        run_step().block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        out = run_step()
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return {"images_per_sec": steps * batch_size / seconds, "ms_per_batch": 1e3 * seconds / steps}


def measure_pipeline(
    feeder: str,
    dataset: str,
    *,
    batch_size: int = 128,
    steps: int = 200,
    warmup: int = 5,
    data_dir: str | None = None,
    num_examples: int = 10_000,
    per_step_permutation: bool = False,
) -> dict:
    """images/s of one feeder ('device' | 'streaming') for 'mnist'- or 'cifar10'-shaped data,
    preprocessing (and CIFAR augmentation) included; returns images_per_sec and ms_per_batch.
    Device: `num_examples` resident images; `per_step_permutation` uses `order.batch_indices`
    (a sort of N keys per step) instead of one permutation per epoch. Streaming needs
    `data_dir` holding the tfds dataset `dataset` (see `prepare_data_dir`)."""
    shape, aug = SHAPES[dataset], AUGMENT[dataset]
    mean, std = (0.5,) * shape[-1], (0.25,) * shape[-1]
    aug_key, data_key = jax.random.split(jax.random.PRNGKey(0))
    preprocess = functools.partial(augment.preprocess, train=True, mean=mean, std=std, **aug)

    if feeder == "device":
        rng = np.random.default_rng(0)
        images = jax.device_put(rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8))
        spe = order.steps_per_epoch(num_examples, batch_size)
        permutation = jax.jit(functools.partial(order.epoch_permutation, num_examples=num_examples))

        @jax.jit
        def step_fn(images, perm, step):
            if per_step_permutation:  # the permutation re-sorted inside every step
                idx = order.batch_indices(
                    data_key, step, num_examples=num_examples, batch_size=batch_size
                )
            else:  # the permutation computed once per epoch, sliced in the step
                idx = order.batch_from_permutation(perm, step, batch_size=batch_size)
            return preprocess(images[idx], jax.random.fold_in(aug_key, step))

        state = {"step": 0, "epoch": -1, "perm": None}

        def run_step():
            step = state["step"]
            if not per_step_permutation and step // spe != state["epoch"]:
                state["epoch"] = step // spe
                state["perm"] = permutation(data_key, state["epoch"])
            state["step"] += 1
            return step_fn(images, state["perm"], step)

        return _timed(run_step, steps, warmup, batch_size)

    if feeder == "streaming":
        batches = streaming.train_batches(dataset, batch_size=batch_size, seed=0, data_dir=data_dir)
        step_fn = jax.jit(preprocess)
        counter = itertools.count()

        def run_step():
            batch = next(batches)
            return step_fn(
                jax.device_put(batch["image"]), jax.random.fold_in(aug_key, next(counter))
            )

        return _timed(run_step, steps, warmup, batch_size)
    raise ValueError(f"feeder={feeder!r}: expected 'device' or 'streaming'")


def prepare_data_dir(root: Path, num_examples: int = 10_000) -> tuple[str, dict]:
    """Imports MNIST- and CIFAR-10-shaped tfds datasets into root/data; returns (dir, sources)."""
    rng = np.random.default_rng(0)
    mnist_src = root / "mnist"
    mnist_src.mkdir()
    real = all((SHARED_MNIST / f"{s}.gz").is_file() for pair in IDX_FILES.values() for s in pair)
    for split, (image_stem, label_stem) in IDX_FILES.items():
        n = num_examples if split == "train" else 100
        if real:
            images = read_idx(SHARED_MNIST / f"{image_stem}.gz", 3)[:n]
            labels = read_idx(SHARED_MNIST / f"{label_stem}.gz", 1)[:n]
        else:
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, n, dtype=np.uint8)
        for stem, array, magic in ((image_stem, images, 0x0803), (label_stem, labels, 0x0801)):
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (mnist_src / stem).write_bytes(header + array.tobytes())
    cifar_src = root / "cifar-10-batches-py"
    cifar_src.mkdir()
    names = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (cifar_src / "batches.meta").write_bytes(pickle.dumps(names))
    per_file = num_examples // 5
    for basename, n in [(f"data_batch_{i}", per_file) for i in range(1, 6)] + [("test_batch", 100)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}  # fmt: skip
        (cifar_src / basename).write_bytes(pickle.dumps(batch))
    data_dir = root / "data"
    import_dataset("mnist", mnist_src, data_dir)
    import_dataset("cifar10", cifar_src, data_dir)
    return str(data_dir), {"mnist": "real MNIST" if real else "random", "cifar10": "random"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--num-examples", type=int, default=10_000)
    parser.add_argument(
        "--train-steps", type=int, default=20,
        help="steps per timed window of the train-step comparison (0 skips it)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, sources = prepare_data_dir(Path(tmp), args.num_examples)
        for dataset in ("mnist", "cifar10"):
            for feeder, n, per_step in (
                ("device", 10_000, False),
                ("device", 60_000, False),
                ("device", 60_000, True),
                ("streaming", args.num_examples, False),
            ):
                result = measure_pipeline(
                    feeder, dataset, batch_size=args.batch_size, steps=args.steps,
                    data_dir=data_dir, num_examples=n, per_step_permutation=per_step,
                )  # fmt: skip
                if feeder == "device":
                    what = f"N={n:,}, perm per {'step' if per_step else 'epoch'}"
                else:
                    what = f"N={n:,} tfds PNGs, {sources[dataset]}"
                rows.append((feeder, dataset, "x".join(map(str, SHAPES[dataset])), what,
                             result["images_per_sec"], result["ms_per_batch"]))  # fmt: skip
    print(f"input pipeline alone, batch {args.batch_size}, {args.steps} steps, "
          f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores")  # fmt: skip
    header = ("feeder", "data", "shape", "source", "images/s", "ms/batch")
    print("{:<10} {:<8} {:<8} {:<34} {:>10} {:>9}".format(*header))
    for feeder, dataset, shape, what, ips, ms in rows:
        print(f"{feeder:<10} {dataset:<8} {shape:<8} {what:<34} {ips:>10,.0f} {ms:>9.2f}")
    if args.train_steps:
        print_train_steps(args.batch_size, args.train_steps)


# The models the pipeline feeds for each data shape (the train step's side of the comparison).
TRAIN_MODELS = {"mnist": ["lenet5"], "cifar10": ["simple_convnet"]}


def print_train_steps(batch_size: int, steps: int) -> None:
    """The engine's train-step images/s for the same batch size and data shapes."""
    from cnn_jax.bench import run_benchmark

    print(f"\ntrain step alone (cnn_jax.bench.run_benchmark), batch {batch_size}, synthetic data")
    print("{:<8} {:<8} {:<16} {:>10}".format("data", "shape", "model", "images/s"))
    for dataset, models in TRAIN_MODELS.items():
        shape = tuple(SHAPES[dataset])
        for model in models:
            result = run_benchmark(model, batch_size, steps, input_shape=shape, num_classes=10)
            print(f"{dataset:<8} {'x'.join(map(str, shape)):<8} {model:<16} "
                  f"{result['images_per_sec']:>10,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
