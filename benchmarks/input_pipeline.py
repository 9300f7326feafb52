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

    .venv/bin/python benchmarks/input_pipeline.py --jpeg [--num-images 2000] [--threads N]

ImageNet-scale streaming (`--jpeg`, see `run_jpeg`): ImageNet-like JPEGs (about 500x375, quality
90, photo-like content of ~100 KB) generated locally and imported as an image folder
(`cnn-jax data import`), then, with the same tf.data thread pool throughout:
- the decode limit: `tf.io.decode_jpeg` alone on the same records;
- the training pipeline (`streaming.train_batches`: shuffle, fused decode-and-crop, resize to
  224, batch), also with the crop after a full decode, and with flip + normalisation on the host;
- no input stall: the engine's real step (`loop.run_steps`, an MLP whose step is made slower than
  the pipeline by a sleep inside the compiled step, standing for a GPU's compute that leaves the
  host free) fed by the streaming feeder vs the same step on device-resident data, in timed
  windows that each end with a wait for the devices as the training loop's log points do.
Writes benchmarks/results/input_pipeline_jpeg.json and its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import pickle
import statistics
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
    parser.add_argument("--jpeg", action="store_true", help="the ImageNet-scale JPEG benchmark")
    parser.add_argument("--num-images", type=int, default=2000, help="--jpeg: JPEGs to generate")
    parser.add_argument("--threads", type=int, help="--jpeg: tf.data threads (default: the host's)")
    parser.add_argument("--rounds", type=int, default=3, help="--jpeg: alternating repetitions")
    parser.add_argument("--stall-windows", type=int, default=3, help="--jpeg: windows per feeder")
    parser.add_argument("--data-dir", help="--jpeg: keep the generated dataset here (reused)")
    parser.add_argument("--no-markdown", action="store_true", help="--jpeg: leave RESULTS.md")
    args = parser.parse_args()
    if args.jpeg:
        run_jpeg(args)
        return
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


# ----------------------------------------------------------------------------------------------
# ImageNet-scale streaming: --jpeg
# ----------------------------------------------------------------------------------------------

JPEG_DATASET = "imagenet_like"
JPEG_SIZE = 224  # the crop size the model sees
LIMIT = "decode_jpeg alone (the limit)"
PIPELINE = "training pipeline (`streaming.train_batches`)"


def _photo_like_jpeg(job: tuple[int, int]) -> bytes:
    """One ImageNet-like JPEG (quality 90): a smooth colour field, a few flat shapes, a texture at
    half resolution and sensor noise, about 500x375 (shorter side 330..420): ~100 KB, as
    ImageNet's photos (random pixels would be far larger and slower to decode)."""
    import io

    from PIL import Image, ImageDraw

    seed, quality = job
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(330, 421)), int(rng.integers(440, 561))
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    pixels = np.asarray(base, np.float32)
    texture = rng.integers(0, 256, (h // 2, w // 2), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((w, h), Image.BILINEAR), np.float32)
    pixels += (texture[..., None] - 128) * 0.6 + rng.normal(0, 12, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_jpeg_folder(root: Path, num_images: int, *, classes: int = 10, num_val: int = 100,
                     quality: int = 90, workers: int = 1) -> dict:
    """ROOT/train/cNN/*.jpg (num_images) and ROOT/validation/cNN/*.jpg; returns size stats."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [("train", i) for i in range(num_images)] + [("validation", i) for i in range(num_val)]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        files = list(pool.map(_photo_like_jpeg, [(k, quality) for k in range(len(jobs))],
                              chunksize=16))  # fmt: skip
    for (split, i), data in zip(jobs, files):
        folder = root / split / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(data)
    sizes = [len(f) for f in files[:num_images]]
    return {"num_images": num_images, "mean_kb": float(np.mean(sizes)) / 1024,
            "total_mb": float(np.sum(sizes)) / 2**20, "quality": quality}  # fmt: skip


def prepare_jpeg_dataset(data_dir: Path, num_images: int, workers: int) -> dict:
    """The generated folder imported as `imagenet_like` into data_dir (reused when there)."""
    stats_file = data_dir / "imagenet_like_source.json"
    if (data_dir / JPEG_DATASET).is_dir() and stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        if stats["num_images"] == num_images:
            return stats
    source = data_dir / "imagenet_like_source"
    t0 = time.perf_counter()
    stats = make_jpeg_folder(source, num_images, workers=workers)
    stats["generate_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    import_dataset(JPEG_DATASET, source, data_dir, overwrite=True)
    stats["import_seconds"] = time.perf_counter() - t0
    stats_file.write_text(json.dumps(stats))
    return stats


def _records(data_dir: str):
    """The train split's encoded records, read as the streaming feeder reads them."""
    from cnn_jax.data import _tf
    from cnn_jax.data.loading import open_builder
    from cnn_jax.data.registry import get_dataset_info

    info = get_dataset_info(JPEG_DATASET, data_dir=data_dir)
    builder = open_builder(info, data_dir)
    tfds = _tf.tfds()
    return builder.as_dataset(
        split=info.train_split, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False),
    )  # fmt: skip


def _rate(batches, batch_size: int, warmup: int, count: int) -> dict:
    """images/s over `count` batches of an iterator, after `warmup` batches."""
    iterator = iter(batches)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(iterator)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    # Per CPU-second: images over the CPU time this process spent (all its threads), which
    # other processes on a shared machine do not inflate the way they do wall time.
    return {"images_per_sec": count * batch_size / seconds,
            "images_per_cpu_second": count * batch_size / cpu, "warmup_seconds": start - t0}


def decode_limit(data_dir: str, *, batch_size: int, warmup: int, count: int, threads: int):
    """`tf.io.decode_jpeg` alone over the same records with the same thread pool: the most a
    pipeline that decodes every image can deliver."""
    from cnn_jax.data import _tf

    tf = _tf.tf()
    ds = _records(data_dir).repeat()
    ds = ds.map(lambda ex: tf.shape(tf.io.decode_jpeg(ex["image"], channels=3)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)  # fmt: skip
    ds = ds.batch(batch_size).prefetch(4).with_options(streaming.pipeline_options(threads))
    return _rate(ds.as_numpy_iterator(), batch_size, warmup, count)


def pipeline_rate(data_dir: str, *, batch_size: int, warmup: int, count: int, threads: int,
                  fused: bool = True):  # fmt: skip
    """The training pipeline (`streaming.train_batches`) within its first epoch."""
    batches = streaming.train_batches(
        JPEG_DATASET, batch_size=batch_size, seed=0, data_dir=data_dir, image_size=JPEG_SIZE,
        threads=threads, fused_jpeg_crop=fused,
    )  # fmt: skip
    return _rate(batches, batch_size, warmup, count)


def crop_variant_rate(data_dir: str, *, batch_size: int, warmup: int, count: int, threads: int,
                      antialias: bool = False, host_augment: bool = False):  # fmt: skip
    """The pipeline's per-image work (fused decode-and-crop, resize) as a plain tf.data pipeline
    over the records, optionally with an antialiased resize, or with a random flip and float32
    normalisation added on the host."""
    from cnn_jax.data import _tf

    tf = _tf.tf()
    mean = tf.constant([0.485, 0.456, 0.406]) * 255
    std = tf.constant([0.229, 0.224, 0.225]) * 255

    def decode(encoded):
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    def transform(i, ex):
        seed = tf.stack([tf.constant(0, tf.int64), i])
        crop = streaming.decode_random_crop(ex["image"], seed, channels=3, decode=decode)
        image = streaming._resize(crop, (JPEG_SIZE, JPEG_SIZE), antialias=antialias)
        if host_augment:
            image = tf.image.stateless_random_flip_left_right(image, seed)
            image = (tf.cast(image, tf.float32) - mean) / std
        return image

    ds = _records(data_dir).repeat().enumerate()
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(4).with_options(streaming.pipeline_options(threads))
    return _rate(ds.as_numpy_iterator(), batch_size, warmup, count)


def device_augment_seconds(batch_size: int, repeats: int = 5) -> float:
    """Seconds per batch of the compiled flip + normalisation (`augment.preprocess`) of uint8
    224x224x3 images on this process's first device."""
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (batch_size, JPEG_SIZE, JPEG_SIZE, 3), np.uint8)
    )
    fn = jax.jit(functools.partial(augment.preprocess, train=True, mean=(0.5,) * 3,
                                   std=(0.25,) * 3, flip=True))  # fmt: skip
    key = jax.random.PRNGKey(0)
    fn(images, key).block_until_ready()
    start = time.perf_counter()
    for i in range(repeats):
        out = fn(images, jax.random.fold_in(key, i))
    out.block_until_ready()
    return (time.perf_counter() - start) / repeats


STALL_STRIDE = 16  # the delayed step's model sees every 16th pixel: 14x14x3 of 224x224x3


def _delayed_preprocess(seconds: float):
    """A light stand-in for the step's preprocessing (every 16th pixel, scaled to [0, 1]) and, in
    training, a host callback that sleeps `seconds`: a step as long as an accelerator's compute
    that, like it, leaves the host's cores to the input pipeline. (This machine's device is its
    CPU: the real flip and normalisation of 224x224 images would compete with the decoder.)"""
    import jax.numpy as jnp

    def sleep(x):
        time.sleep(seconds)
        return np.zeros((), np.float32)

    def delayed(images, key, train, **kw):
        out = images[:, ::STALL_STRIDE, ::STALL_STRIDE, :].astype(jnp.float32) / 255.0
        if not train:
            return out
        token = jax.pure_callback(sleep, jax.ShapeDtypeStruct((), jnp.float32), out[0, 0, 0, 0])
        return out + token

    return delayed


class _DelayedEngine:
    """One feeder's engine: the real compiled step (`compile_for`) of a small MLP with the sleep
    above in its preprocessing, `run_steps` windows ended by a wait for the devices."""

    def __init__(self, config, feeder, devices):
        from cnn_jax.train import optimizers
        from cnn_jax.train.loop import RunKeys, compile_for, steps_per_call
        from cnn_jax.train.restore import build_model

        model = build_model(config, feeder.num_classes)
        tx = optimizers.make_optimizer(config, feeder.steps_per_epoch, 10**6)
        self.compiled = compile_for(config, model, tx, feeder, devices)
        self.group = steps_per_call(config, devices)
        self.state = self.compiled.init_state(feeder.image_shape, RunKeys.from_seed(0).init)
        self.batches = feeder.train_batches(self.compiled, 0)
        self.window(self.group)  # compiles; fills the pipeline

    def window(self, steps: int) -> float:
        from cnn_jax.train.loop import run_steps

        start = time.perf_counter()
        self.state, sums = run_steps(self.compiled, self.state, self.compiled.zero_sums(),
                                     self.batches, steps, self.group)  # fmt: skip
        jax.device_get(self.compiled.host(sums))  # waits, as the loop does at a log point
        return time.perf_counter() - start


def stall_check(data_dir: str, *, batch_size: int, step_seconds: float, window_steps: int,
                windows: int, threads: int) -> list[dict]:  # fmt: skip
    """Step time of the same delayed step fed by the streaming feeder and by device-resident
    data, windows alternating; one step per compiled call (CPU's default) and 16 (accelerators'),
    the latter with the read-ahead the feeder asks for (2 calls' worth, 34 batches) and with only
    4 batches (the tf.data prefetch the feeder had before)."""
    import dataclasses

    from cnn_jax.config import default_config
    from cnn_jax.train.feeders import ResidentFeeder, make_feeder

    devices = jax.devices()
    engines: dict[str, _DelayedEngine] = {}
    for group in (1, 16):
        config = default_config()
        config.dataset.name, config.dataset.data_dir = JPEG_DATASET, data_dir
        config.dataset.feeder = "streaming"
        config.model.name = "mlp"
        config.model.options.hidden_features = [8]
        config.train.batch_size = config.train.eval_batch_size = batch_size
        config.train.steps_per_call = group
        config.optimizer.schedule = "constant"
        feeder = make_feeder(config, len(devices))
        side = -(-feeder.image_shape[0] // STALL_STRIDE)
        feeder = dataclasses.replace(feeder, preprocess=_delayed_preprocess(step_seconds),
                                     image_shape=(side, side, 3))  # fmt: skip
        batch_shape = (JPEG_SIZE, JPEG_SIZE, 3)  # what the host sends
        n = batch_size * 4
        rng = np.random.default_rng(0)
        resident = ResidentFeeder(
            name="resident", kind="device", image_shape=feeder.image_shape,
            num_classes=feeder.num_classes, num_train=n, num_eval=0,
            preprocess=feeder.preprocess, batch_size=batch_size, eval_batch_size=batch_size,
            train_arrays=(rng.integers(0, 256, (n, *batch_shape), np.uint8),
                          rng.integers(0, feeder.num_classes, n, np.int32)),
            eval_arrays=(np.zeros((0, *batch_shape), np.uint8), np.zeros(0, np.int32)),
        )  # fmt: skip
        engines[f"resident, {group} step(s)/call"] = _DelayedEngine(config, resident, devices)
        engines[f"streaming, {group} step(s)/call"] = _DelayedEngine(config, feeder, devices)
        if group > 1:  # the previous fixed host prefetch, for comparison
            old = dataclasses.replace(feeder, open_train=lambda s: streaming.train_batches(
                JPEG_DATASET, batch_size=batch_size, seed=0, start_step=s, data_dir=data_dir,
                prefetch=4, threads=threads))  # fmt: skip
            engines[f"streaming, {group} steps/call, read-ahead of only 4 batches"] = _DelayedEngine(
                config, old, devices)  # fmt: skip
    times = {name: [] for name in engines}
    for _ in range(windows):
        for name, engine in engines.items():
            times[name].append(engine.window(window_steps) / window_steps)
    rows = []
    for name, ts in times.items():
        group = 16 if "16" in name else 1
        ref = statistics.median(times[f"resident, {group} step(s)/call"])
        rows.append({"feeder": name, "step_ms": 1e3 * statistics.median(ts),
                     "step_ms_windows": [1e3 * t for t in ts],
                     "vs_resident": statistics.median(ts) / ref})  # fmt: skip
    return rows


def run_jpeg(args) -> None:
    """The --jpeg benchmark: prints a table, writes JSON and the RESULTS.md section."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report

    threads = args.threads or streaming.host_threads()
    batch_size = 64
    meta = {"date": report.now(), "command": report.command_line(), "machine": report.machine(),
            "versions": report.versions(), "threads": threads}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="imagenet_like_") as tmp:
        data_dir = Path(args.data_dir or tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        source = prepare_jpeg_dataset(data_dir, args.num_images, threads)
        print(f"{source['num_images']} JPEGs, mean {source['mean_kb']:.0f} KB", flush=True)
        data_dir = str(data_dir)
        spe = args.num_images // batch_size
        warmup, count = 2, spe - 3  # inside the first epoch: steady state, no epoch restart
        kw = {"batch_size": batch_size, "warmup": warmup, "count": count, "threads": threads}
        variants = {
            LIMIT: lambda: decode_limit(data_dir, **kw),
            PIPELINE: lambda: pipeline_rate(data_dir, **kw),
            "pipeline (the same) with the crop after a full decode": lambda: pipeline_rate(
                data_dir, fused=False, **kw),
            "fused crop + resize alone": lambda: crop_variant_rate(data_dir, **kw),
            "fused crop + antialiased resize": lambda: crop_variant_rate(
                data_dir, antialias=True, **kw),
            "fused crop + resize + flip + normalise to float32 on the host": lambda: (
                crop_variant_rate(data_dir, host_augment=True, **kw)),
        }  # fmt: skip
        rates = {name: [] for name in variants}
        cpu_rates = {name: [] for name in variants}
        for r in range(args.rounds):  # alternating, so load changes hit all alike
            for name, measure in variants.items():
                m = measure()
                rates[name].append(m["images_per_sec"])
                cpu_rates[name].append(m["images_per_cpu_second"])
                print(f"round {r + 1}: {name}: {m['images_per_sec']:,.0f} images/s, "
                      f"{m['images_per_cpu_second']:,.0f} per CPU-second", flush=True)  # fmt: skip
        median = {name: statistics.median(v) for name, v in rates.items()}
        cpu_median = {name: statistics.median(v) for name, v in cpu_rates.items()}
        limit = median[LIMIT]
        device_s = device_augment_seconds(batch_size)
        pipeline = median[PIPELINE]
        # A step 3x slower than the pipeline alone (a margin for the shared machine's load).
        step_seconds = 3 * 32 / pipeline
        stall = stall_check(data_dir, batch_size=32, step_seconds=step_seconds, window_steps=48,
                            windows=args.stall_windows, threads=threads)  # fmt: skip
    meta["load_average_at_end"] = round(os.getloadavg()[0], 2)
    result = {"meta": meta, "source": source, "batch_size": batch_size, "images_timed": count * batch_size,
              "rates": rates, "median": median, "ratio_to_limit": {n: v / limit for n, v in median.items()},
              "per_core": {n: v / threads for n, v in median.items()},
              "cpu_rates": cpu_rates, "per_cpu_second": cpu_median,
              "cpu_ratio_to_limit": {n: v / cpu_median[LIMIT] for n, v in cpu_median.items()},
              "device_flip_normalise_ms_per_batch": 1e3 * device_s,
              "stall_step_seconds": step_seconds, "stall": stall}  # fmt: skip
    out = Path(__file__).resolve().parent / "results" / "input_pipeline_jpeg.json"
    report.write_json(out, result)
    table = jpeg_markdown(result)
    print("\n" + table)
    print(f"wrote {out}")
    if not args.no_markdown:
        report.replace_section("input_pipeline_jpeg", table)
        print(f"updated {report.RESULTS_MD}")


def jpeg_markdown(r: dict) -> str:
    import report

    meta = r["meta"]
    lines = ["### Streaming ImageNet-like JPEGs: pipeline vs decode limit, input stalls", "",
             *report.header_lines(meta),
             (f"- Data: {r['source']['num_images']:,} generated JPEGs, ~500x375, quality 90, mean "
             f"{r['source']['mean_kb']:.0f} KB, imported as an image folder; tf.data private pool "
             f"of {meta['threads']} threads; batch {r['batch_size']}, {r['images_timed']:,} images "
             "timed inside the first epoch after 2 warm-up batches; median of "
             f"{len(next(iter(r['rates'].values())))} alternating rounds"), "",
             "| what (same records, same threads) | images/s | per core (images/s / threads) | "
             "vs decode_jpeg alone | images per CPU-second | vs decode_jpeg alone |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, ips in r["median"].items():
        lines.append(f"| {name} | {ips:,.0f} | {r['per_core'][name]:,.0f} | "
                     f"{r['ratio_to_limit'][name]:.2f} | {r['per_cpu_second'][name]:,.0f} | "
                     f"{r['cpu_ratio_to_limit'][name]:.2f} |")  # fmt: skip
    lines += ["", ("Images per CPU-second: images over the CPU time the process spent (all its "
              "threads); unlike wall time it is not inflated by other processes on a shared "
              "machine.")]  # fmt: skip
    lines += ["", (f"Flip + normalisation inside the compiled step instead: "
              f"{r['device_flip_normalise_ms_per_batch']:.1f} ms per batch of {r['batch_size']} on "
              "this machine's CPU device (an accelerator's is far smaller), and the batch travels "
              "as uint8 (150 KB per image) rather than float32 (602 KB)."), "",
              (f"No input stall: the engine's real step (`compile_for`, `run_steps`; batch 32 "
              "of 224x224x3 uint8, an MLP on every 16th pixel) with a "
              f"{1e3 * r['stall_step_seconds']:.0f} ms sleep inside the compiled step, i.e. a "
              "step 3x longer than the pipeline's time per batch that leaves the host's cores "
              "free as an accelerator's would; windows of 48 steps, each ended by a wait for the "
              "device as at the loop's log points; the feeders' windows alternate:"), "",
              "| feeder | step ms (median) | windows | vs device-resident |",
              "|---|---:|---|---:|"]  # fmt: skip
    for row in r["stall"]:
        windows = ", ".join(f"{t:.0f}" for t in row["step_ms_windows"])
        lines.append(f"| {row['feeder']} | {row['step_ms']:.1f} | {windows} | "
                     f"{row['vs_resident']:.3f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
