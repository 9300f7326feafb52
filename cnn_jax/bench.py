"""Training-throughput benchmark of the project's real train step (`cnn-jax bench MODEL`).

`run_benchmark` builds the model and optimizer the way `cnn_jax.train` does (the CPU fast
implementations of `cnn_jax.fast_paths` on CPU unless `fast_paths=False`), places a synthetic
uint8 training split on the device(s) and runs the engine's own steps on it (`loop.run_steps`
over a `ResidentFeeder`: batch gather by the data-order contract, on-device normalisation,
forward, backward, Optax update), so the figure is what training gets, minus evaluation and
checkpoints.

Timing: one call of one step first (compilation + that step), then one warm-up epoch, then
`windows` timed epochs of `steps` steps each, every one ended by `jax.block_until_ready` on the
state; images/s is `steps * batch_size` over the median window. The library never prints: the CLI
(`cnn-jax bench ... --json`) and `benchmarks/train_throughput.py` report the dict.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.errors import ConfigError

# The benchmarked configurations: input shape (H, W, C), classes and model options as the
# experiments train them (experiments/lenet5_mnist.py, simple_convnet_cifar4.py, vgg16_cifar10.py,
# resnet18_cifar10.py, resnet50_imagenet.py). Other registered models run at 32x32x3, 10 classes.
BENCH_MODELS: dict[str, dict[str, Any]] = {
    "lenet5": {"input_shape": (28, 28, 1), "num_classes": 10, "options": {}},
    "simple_convnet": {"input_shape": (32, 32, 3), "num_classes": 4, "options": {}},
    "vgg16": {"input_shape": (32, 32, 3), "num_classes": 10, "options": {}},
    "vgg16_bn": {"input_shape": (32, 32, 3), "num_classes": 10, "options": {}},
    "resnet18": {"input_shape": (32, 32, 3), "num_classes": 10, "options": {"cifar_stem": True}},
    "resnet50": {"input_shape": (224, 224, 3), "num_classes": 1000, "options": {}},
}
DEFAULT_SPEC: dict[str, Any] = {"input_shape": (32, 32, 3), "num_classes": 10, "options": {}}

# Dense bf16 peak FLOP/s per device (vendor data sheets), matched by substring of `device_kind`,
# most specific first. Used for model FLOPs utilisation on accelerators only.
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)

RESULT_KEYS = (
    "model",
    "batch_size",
    "steps",
    "images_per_sec",
    "compile_seconds",
    "device",
    "platform",
    "num_devices",
    "backend",
    "dtype",
    "compiled_loop",
    "input_shape",
    "num_classes",
    "num_params",
    "step_seconds_median",
    "window_images_per_sec",
    "flops_per_step",
    "achieved_flops_per_sec",
    "peak_flops_per_sec",
    "mfu",
    "mfu_note",
    "peak_memory_bytes",
    "peak_memory_source",
    "jax_version",
    "host",
    "xla_flags",
    "fast_paths",
)


def bench_spec(model_name: str) -> dict[str, Any]:
    """Input shape, classes and options the benchmark uses for `model_name`."""
    return BENCH_MODELS.get(model_name, DEFAULT_SPEC)


def peak_bf16_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of an accelerator, or None (CPU, or a device not in the table)."""
    if device.platform == "cpu":
        return None
    kind = str(getattr(device, "device_kind", ""))
    for key, flops in BF16_PEAK_FLOPS:
        if key.lower() in kind.lower():
            return flops
    return None


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not valid; expected an integer >= 1")


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # Linux reports KiB


def _step_flops(model, tx, state, batch_size: int, input_shape, device) -> float | None:
    """FLOPs of one train step from XLA's cost analysis (compiled on accelerators, where MFU needs
    the optimised program; the unoptimised HLO on CPU, which costs no extra compilation)."""
    from cnn_jax.train import steps as steps_lib

    step = steps_lib.make_train_step(model, tx)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    try:
        lowered = jax.jit(step).lower(abstract_state, batch)
        analysis = (
            lowered.compile().cost_analysis()
            if device.platform != "cpu"
            else lowered.cost_analysis()
        )
    except Exception:  # noqa: BLE001 -- best effort: some back ends lack a cost analysis
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


class TrainBenchmark:
    """A prepared benchmark: model, optimizer, state and resident data, compiled and warmed up.

    `run_window()` trains one timed window (one synthetic epoch of `steps` steps) and returns its
    wall time; `result(window_seconds)` summarises windows into the documented dict. Splitting the
    two lets `benchmarks/train_throughput.py` alternate JAX and PyTorch windows in one process.
    Arguments as `run_benchmark`.
    """

    def __init__(
        self,
        model_name: str,
        batch_size: int = 128,
        steps: int = 50,
        *,
        input_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        dtype: str = "float32",
        backend: str = "jit",
        steps_per_call: int = 0,
        options: dict[str, Any] | None = None,
        seed: int = 0,
        fast_paths: bool | None = None,
    ):
        from cnn_jax.config import default_config
        from cnn_jax.data import augment
        from cnn_jax.models import available
        from cnn_jax.models.summary import count_params
        from cnn_jax.train import optimizers
        from cnn_jax.train.compile import BACKENDS
        from cnn_jax.train.feeders import ResidentFeeder, check_batch_memory, check_batch_sizes
        from cnn_jax.train.loop import compile_for
        from cnn_jax.train.loop import steps_per_call as default_group
        from cnn_jax.train.restore import build_model, fast_paths_wanted
        from cnn_jax.train.state import abstract_train_state

        if model_name not in available():
            raise ConfigError(
                f"unknown model {model_name!r}; available models: {', '.join(available())}"
            )
        for name, value in (("batch_size", batch_size), ("steps", steps)):
            _check_positive(name, value)
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={dtype!r} is not valid; expected 'float32' or 'bfloat16'")
        if backend not in BACKENDS:
            raise ConfigError(
                f"backend={backend!r} is not valid; expected one of {sorted(BACKENDS)}"
            )
        if (
            isinstance(steps_per_call, bool)
            or not isinstance(steps_per_call, int)
            or steps_per_call < 0
        ):
            raise ConfigError(
                f"steps_per_call={steps_per_call!r} is not valid; expected an integer >= 0"
            )
        spec = bench_spec(model_name)
        input_shape = tuple(input_shape or spec["input_shape"])
        if len(input_shape) != 3 or not all(isinstance(s, int) and s > 0 for s in input_shape):
            raise ConfigError(
                f"input_shape={input_shape!r} is not valid; expected (H, W, C) positive integers"
            )
        check_batch_memory("batch_size", batch_size, input_shape)
        check_batch_memory(
            "batch_size x steps", batch_size * steps, input_shape, what="synthetic dataset",
            dtype="uint8",
        )  # fmt: skip
        devices = jax.devices()
        self.model_name, self.batch_size, self.steps = model_name, batch_size, steps
        self.input_shape, self.dtype, self.backend = input_shape, dtype, backend
        self.num_classes = int(num_classes or spec["num_classes"])
        self.devices = devices
        self._rss_before = _current_rss_bytes()

        config = default_config()
        config.seed = seed
        config.model.name = model_name
        for key, value in {**spec["options"], **(options or {})}.items():
            config.model.options[key] = value
        config.model.fast_paths = {None: "auto", True: "on", False: "off"}[fast_paths]
        config.train.batch_size = config.train.eval_batch_size = batch_size
        config.train.backend = backend
        config.train.half_precision = dtype == "bfloat16"
        config.train.steps_per_call = steps_per_call
        config.optimizer.name = "adam"  # the same update rule as the PyTorch twin in benchmarks/
        config.optimizer.schedule = "constant"
        check_batch_sizes(config, len(devices))
        self.fast_paths = fast_paths_wanted(config, devices)
        self.model = build_model(config, self.num_classes, fast_paths=self.fast_paths)
        self.tx = optimizers.make_optimizer(config, steps, 1_000_000)
        channels = input_shape[-1]
        mean, std = (0.5,) * channels, (0.25,) * channels

        def preprocess(images_u8, key, train, part=None):
            return augment.preprocess(images_u8, key, train=train, mean=mean, std=std, part=part)

        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (steps * batch_size, *input_shape), dtype=np.uint8)
        labels = rng.integers(0, self.num_classes, (steps * batch_size,), dtype=np.int32)
        feeder = ResidentFeeder(
            name="synthetic",
            kind="device",
            image_shape=input_shape,
            num_classes=self.num_classes,
            num_train=len(labels),
            num_eval=0,
            preprocess=preprocess,
            batch_size=batch_size,
            eval_batch_size=batch_size,
            train_arrays=(images, labels),
            eval_arrays=(images[:0], labels[:0]),
        )
        self.engine = compile_for(config, self.model, self.tx, feeder, devices)
        self.group = default_group(config, devices)
        self.compiled_loop = self.group > 1
        self.num_params = count_params(
            abstract_train_state(self.model, self.tx, input_shape).params
        )
        state = self.engine.init_state(input_shape, jax.random.PRNGKey(seed))
        self.batches = feeder.train_batches(self.engine, 0)
        del images, labels

        t0 = time.perf_counter()
        state, sums = self._run(state, 1)  # compiles
        self.first_call_seconds = time.perf_counter() - t0
        if steps > 1:  # warm-up: the rest of epoch 0
            state, sums = self._run(state, steps - 1)
        self.state, self.sums = state, sums

    def _run(self, state, num_steps: int):
        from cnn_jax.train.loop import run_steps

        state, sums = run_steps(
            self.engine, state, self.engine.zero_sums(), self.batches, num_steps, self.group
        )
        return jax.block_until_ready((state, sums))

    def run_window(self) -> float:
        """Trains one epoch of `steps` steps; returns its wall time in seconds (device-synced)."""
        t0 = time.perf_counter()
        self.state, self.sums = self._run(self.state, self.steps)
        return time.perf_counter() - t0

    def result(self, window_seconds: list[float]) -> dict[str, Any]:
        """The documented result dict (see `RESULT_KEYS`) for these timed windows."""
        if not window_seconds:
            raise ConfigError("window_seconds is empty; run at least one window")
        loss = float(jax.device_get(self.engine.host(self.sums)["loss"])) / self.steps
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.model_name}: the benchmark's training loss is {loss}")
        steps, batch_size, devices = self.steps, self.batch_size, self.devices
        median_window = statistics.median(window_seconds)
        step_seconds = median_window / steps
        device = devices[0]
        flops = _step_flops(
            self.model, self.tx, self.engine.host(self.state), batch_size, self.input_shape, device
        )
        achieved = flops / step_seconds if flops else None
        peak = peak_bf16_flops(device)
        if device.platform == "cpu":
            mfu, mfu_note = None, "not computed on CPU (MFU is against accelerator bf16 peaks)"
        elif peak is None:
            mfu, mfu_note = None, f"no bf16 peak known for device kind {device.device_kind!r}"
        elif achieved is None:
            mfu, mfu_note = None, "XLA cost analysis gave no FLOP count"
        else:
            mfu = achieved / (peak * len(devices))
            mfu_note = (
                f"achieved FLOP/s over {len(devices)} x {peak / 1e12:.1f} TFLOP/s dense bf16 peak"
            )
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peak_memory = int(stats["peak_bytes_in_use"])
            memory_source = "device allocator peak_bytes_in_use"
        elif self._rss_before is not None:
            peak_memory = max(_peak_rss_bytes() - self._rss_before, 0)
            memory_source = (
                "CPU: growth of the process's peak resident memory (includes compilation)"
            )
        else:
            peak_memory, memory_source = None, "not reported: no allocator statistics, no /proc"
        return {
            "model": self.model_name,
            "batch_size": batch_size,
            "steps": steps,
            "images_per_sec": steps * batch_size / median_window,
            "compile_seconds": max(self.first_call_seconds - step_seconds, 0.0),
            "device": f"{device.platform}:{device.device_kind}",
            "platform": device.platform,
            "num_devices": len(devices),
            "backend": self.backend,
            "dtype": self.dtype,
            "compiled_loop": self.compiled_loop,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "num_params": self.num_params,
            "step_seconds_median": step_seconds,
            "window_images_per_sec": [steps * batch_size / s for s in window_seconds],
            "flops_per_step": flops,
            "achieved_flops_per_sec": achieved,
            "peak_flops_per_sec": peak,
            "mfu": mfu,
            "mfu_note": mfu_note,
            "peak_memory_bytes": peak_memory,
            "peak_memory_source": memory_source,
            "jax_version": jax.__version__,
            "host": platform.node(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "fast_paths": self.fast_paths,
        }


def run_benchmark(
    model_name: str,
    batch_size: int = 128,
    steps: int = 50,
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    dtype: str = "float32",
    backend: str = "jit",
    steps_per_call: int = 0,
    windows: int = 5,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    fast_paths: bool | None = None,
) -> dict[str, Any]:
    """Train-step throughput of `model_name` with the engine's device-resident step.

    batch_size: global batch; steps: steps per timed window (one window = one synthetic epoch);
    input_shape: (H, W, C), default `bench_spec(model_name)`; num_classes: default from the spec;
    dtype: "float32" or "bfloat16" (compute dtype; parameters stay float32, as
    `train.half_precision`); backend: "jit" | "pmap"; steps_per_call: 0 = the engine's default for
    the platform, 1 = one dispatch per step, > 1 = each window's steps in one compiled loop;
    windows: timed windows (the median is reported); options: extra model options; fast_paths:
    build the model with `cnn_jax.fast_paths`' CPU implementations (None: as training does, on
    CPU devices only).

    Returns a dict with the keys in `RESULT_KEYS`: images_per_sec (median window),
    compile_seconds (first call minus one step), device, peak_memory_bytes with its source (device
    allocator peak on accelerators; on CPU the growth of the process's peak resident memory, which
    includes compilation), and on accelerators MFU = achieved FLOP/s / dense bf16 peak.
    Raises `ConfigError` for a bad argument.
    """
    _check_positive("windows", windows)
    bench = TrainBenchmark(
        model_name,
        batch_size,
        steps,
        input_shape=input_shape,
        num_classes=num_classes,
        dtype=dtype,
        backend=backend,
        steps_per_call=steps_per_call,
        options=options,
        seed=seed,
        fast_paths=fast_paths,
    )
    return bench.result([bench.run_window() for _ in range(windows)])


__all__ = [
    "BENCH_MODELS",
    "RESULT_KEYS",
    "TrainBenchmark",
    "bench_spec",
    "peak_bf16_flops",
    "run_benchmark",
]
