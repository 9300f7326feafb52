"""Train-step throughput, cnn_jax vs PyTorch, alternating in one process.

For every model and batch size: the project's real device-resident train step
(`cnn_jax.bench.TrainBenchmark`) and the same architecture in PyTorch
(`benchmarks/torch_models.py`; CPU: eager float32 with the same thread count; GPU: bf16 AMP +
channels_last + torch.compile, with cnn_jax in bfloat16) are compiled and warmed up, then their
timed windows alternate (J T J T ...) and the medians are compared: ratio = cnn_jax / PyTorch.

Writes benchmarks/results/train_throughput_<platform>.json and the table in benchmarks/RESULTS.md.

  python benchmarks/train_throughput.py                         # CPU defaults (lenet5, simple_convnet, ...)
  python benchmarks/train_throughput.py --models lenet5 --batch-sizes 128 --windows 7

Needs the `bench` extra (`pip install -e '.[bench]'`, torch 2.13.0) unless --no-torch.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # the benchmarks/ helper module

# Default batch sizes and steps per timed window (~1-3 s per window on 2 CPU cores).
CPU_PLAN = {
    "lenet5": ((32, 128, 512), {32: 100, 128: 40, 512: 10}),
    "simple_convnet": ((32, 128, 512), {32: 20, 128: 8, 512: 2}),
    "vgg16": ((32, 128), {32: 2, 128: 1}),
    "resnet18": ((32, 128), {32: 2, 128: 1}),
}
GPU_PLAN = {
    "lenet5": ((128, 1024), {128: 200, 1024: 100}),
    "simple_convnet": ((128, 1024), {128: 200, 1024: 50}),
    "vgg16": ((128, 256), {128: 50, 256: 30}),
    "resnet18": ((128, 256), {128: 50, 256: 30}),
    "resnet50": ((128, 256), {128: 30, 256: 20}),
}


def measure(model, batch_size, steps, windows, *, torch_device, threads, dtype, steps_per_call,
            use_torch, plain=False, extra_torch_threads=(), input_shape=None, num_classes=None):
    """One row: cnn_jax's engine step and its PyTorch twin, timed windows alternating.
    input_shape (H, W, C) and num_classes default to `bench_spec(model)`'s."""
    from cnn_jax.bench import TrainBenchmark, bench_spec

    spec = dict(bench_spec(model))
    spec["input_shape"] = tuple(input_shape or spec["input_shape"])
    spec["num_classes"] = int(num_classes or spec["num_classes"])
    shape = {"input_shape": spec["input_shape"], "num_classes": spec["num_classes"]}
    jax_bench = TrainBenchmark(model, batch_size, steps, dtype=dtype, steps_per_call=steps_per_call,
                               **shape)
    plain_bench = None
    if plain:  # the same engine step with the default (XLA) modules and compiler options
        plain_bench = TrainBenchmark(model, batch_size, steps, dtype=dtype,
                                     steps_per_call=steps_per_call, fast_paths=False, **shape)
    torch_bench, extra_benches = None, {}
    if use_torch:
        from torch_models import TorchTrainBenchmark

        def twin(n_threads):
            return TorchTrainBenchmark(
                model, batch_size, steps, input_shape=spec["input_shape"],
                num_classes=spec["num_classes"], options=spec["options"], device=torch_device,
                threads=n_threads,
            )

        if torch_device != "cpu":
            import torch

            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
            torch.cuda.reset_peak_memory_stats()
        torch_bench = twin(threads)
        if torch_bench.num_params != jax_bench.num_params:
            raise AssertionError(
                f"{model}: PyTorch twin has {torch_bench.num_params} parameters, cnn_jax "
                f"{jax_bench.num_params}"
            )
        if torch_device == "cpu":
            extra_benches = {t: twin(t) for t in extra_torch_threads if t != threads}
    jax_windows, plain_windows, torch_windows = [], [], []
    extra_windows = {t: [] for t in extra_benches}
    for _ in range(windows):  # alternate J [P] T [T'] J [P] T [T'] ... so load changes hit all alike
        jax_windows.append(jax_bench.run_window())
        if plain_bench is not None:
            plain_windows.append(plain_bench.run_window())
        if torch_bench is not None:
            torch_windows.append(torch_bench.run_window())
        for t, b in extra_benches.items():
            extra_windows[t].append(b.run_window())
    row = jax_bench.result(jax_windows)
    row["lowered_flops_per_step"] = lowered_step_flops(jax_bench)
    if plain_bench is not None:
        plain_ips = steps * batch_size / statistics.median(plain_windows)
        row.update(plain_images_per_sec=plain_ips,
                   plain_window_images_per_sec=[steps * batch_size / s for s in plain_windows],
                   plain_compile_seconds=plain_bench.result(plain_windows)["compile_seconds"])
    if torch_bench is not None:
        torch_ips = steps * batch_size / statistics.median(torch_windows)
        row.update(
            torch_images_per_sec=torch_ips,
            torch_window_images_per_sec=[steps * batch_size / s for s in torch_windows],
            torch_first_call_seconds=torch_bench.first_call_seconds,
            torch_mode=("bf16 AMP + channels_last + torch.compile" if torch_bench.gpu
                        else f"eager float32, {threads} threads"),
            ratio=row["images_per_sec"] / torch_ips,
        )
        if torch_bench.gpu:
            import torch

            row["torch_peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        if plain_bench is not None:
            row["plain_ratio"] = row["plain_images_per_sec"] / torch_ips
        if extra_benches:
            row["torch_images_per_sec_by_threads"] = {
                t: steps * batch_size / statistics.median(w) for t, w in extra_windows.items()
            }
            best = max(torch_ips, *row["torch_images_per_sec_by_threads"].values())
            row["torch_best_images_per_sec"] = best
            row["ratio_vs_best_torch"] = row["images_per_sec"] / best
    del jax_bench, plain_bench, torch_bench, extra_benches
    gc.collect()
    return row


def lowered_step_flops(bench) -> float | None:
    """FLOPs of one train step of a `TrainBenchmark` from XLA's cost analysis of the lowered
    (unoptimised) program: no compilation, and a cross-check of the compiled count that
    `TrainBenchmark.result` uses for MFU on accelerators."""
    import jax
    import jax.numpy as jnp

    from cnn_jax.train import steps as steps_lib

    step = steps_lib.make_train_step(bench.model, bench.tx)
    batch = {"image": jax.ShapeDtypeStruct((bench.batch_size, *bench.input_shape), jnp.float32),
             "label": jax.ShapeDtypeStruct((bench.batch_size,), jnp.int32)}  # fmt: skip
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         bench.engine.host(bench.state))  # fmt: skip
    try:
        analysis = jax.jit(step).lower(state, batch).cost_analysis()
    except Exception:  # noqa: BLE001 -- best effort, as in cnn_jax.bench
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def markdown(rows, meta) -> str:
    title = f"### Train-step throughput on {meta['platform'].upper()}" + (
        f" ({meta['tag']})" if meta.get("tag") else "")
    lines = [title, "", *report.header_lines(meta), ""]
    plain = any("plain_images_per_sec" in r for r in rows)
    best = any("torch_best_images_per_sec" in r for r in rows)
    head = "| model | batch | cnn_jax img/s | PyTorch img/s | ratio cnn_jax/PyTorch |"
    rule = "|---|---:|---:|---:|---:|"
    if plain:
        head += " cnn_jax without fast paths img/s | ratio without |"
        rule += "---:|---:|"
    if best:
        head += " best PyTorch img/s (threads) | ratio vs best PyTorch |"
        rule += "---:|---:|"
    lines += [
        head + " cnn_jax compile s | cnn_jax path | peak mem MiB | params |",
        rule + "---:|---|---:|---:|",
    ]
    for r in rows:
        path = "compiled loop" if r["compiled_loop"] else "per-step dispatch"
        mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        cells = (
            f"| {r['model']} | {r['batch_size']} | {fmt(r['images_per_sec'])} | "
            f"{fmt(r.get('torch_images_per_sec'))} | {fmt(r.get('ratio'), '.2f')} |"
        )
        if plain:
            cells += f" {fmt(r.get('plain_images_per_sec'))} | {fmt(r.get('plain_ratio'), '.2f')} |"
        if best:
            by = {meta.get("threads"): r.get("torch_images_per_sec"),
                  **r.get("torch_images_per_sec_by_threads", {})}
            t_best = max(by, key=lambda t: by[t] or 0)
            cells += (f" {fmt(r.get('torch_best_images_per_sec'))} ({t_best}) | "
                      f"{fmt(r.get('ratio_vs_best_torch'), '.2f')} |")
        lines.append(
            cells + f" {fmt(r['compile_seconds'], '.1f')} | {path}, {r['dtype']} | {fmt(mem)} | "
            f"{r['num_params']:,} |"
        )
    lines += [
        "",
        (f"Images/s: median of {meta['windows']} timed windows per framework, windows alternating "
        "in one process after compilation and a warm-up epoch. PyTorch: "
        f"{meta['torch_mode']}. Peak memory: {meta['memory_note']}."),
    ]
    lines.append(
        "\n\"cnn_jax\" is the default engine step, with the CPU fast paths of `cnn_jax.fast_paths` "
        "(Eigen instead of YNNPACK convolutions, planar im2col for few-channel convs, im2col for "
        "inputs smaller than the kernel, reshape max pooling)." + (" \"Without fast paths\": the same step traced and compiled under "
                       "`fast_paths=False` (XLA's own layers and options), timed in the same alternation." if plain else "")
    )
    return "\n".join(lines)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated (default: the platform's plan)")
    p.add_argument("--batch-sizes", help="comma-separated (default: per model)")
    p.add_argument("--steps", type=int, help="steps per timed window (default: per model and batch)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch CPU threads")
    p.add_argument("--extra-torch-threads", default="",
                   help="also time PyTorch with these thread counts (comma-separated, CPU), e.g. 1: "
                        "on a loaded machine 2-thread OpenMP can collapse; ratios are then also "
                        "given against the best PyTorch configuration")
    p.add_argument("--steps-per-call", type=int, default=0, help="0: the engine's default")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--plain", action="store_true",
                   help="also time the engine step with the CPU fast paths off (cnn_jax.fast_paths)")
    p.add_argument("--json", help="output JSON (default benchmarks/results/train_throughput_<platform>.json)")
    p.add_argument("--no-markdown", action="store_true", help="do not touch benchmarks/RESULTS.md")
    p.add_argument("--tag", default="", help="suffix of the JSON file and RESULTS.md section, so a "
                   "partial re-run does not replace the full table")
    args = p.parse_args(argv)
    if not args.no_torch and not _torch_available():
        print("train_throughput: PyTorch is not installed; install the bench extra "
              "(.venv/bin/pip install -e '.[bench]', torch 2.13.0) or pass --no-torch",
              file=sys.stderr)
        return 2

    import jax

    platform_name = jax.devices()[0].platform
    plan = CPU_PLAN if platform_name == "cpu" else GPU_PLAN
    models = args.models.split(",") if args.models else list(plan)
    dtype = "float32" if platform_name == "cpu" else "bfloat16"
    torch_device = "cpu" if platform_name == "cpu" else "cuda"
    meta = {
        "date": report.now(), "command": report.command_line(), "machine": report.machine(),
        "versions": report.versions(), "platform": platform_name, "windows": args.windows,
        "threads": args.threads, "tag": args.tag,
        "torch_mode": (f"eager float32, torch.set_num_threads({args.threads})" if torch_device == "cpu"
                       else "bf16 autocast + channels_last + torch.compile"),
        "memory_note": ("growth of the process's peak RSS over the run (CPU; includes compilation "
                        "and cumulates over rows)" if platform_name == "cpu"
                        else "device allocator peak_bytes_in_use"),
    }
    rows = []
    for model in models:
        default_batches, default_steps = plan.get(model, ((128,), {128: 10}))
        batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else default_batches
        for b in batches:
            steps = args.steps or default_steps.get(b, 10)
            row = measure(model, b, steps, args.windows, torch_device=torch_device,
                          threads=args.threads, dtype=dtype, steps_per_call=args.steps_per_call,
                          use_torch=not args.no_torch, plain=args.plain,
                          extra_torch_threads=[int(t) for t in args.extra_torch_threads.split(",") if t])
            rows.append(row)
            print(f"{model:15s} batch {b:4d}: cnn_jax {row['images_per_sec']:9.0f} img/s"
                  + (f"   without fast paths {row['plain_images_per_sec']:9.0f} img/s"
                     if "plain_images_per_sec" in row else "")
                  + (f"   PyTorch {row['torch_images_per_sec']:9.0f} img/s   ratio {row['ratio']:.2f}"
                     if "ratio" in row else "")
                  + (f" (without fast paths {row['plain_ratio']:.2f})" if "plain_ratio" in row else "")
                  + f"   (compile {row['compile_seconds']:.1f}s, load {os.getloadavg()[0]:.1f})",
                  flush=True)
    meta["load_average_at_end"] = round(os.getloadavg()[0], 2)
    name = f"train_throughput_{platform_name}" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.json) if args.json else report.RESULTS_DIR / f"{name}.json"
    report.write_json(out, {"meta": meta, "rows": rows})
    print(f"wrote {out}")
    if not args.no_markdown:
        report.replace_section(name, markdown(rows, meta))
        print(f"updated {report.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
