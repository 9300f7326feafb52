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


def engine_time_to_accuracy(config, splits: dict, *, target: float = TARGET, max_epochs=None,
                            log=print) -> dict:
    """Time to `target` test accuracy with the engine's own pieces and no tfds or workdir.

    `splits` = {'train'|'test': (uint8 images [N, H, W, C], labels [N])}, e.g.
    `importers.read_idx_dataset(MNIST folder)`. The model, optimizer, compiled steps, device-
    resident feeder (`ResidentFeeder`), `run_steps` and `evaluate_variables` are the ones
    `train_and_evaluate` uses; evaluation of the whole test split after every epoch. Both
    programs are compiled first on a throwaway state, so `training_seconds_to_target` is the
    device-synced training time of the epochs up to the first evaluation at >= target,
    compilation and evaluations excluded (given separately). Stops at that evaluation, or after
    `max_epochs` (default: the config's epochs).
    """
    import jax

    from cnn_jax import config as config_lib
    from cnn_jax.data.registry import get_dataset_info
    from cnn_jax.train import optimizers
    from cnn_jax.train.feeders import (
        ResidentFeeder,
        check_batch_sizes,
        effective_eval_batch,
        make_preprocess,
        model_image_shape,
    )
    from cnn_jax.train.loop import (
        RunKeys,
        compile_for,
        evaluate_variables,
        run_steps,
        steps_per_call,
        total_steps,
    )
    from cnn_jax.train.restore import build_model, fast_paths_wanted

    t_start = time.perf_counter()
    config = config_lib.validate_config(config)
    devices = jax.devices()
    check_batch_sizes(config, len(devices))
    config.model.fast_paths = "on" if fast_paths_wanted(config, devices) else "off"
    info = get_dataset_info(config.dataset.name, config)
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    feeder = ResidentFeeder(
        name=info.name, kind="device", image_shape=model_image_shape(config, info),
        num_classes=info.num_classes, num_train=len(train_y), num_eval=len(test_y),
        preprocess=make_preprocess(config, info), batch_size=int(config.train.batch_size),
        eval_batch_size=effective_eval_batch(
            int(config.train.eval_batch_size), len(test_y), len(devices)),
        train_arrays=(train_x, train_y), eval_arrays=(test_x, test_y),
    )  # fmt: skip
    spe = feeder.steps_per_epoch
    model = build_model(config, feeder.num_classes, fast_paths=config.model.fast_paths == "on")
    tx = optimizers.make_optimizer(config, spe, total_steps(config, spe))
    compiled = compile_for(config, model, tx, feeder, devices)
    group = steps_per_call(config, devices)
    init_key = RunKeys.from_seed(int(config.seed)).init

    # Compile the train and eval programs on a throwaway state (the steps may donate it).
    t0 = time.perf_counter()
    warm = compiled.init_state(feeder.image_shape, init_key)
    warm, _ = run_steps(compiled, warm, compiled.zero_sums(), feeder.train_batches(compiled, 0),
                        min(group, spe), group)  # fmt: skip
    jax.block_until_ready(warm)
    evaluate_variables(compiled, feeder, warm.variables())
    compile_seconds = time.perf_counter() - t0
    del warm

    state = compiled.init_state(feeder.image_shape, init_key)
    jax.block_until_ready(state)
    batches = feeder.train_batches(compiled, 0)
    epochs = int(max_epochs or config.train.num_epochs)
    train_seconds, eval_seconds, evals, hit = 0.0, 0.0, [], None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        state, sums = run_steps(compiled, state, compiled.zero_sums(), batches, spe, group)
        sums = jax.device_get(compiled.host(sums))  # waits for the epoch's steps
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        t0 = time.perf_counter()
        metrics = evaluate_variables(compiled, feeder, state.variables())
        eval_seconds += time.perf_counter() - t0
        evals.append({"epoch": epoch, "accuracy": float(metrics["accuracy"]),
                      "train_loss": float(sums["loss"]) / spe, "epoch_train_seconds": epoch_seconds,
                      "training_seconds": train_seconds})  # fmt: skip
        log(f"  epoch {epoch}: test accuracy {metrics['accuracy']:.4f}, training "
            f"{epoch_seconds:.3f}s ({train_seconds:.3f}s so far)")  # fmt: skip
        if metrics["accuracy"] >= target:
            hit = evals[-1]
            break
    return {
        "target": target,
        "training_seconds_to_target": hit["training_seconds"] if hit else None,
        "epochs_to_target": hit["epoch"] if hit else None,
        "final_test_accuracy": evals[-1]["accuracy"],
        "epochs_run": len(evals),
        "steps_per_epoch": spe,
        "steps_per_call": group,
        "batch_size": feeder.batch_size,
        "train_images_per_sec": len(evals) * spe * feeder.batch_size / train_seconds,
        "compile_seconds": compile_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "evals": evals,
        "device": f"{devices[0].platform}:{devices[0].device_kind}",
        "num_devices": len(devices),
    }


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
