"""Every accelerator figure in one command; run it through `benchmarks/gpu_check.sh`.

Phases, each in its own process (so peak memory is per model, and a phase that fails or runs
out of time is recorded without stopping the others), inside one time budget (--budget-s, default
455 s, so the whole command stays under 8 minutes on one H100/H200):

  probe         device, driver and versions; refuses a machine without an accelerator
  resnet50      ResNet-50, 224x224x3, 1000 classes, batch 256, bfloat16: the engine's real train
                step (`cnn_jax.bench.TrainBenchmark`) against the same model in PyTorch with bf16
                AMP + channels_last + torch.compile, timed windows alternating in one process
                (`train_throughput.measure`); MFU against the device's dense bf16 peak
                (`cnn_jax.bench.peak_bf16_flops`) and peak device memory, for both
  lenet5_mnist  LeNet-5 time to 99% MNIST test accuracy (`experiments/lenet5_mnist.py` through
                `time_to_accuracy.engine_time_to_accuracy`; the IDX files are read with
                `importers.read_idx_dataset`, so tensorflow-datasets is not needed)
  resnet18      ResNet-18 (CIFAR stem), 32x32x3, 10 classes, batch 256, as resnet50
  vgg16         VGG-16, 32x32x3, 10 classes, batch 256, as resnet50

Writes benchmarks/results/gpu_check_<platform>.json and the `gpu_check_<platform>` section of
benchmarks/RESULTS.md; exits 1 if a phase failed, timed out or was skipped (what was measured
is still written).

--dry-run (CPU): every code path above with tiny shapes and one timed window per framework, in
about a minute on 2 cores: the probe also builds ResNet-50, ResNet-18 and VGG-16 in both
frameworks and compares their parameter counts (compiling ResNet-50's train step alone takes over
a minute on 2 CPU cores, so the three throughput rows time a small ConvNet as a stand-in, through
the same code: subprocess, both frameworks, JSON, table); LeNet-5 trains one epoch on a tiny
random IDX set. Output goes to --out-dir (default: a new temporary folder), never to
benchmarks/results/ or benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import report  # the benchmarks/ helper module

REPO = Path(__file__).resolve().parents[1]
# Where the MNIST IDX files are looked for, in order (after --mnist and $CNN_JAX_MNIST).
MNIST_PLACES = (
    REPO.parent / "shared" / "data" / "mnist",
    REPO / "shared" / "data" / "mnist",
    REPO / ".gpu_check" / "mnist",
)
RESNET50_TARGET_IMAGES_PER_SEC = 5_000  # on one H100 (an H200 has the same bf16 peak)
LENET_TARGET_TRAINING_SECONDS = 1.0
DEFAULT_BUDGET_S = 455


@dataclasses.dataclass(frozen=True)
class Row:
    """One throughput row: `model` timed at this shape in both frameworks."""

    name: str
    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    batch_size: int
    steps: int  # per timed window (a multiple of the engine's 16 steps per call on GPUs)
    windows: int
    cap_s: int  # the phase's own time limit, process start included


GPU_ROWS = (
    Row("resnet50", "resnet50", (224, 224, 3), 1000, 256, 32, 5, 300),
    Row("resnet18", "resnet18", (32, 32, 3), 10, 256, 48, 5, 130),
    Row("vgg16", "vgg16", (32, 32, 3), 10, 256, 32, 5, 130),
)
# --dry-run: one stand-in row through the same code (see the module docstring).
DRY_ROWS = (Row("resnet50", "simple_convnet", (16, 16, 3), 4, 4, 2, 1, 150),)
TTA_CAP_S, PROBE_CAP_S = 90, 120
DRY_RUN_SLACK = 4  # phase caps and the default budget multiplied by this in a dry run


# ----------------------------------------------------------------------------------------------
# Child processes: one phase each, result written as JSON
# ----------------------------------------------------------------------------------------------


def phase_probe(spec: dict) -> dict:
    import jax

    from cnn_jax.bench import peak_bf16_flops

    device = jax.devices()[0]
    if device.platform == "cpu" and not spec["dry_run"]:
        raise SystemExit(
            "gpu_check: no accelerator (JAX sees only CPU devices); run with --dry-run to check the "
            "script on CPU, or install JAX for the GPU (pip install -e '.[cuda]')"
        )
    out = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "peak_bf16_flops": peak_bf16_flops(device),
        "machine": report.machine(),
        "versions": report.versions(),
        "jax_backend_version": _backend_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "driver": _nvidia_smi(),
    }
    try:
        import torch

        out["torch_cuda"] = {
            "available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        }
    except ImportError:
        out["torch_cuda"] = None
    if spec["dry_run"]:
        out["builds"] = [_build_both(Row(**r)) for r in spec["build_rows"]]
    return out


def _backend_version() -> str | None:
    import jax

    try:
        return str(jax.devices()[0].client.platform_version)
    except Exception:  # noqa: BLE001 -- informational only
        return None


def _nvidia_smi() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _build_both(row: Row) -> dict:
    """Builds `row.model` in both frameworks (shapes only on the JAX side) and compares the
    parameter counts, as `train_throughput.measure` asserts before timing on the GPU."""
    import jax
    import optax

    from cnn_jax.bench import bench_spec
    from cnn_jax.models import get_model
    from cnn_jax.models.summary import count_params
    from cnn_jax.train.state import abstract_train_state

    options = bench_spec(row.model)["options"]
    model = get_model(row.model, num_classes=row.num_classes, **options)
    jax_params = count_params(abstract_train_state(model, optax.adam(1e-3), row.input_shape).params)
    import torch
    from torch_models import count_params as torch_count
    from torch_models import get_torch_model

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        twin = get_torch_model(
            row.model, num_classes=row.num_classes, input_shape=row.input_shape, **options
        )
    torch_params = torch_count(twin)
    jax.clear_caches()
    return {"model": row.model, "input_shape": list(row.input_shape),
            "jax_params": jax_params, "torch_params": torch_params,
            "equal": jax_params == torch_params}  # fmt: skip


def phase_throughput(spec: dict) -> dict:
    import jax
    from train_throughput import measure

    row = Row(**spec["row"])
    platform = jax.devices()[0].platform
    dtype = "bfloat16"
    torch_device = "cpu" if platform == "cpu" else "cuda"
    result = measure(
        row.model, row.batch_size, row.steps, row.windows, torch_device=torch_device,
        threads=os.cpu_count(), dtype=dtype, steps_per_call=0, use_torch=spec["use_torch"],
        input_shape=row.input_shape, num_classes=row.num_classes,
    )  # fmt: skip
    lowered = result.get("lowered_flops_per_step")
    if result.get("mfu") is None and lowered and result.get("peak_flops_per_sec"):
        # No FLOP count from the compiled program: MFU from the lowered one.
        result["mfu"] = lowered / result["step_seconds_median"] / (
            result["peak_flops_per_sec"] * result["num_devices"])  # fmt: skip
        result["mfu_note"] += "; FLOPs of the lowered (unoptimised) program"
    if lowered and result.get("flops_per_step"):
        result["flops_compiled_over_lowered"] = result["flops_per_step"] / lowered
    if result.get("mfu") is not None and result.get("torch_images_per_sec"):
        # Same architecture, same FLOPs per step: MFU scales with images/s.
        result["torch_mfu"] = result["mfu"] * result["torch_images_per_sec"] / result[
            "images_per_sec"]  # fmt: skip
    result["flops_per_image"] = (
        result["flops_per_step"] / row.batch_size if result.get("flops_per_step") else None
    )
    result["row"] = dataclasses.asdict(row)
    return result


def phase_tta(spec: dict) -> dict:
    from time_to_accuracy import engine_time_to_accuracy

    from cnn_jax.config import apply_overrides, load_config
    from cnn_jax.data.importers import read_idx_dataset

    config = load_config(spec["experiment"])
    config = apply_overrides(config, spec["overrides"])
    splits = read_idx_dataset(Path(spec["mnist"]))
    result = engine_time_to_accuracy(
        config, splits, max_epochs=spec["max_epochs"], log=lambda m: print(m, flush=True)
    )
    result.update(experiment=spec["experiment"], overrides=spec["overrides"],
                  mnist=spec["mnist_source"], num_train=len(splits["train"][1]),
                  num_test=len(splits["test"][1]))  # fmt: skip
    return result


PHASES = {"probe": phase_probe, "throughput": phase_throughput, "tta": phase_tta}


def run_child(kind: str, spec_json: str, result_path: str) -> int:
    result = PHASES[kind](json.loads(spec_json))
    report.write_json(Path(result_path), result)
    return 0


# ----------------------------------------------------------------------------------------------
# The parent: plan, budget, subprocesses, JSON and table
# ----------------------------------------------------------------------------------------------


def run_phase(cmd: list[str], timeout: float, *, label: str, env=None) -> dict:
    """Runs `cmd` in its own process group, echoing its output prefixed with `label`; kills the
    whole group after `timeout` seconds. Returns {'status': 'ok'|'failed'|'timed out',
    'seconds', 'returncode', 'output_tail'}."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True, cwd=REPO,
    )  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def echo():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(f"[{label}] {line}", end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=max(timeout, 1))
        status = "ok" if returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the phase and whatever it started (compilers)
        returncode = proc.wait()
        status = "timed out"
    reader.join(timeout=10)
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1),
            "returncode": returncode, "output_tail": list(tail)}  # fmt: skip


def find_mnist(given: str | None) -> Path | None:
    places = [Path(p) for p in (given, os.environ.get("CNN_JAX_MNIST")) if p] + list(MNIST_PLACES)
    for place in places:
        if (place / "train-images-idx3-ubyte.gz").is_file() or (
            place / "train-images-idx3-ubyte"
        ).is_file():
            return place
    return None


def write_tiny_idx(folder: Path, n_train: int = 96, n_test: int = 64) -> Path:
    """Four MNIST-format IDX files of random digits, for --dry-run."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array, magic in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x0803),
            ("labels-idx1", rng.integers(0, 10, n, dtype=np.uint8), 0x0801),
        ):
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.tobytes())
    return folder


def plan(args, mnist: Path | None) -> list[dict]:
    """The phases in order: [{'name', 'kind', 'spec', 'cap_s'}]."""
    rows = DRY_ROWS if args.dry_run else GPU_ROWS
    phases = [{"name": "probe", "kind": "probe", "cap_s": PROBE_CAP_S,
               "spec": {"dry_run": args.dry_run,
                        "build_rows": [dataclasses.asdict(r) for r in GPU_ROWS]}}]  # fmt: skip
    throughput = [
        {"name": r.name, "kind": "throughput", "cap_s": r.cap_s,
         "spec": {"row": dataclasses.asdict(r), "use_torch": not args.no_torch}}
        for r in rows
    ]  # fmt: skip
    tta = {"name": "lenet5_mnist", "kind": "tta", "cap_s": TTA_CAP_S,
           "spec": {"experiment": "lenet5_mnist", "mnist": str(mnist) if mnist else None,
                    "mnist_source": "tiny random IDX set (dry run)" if args.dry_run else str(mnist),
                    "max_epochs": 1 if args.dry_run else None,
                    "overrides": ["train.batch_size=32", "train.eval_batch_size=32"]
                    if args.dry_run else []}}  # fmt: skip
    # ResNet-50 first (the headline), then the quick LeNet-5 run, then the 32x32 rows.
    phases += throughput[:1] + [tta] + throughput[1:]
    if args.phases:
        wanted = set(args.phases.split(",")) | {"probe"}
        phases = [p for p in phases if p["name"] in wanted]
    return phases


def _fmt(x, spec=",.0f") -> str:
    return "-" if x is None else format(x, spec)


def _percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.1f}"


def throughput_target(name: str, r: dict) -> str:
    if name != "resnet50":
        return "(no target)"
    ips, torch_ips = r.get("images_per_sec"), r.get("torch_images_per_sec")
    parts = [("met" if ips >= RESNET50_TARGET_IMAGES_PER_SEC else "**not met**")
             + f" (>= {RESNET50_TARGET_IMAGES_PER_SEC:,} img/s)"]  # fmt: skip
    if torch_ips:
        parts.append(("met" if ips >= torch_ips else "**not met**") + " (>= PyTorch)")
    return "; ".join(parts)


def markdown(data: dict) -> str:
    meta, phases = data["meta"], data["phases"]
    probe = phases.get("probe", {}).get("result") or {}
    title = "### Accelerator check (`benchmarks/gpu_check.sh`)" + (
        " -- DRY RUN on CPU, tiny shapes: not a measurement" if meta["dry_run"] else ""
    )
    lines = [title, ""]
    if probe:
        lines += report.header_lines({**meta, "machine": probe["machine"],
                                      "versions": probe["versions"]})  # fmt: skip
        peak = probe.get("peak_bf16_flops")
        torch_cuda = probe.get("torch_cuda") or {}
        lines.append(
            f"- Device: {probe['num_devices']} x {probe['device_kind']} ({probe['platform']}); "
            f"dense bf16 peak {_fmt(peak and peak / 1e12, '.1f')} TFLOP/s "
            "(`cnn_jax.bench.BF16_PEAK_FLOPS`); "
            f"driver: {probe.get('driver') or '-'}; XLA backend: "
            f"{probe.get('jax_backend_version') or '-'}; PyTorch CUDA {torch_cuda.get('cuda')}, "
            f"cuDNN {torch_cuda.get('cudnn')}"
        )
    took = ", ".join(f"{n} {p['seconds']:.0f} s ({p['status']})" for n, p in phases.items())
    lines += [(f"- Phases: {took}; total {meta['total_seconds']:.0f} s of a "
              f"{meta['budget_s']:.0f} s budget"), ""]  # fmt: skip

    lines += [
        (
            "| model | input | batch | cnn_jax bf16 img/s | PyTorch img/s | ratio | MFU cnn_jax / "
            "PyTorch | peak memory GiB cnn_jax / PyTorch | first call s cnn_jax / PyTorch | target |"
        ),
        "|---|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    rows = DRY_ROWS if meta["dry_run"] else GPU_ROWS
    for row in rows:
        p = phases.get(row.name)
        label = row.model + (f" (dry-run stand-in for {row.name})" if row.model != row.name else "")
        shape = "x".join(map(str, row.input_shape))
        if not p or p["status"] != "ok":
            why = "not run" if not p else f"{p['status']} after {p['seconds']:.0f} s"
            if p and p.get("reason"):
                why = p["reason"]
            lines.append(f"| {label} | {shape} | {row.batch_size} | {why} | | | | | | |")
            continue
        r = p["result"]
        mfu = f"{_percent(r.get('mfu'))} / {_percent(r.get('torch_mfu'))}"
        lines.append(
            f"| {label} | {shape} | {row.batch_size} | {_fmt(r['images_per_sec'])} | "
            f"{_fmt(r.get('torch_images_per_sec'))} | {_fmt(r.get('ratio'), '.2f')} | {mfu} | "
            f"{_gib(r.get('peak_memory_bytes'))} / {_gib(r.get('torch_peak_memory_bytes'))} | "
            f"{r['compile_seconds']:.0f} / {_fmt(r.get('torch_first_call_seconds'), '.0f')} | "
            f"{throughput_target(row.name, r)} |"
        )
    flops = [
        f"{row.model} {phases[row.name]['result']['flops_per_image'] / 1e9:.2f} G"
        + (f" (compiled / lowered program {r_:.2f})"
           if (r_ := phases[row.name]["result"].get("flops_compiled_over_lowered")) else "")
        for row in rows
        if phases.get(row.name, {}).get("status") == "ok"
        and phases[row.name]["result"].get("flops_per_image")
    ]  # fmt: skip
    if flops:
        lines += ["", "XLA's FLOPs per training image: " + "; ".join(flops) + "."]
    lines += ["", ("Images/s: median of the timed windows (each `steps` steps of one batch of "
              "synthetic uint8 images gathered, normalised, forward, backward, Adam), cnn_jax and "
              "PyTorch windows alternating in one process after compilation and a warm-up epoch. "
              "cnn_jax: the engine's step in bfloat16 (float32 parameters), 16 steps per compiled "
              "call; PyTorch: bf16 autocast + channels_last + torch.compile (default mode), "
              "cudnn.benchmark. MFU: XLA's FLOP count of one step over the step time and the dense "
              "bf16 peak. Peak memory: the JAX allocator's peak_bytes_in_use / "
              "torch.cuda.max_memory_allocated, each model in its own process. First call: "
              "compilation (cnn_jax) or torch.compile plus the first step (PyTorch)."), ""]  # fmt: skip

    p = phases.get("lenet5_mnist")
    lines += [("| LeNet-5 on MNIST | batch | training time to 99% (s) | epochs to 99% | train "
              "img/s | compile s | evaluation s | final test acc | target (< 1 s of training) |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    if p and p["status"] == "ok":
        r = p["result"]
        secs = r["training_seconds_to_target"]
        target = ("not reached" if secs is None else
                  "met" if secs < LENET_TARGET_TRAINING_SECONDS else "**not met**")  # fmt: skip
        lines.append(
            f"| {r['experiment']} {' '.join(r['overrides'])} | {r['batch_size']} | "
            f"{_fmt(secs, '.2f') if secs is not None else 'not reached'} | "
            f"{_fmt(r['epochs_to_target'], 'd')} | {_fmt(r['train_images_per_sec'])} | "
            f"{r['compile_seconds']:.1f} | {r['eval_seconds']:.1f} | "
            f"{r['final_test_accuracy']:.4f} | {target} |"
        )
        lines += ["", (f"{r['num_train']:,} training / {r['num_test']:,} test images from "
                  f"{r['mnist']}; training time: the device-synced epochs up to the first "
                  "evaluation at >= 99%, compilation and the per-epoch evaluations of the whole "
                  "test split excluded (given beside it)."), ""]  # fmt: skip
    else:
        why = "not run" if not p else p.get("reason") or p["status"]
        lines.append(f"| lenet5_mnist | - | {why} | | | | | | |")
    if probe.get("builds"):
        lines += ["", ("| model built in both frameworks | input | cnn_jax params | PyTorch params "
                  "| equal |"), "|---|---|---:|---:|---|"]  # fmt: skip
        for b in probe["builds"]:
            lines.append(f"| {b['model']} | {'x'.join(map(str, b['input_shape']))} | "
                         f"{b['jax_params']:,} | {b['torch_params']:,} | {b['equal']} |")  # fmt: skip
    return "\n".join(lines)


def section_name(data: dict) -> str:
    meta = data["meta"]
    return "gpu_check_dry_run" if meta["dry_run"] else f"gpu_check_{meta['platform']}"


def write_outputs(data: dict, out_dir: Path, results_md: Path) -> Path:
    name = section_name(data)
    out = out_dir / f"{name}.json"
    report.write_json(out, data)
    report.replace_section(name, markdown(data), path=results_md)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the script")
    p.add_argument(
        "--out-dir",
        help="JSON folder (default benchmarks/results; dry run: a new temporary folder)",
    )
    p.add_argument(
        "--results-md",
        help="RESULTS.md to update (default benchmarks/RESULTS.md; dry run: OUT_DIR/RESULTS.md)",
    )
    p.add_argument(
        "--mnist",
        help="folder with the four MNIST IDX files (default: $CNN_JAX_MNIST, "
        "../shared/data/mnist, shared/data/mnist or .gpu_check/mnist)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"time for all phases together (default {DEFAULT_BUDGET_S} s, {DRY_RUN_SLACK}x that "
        "in a dry run); phases that do not fit are skipped",
    )
    p.add_argument(
        "--phases",
        help="comma-separated subset of: resnet50, lenet5_mnist, resnet18, "
        "vgg16 (the probe always runs)",
    )
    p.add_argument("--no-torch", action="store_true", help="time cnn_jax only")
    p.add_argument(
        "--report",
        metavar="JSON",
        help="only rewrite the RESULTS.md section from a "
        "gpu_check JSON written elsewhere (copied to the JSON folder too)",
    )
    p.add_argument(
        "--copy-results-to",
        metavar="DIR",
        help="also copy the JSON and the table into "
        "DIR (to bring them back from a GPU machine; then --report JSON here)",
    )
    p.add_argument("--phase", help=argparse.SUPPRESS)  # child process: probe | throughput | tta
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S * (DRY_RUN_SLACK if args.dry_run else 1)
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s:g}: expected a number of seconds > 0")
    if args.phase:
        return run_child(args.phase, args.spec, args.result)

    if args.report:
        data = json.loads(Path(args.report).read_text())
        out_dir = Path(args.out_dir) if args.out_dir else report.RESULTS_DIR
        results_md = Path(args.results_md) if args.results_md else report.RESULTS_MD
        out = write_outputs(data, out_dir, results_md)
        print(f"wrote {out} and the {section_name(data)} section of {results_md}")
        return 0

    started = time.perf_counter()
    if args.out_dir:
        out_dir = Path(args.out_dir)
    else:
        out_dir = (
            Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else report.RESULTS_DIR
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.results_md:
        results_md = Path(args.results_md)
    else:
        results_md = out_dir / "RESULTS.md" if args.dry_run else report.RESULTS_MD
    if args.dry_run:
        mnist = write_tiny_idx(out_dir / "tiny_mnist")
    else:
        mnist = find_mnist(args.mnist)

    env = dict(os.environ)
    # JAX and PyTorch share the GPU in the throughput phases: JAX takes at most this share.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    meta = {"date": report.now(), "dry_run": args.dry_run, "budget_s": args.budget_s,
            "command": os.environ.get("GPU_CHECK_COMMAND") or report.command_line()}  # fmt: skip
    phases: dict[str, dict] = {}
    deadline = started + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gpu_check_phases_") as tmp:
        for phase in plan(args, mnist):
            name, left = phase["name"], deadline - time.perf_counter()
            if phase["kind"] == "tta" and phase["spec"]["mnist"] is None:
                phases[name] = {
                    "status": "skipped",
                    "seconds": 0.0,
                    "reason": (
                        "MNIST IDX files not found (--mnist DIR, $CNN_JAX_MNIST, "
                        "../shared/data/mnist, or .gpu_check/mnist from `gpu_check.sh --prepare`)"
                    ),
                }
                print(f"gpu_check: {name} skipped: {phases[name]['reason']}", flush=True)
                continue
            if left < 30 and name != "probe":  # the probe always runs: it says what ran where
                phases[name] = {"status": "skipped", "seconds": 0.0,
                                "reason": f"time budget spent ({left:.0f} s left)"}  # fmt: skip
                print(f"gpu_check: {name} skipped: {phases[name]['reason']}", flush=True)
                continue
            result_path = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--phase", phase["kind"],
                   "--spec", json.dumps(phase["spec"]), "--result", str(result_path)]  # fmt: skip
            # A dry run checks the code paths, not the timings: on a busy CPU its phases may take
            # several times their GPU caps, so they get DRY_RUN_SLACK times as long.
            cap = phase["cap_s"] * (DRY_RUN_SLACK if args.dry_run else 1)
            timeout = cap if name == "probe" else min(cap, left)
            print(f"gpu_check: {name} (limit {timeout:.0f} s)", flush=True)
            outcome = run_phase(cmd, timeout, label=name, env=env)
            if outcome["status"] == "ok":
                outcome["result"] = json.loads(result_path.read_text())
            phases[name] = outcome
            print(
                f"gpu_check: {name} {outcome['status']} in {outcome['seconds']:.0f} s", flush=True
            )
            if name == "probe" and outcome["status"] != "ok":
                print("gpu_check: the probe failed; nothing measured", file=sys.stderr)
                return 2
    probe = phases["probe"]["result"]
    meta.update(platform="dry_run" if args.dry_run else probe["platform"],
                total_seconds=round(time.perf_counter() - started, 1),
                load_average_at_end=round(os.getloadavg()[0], 2))  # fmt: skip
    data = {"meta": meta, "phases": phases}
    out = write_outputs(data, out_dir, results_md)
    table = markdown(data)
    print("\n" + table + "\n")
    print(f"wrote {out} and the {section_name(data)} section of {results_md}")
    if args.copy_results_to:
        dest = Path(args.copy_results_to)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / out.name).write_text(out.read_text())
        (dest / f"{section_name(data)}.md").write_text(table + "\n")
        print(f"copied the JSON and the table to {dest}")
    bad = [n for n, p in phases.items() if p["status"] != "ok"]
    if bad:
        print(f"gpu_check: not measured: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
