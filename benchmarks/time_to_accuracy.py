"""Whole-run figures: LeNet-5 on real MNIST, time to 99% test accuracy and one full epoch.

Runs the project's own `train_and_evaluate` on `experiments/lenet5_mnist.py` (evaluation on the
full 10,000-image test set after every epoch) and records, from the reporter hooks:

  - time to 99%: wall time from the start of `train_and_evaluate` until the end of the first
    evaluation at >= 99.0% test accuracy (compilation, data loading and evaluations included);
  - first epoch: wall time from the start until the end of epoch 1's evaluation (everything
    included), and the steady training time of one epoch (60,000 images / the engine's measured
    training images/s after its first compiled call).

MNIST comes from the IDX files in ../shared/data/mnist, imported offline with
`cnn_jax.data.importers.import_dataset` into --data-dir (once; reused later).

  python benchmarks/time_to_accuracy.py                 # 2 CPU cores: the experiment as configured
  python benchmarks/time_to_accuracy.py --set train.num_epochs=3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # the benchmarks/ helper module

MNIST_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
TARGET = 0.99


class TimingReporter:
    """Records wall times of the loop's events (the `Reporter` hooks)."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.start = None
        self.evals: list[dict] = []
        self.train_ips: list[float] = []
        self.info: dict = {}

    def on_start(self, info):
        self.start = time.perf_counter() - self.t0
        self.info = dict(info)

    def on_train_step(self, step, total_steps, metrics):
        if metrics.get("images_per_sec"):
            self.train_ips.append(float(metrics["images_per_sec"]))

    def on_eval(self, step, metrics):
        self.evals.append({"t": time.perf_counter() - self.t0, "step": int(step),
                           "epoch": float(metrics.get("epoch", 0)),
                           "accuracy": float(metrics["accuracy"])})
        print(f"  eval at step {step}: test accuracy {metrics['accuracy']:.4f} "
              f"({self.evals[-1]['t']:.1f}s)", flush=True)

    def on_end(self, results):
        pass


def prepare_mnist(data_dir: str, source: Path) -> None:
    from cnn_jax.data.importers import import_dataset

    if (Path(data_dir) / "mnist").is_dir():
        return
    if not source.is_dir():
        raise SystemExit(f"MNIST IDX files not found in {source}; pass --mnist DIR")
    import_dataset("mnist", source, data_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="lenet5_mnist")
    p.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR")
                   or str(Path.home() / "tensorflow_datasets"))
    p.add_argument("--mnist", default=str(MNIST_SOURCE), help="folder with the MNIST IDX files")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--json", help="output JSON (default benchmarks/results/time_to_accuracy_<platform>.json)")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--no-fast-paths", action="store_true",
                   help="train without the CPU fast paths (model.fast_paths=off), to compare")
    args = p.parse_args(argv)

    import jax

    from cnn_jax.config import apply_overrides, load_config
    from cnn_jax.train.loop import train_and_evaluate

    prepare_mnist(args.data_dir, Path(args.mnist))
    config = load_config(args.experiment)
    config.dataset.data_dir = args.data_dir
    config = apply_overrides(config, args.set)
    platform_name = jax.devices()[0].platform
    meta = {"date": report.now(), "command": report.command_line(), "machine": report.machine(),
            "versions": report.versions(), "platform": platform_name}
    fast = not args.no_fast_paths
    config.model.fast_paths = "auto" if fast else "off"
    with tempfile.TemporaryDirectory(prefix="cnn_jax_tta_") as workdir:
        t0 = time.perf_counter()
        rep = TimingReporter(t0)
        results = train_and_evaluate(config, workdir, reporter=rep)
        total = time.perf_counter() - t0
    meta["load_average_at_end"] = round(os.getloadavg()[0], 2)
    hit = next((e for e in rep.evals if e["accuracy"] >= TARGET), None)
    steady_ips = sorted(rep.train_ips)[len(rep.train_ips) // 2] if rep.train_ips else None
    num_train = 60000 if "mnist" in config.dataset.name else None
    row = {
        "experiment": args.experiment,
        "fast_paths": fast,
        "overrides": args.set,
        "batch_size": int(config.train.batch_size),
        "epochs": results.get("epochs"),
        "steps": results.get("steps"),
        "final_test_accuracy": results.get("final_test_accuracy"),
        "best_test_accuracy": results.get("best_test_accuracy"),
        "time_to_99_seconds": hit["t"] if hit else None,
        "epochs_to_99": hit["epoch"] if hit else None,
        "first_epoch_seconds_all_included": rep.evals[0]["t"] if rep.evals else None,
        "steady_epoch_train_seconds": (num_train / steady_ips) if (num_train and steady_ips) else None,
        "train_images_per_sec_median": steady_ips,
        "engine_images_per_sec": results.get("images_per_sec"),
        "total_wall_seconds": total,
        "evals": rep.evals,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    }
    suffix = "" if fast else "_plain"
    out = Path(args.json) if args.json else report.RESULTS_DIR / f"time_to_accuracy_{platform_name}{suffix}.json"
    report.write_json(out, {"meta": meta, "result": row})
    print(f"time to {TARGET:.0%}: "
          + (f"{row['time_to_99_seconds']:.1f}s (epoch {row['epochs_to_99']:g})" if hit else "not reached")
          + f"; first epoch (all included) {row['first_epoch_seconds_all_included']:.1f}s"
          + (f"; steady epoch training {row['steady_epoch_train_seconds']:.1f}s"
             if row["steady_epoch_train_seconds"] else "")
          + f"; final accuracy {row['final_test_accuracy']:.4f}")
    print(f"wrote {out}")
    if not args.no_markdown:
        title = "" if fast else " without the CPU fast paths"
        lines = [f"### LeNet-5 on MNIST: time to 99% and one epoch ({platform_name.upper()}){title}", "",
                 *report.header_lines(meta), "",
                 ("| experiment | batch | time to 99% (s) | epochs to 99% | first epoch, all included (s) "
                 "| steady epoch training (s) | train img/s | final test acc | epochs run |"),
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        f = lambda x, s=".1f": "-" if x is None else format(x, s)
        lines.append(
            f"| {row['experiment']} {' '.join(args.set)}{'' if fast else ' (no fast paths)'} | "
            f"{row['batch_size']} | "
            f"{f(row['time_to_99_seconds']) if hit else 'not reached'} | {f(row['epochs_to_99'], 'g')} | "
            f"{f(row['first_epoch_seconds_all_included'])} | {f(row['steady_epoch_train_seconds'])} | "
            f"{f(steady_ips, '.0f')} | {f(row['final_test_accuracy'], '.4f')} | {row['epochs']} |"
        )
        lines += ["", ("Wall times from the start of `train_and_evaluate` (compilation, MNIST loading "
                  "and the per-epoch evaluations of all 10,000 test images included).")]
        name = f"time_to_accuracy_{platform_name}" + suffix
        report.replace_section(name, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
