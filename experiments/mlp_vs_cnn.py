"""MLP vs CNN: the guides' argument for convolutions, measured.

    python experiments/mlp_vs_cnn.py [--dataset digits|mnist] [--workdir DIR]
        [--max-shift K] [--set KEY=VALUE ...] [--max-steps N]
    (or: cnn-jax run mlp_vs_cnn ...)

Trains LeNet-5 and an MLP of about the same parameter count with the same training budget
(data, epochs, batch size, optimizer and schedule; no shift augmentation, so any robustness
comes from the architecture). Then measures test accuracy on the test images translated by
0..K pixels of the model's input (digits: 32x32 after resizing, so 4 pixels are one original
pixel; MNIST: 28x28), the uncovered border filled with background, as the mean over shifts
left, right, up and down. The guides' claim: shared local filters and pooling tolerate small
shifts better than an MLP's position-specific weights. Writes results.json, results.md and
shift_robustness.png to the workdir; each model trains in its own sub-folder (re-running
resumes and reuses them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from cnn_jax import predict, viz
from cnn_jax.config import apply_overrides, load_config, validate_config
from cnn_jax.data import load_split_arrays
from cnn_jax.train import load, train_and_evaluate

MLP_HIDDEN = [64, 32]  # ~ LeNet-5's 62k parameters on 28x28 or 32x32 inputs


def configs(dataset: str, overrides: list[str]) -> dict:
    """Same data and training budget for both models; only the model differs."""
    base = load_config("lenet5_digits" if dataset == "digits" else "lenet5_mnist")
    # No shift augmentation: the robustness measured is the architecture's, not learnt from data.
    cnn = apply_overrides(base, ["dataset.crop_padding=0", *overrides, "experiment=mlp_vs_cnn_cnn"])
    mlp = ml_collections.ConfigDict(cnn.to_dict())
    mlp.experiment = "mlp_vs_cnn_mlp"
    mlp.model.name = "mlp"
    mlp.model.options = ml_collections.ConfigDict({"hidden_features": MLP_HIDDEN})
    return {"cnn (lenet5)": validate_config(cnn), f"mlp {MLP_HIDDEN}": validate_config(mlp)}


def shift(x: np.ndarray, dy: int, dx: int, fill: np.ndarray) -> np.ndarray:
    """Translate [N, H, W, C] images by (dy, dx) pixels; uncovered pixels get `fill` [C]."""
    out = np.empty_like(x)
    out[...] = fill
    h, w = x.shape[1:3]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def shift_accuracies(config, model, variables, images, labels, max_shift: int) -> dict[int, float]:
    """{k: test accuracy on inputs shifted by k pixels (mean over 4 directions)}, k = 0..max."""
    apply = jax.jit(lambda x: model.apply(variables, x, train=False))
    x = np.asarray(predict.preprocess_for_model(config, images))  # as the model sees them
    fill = np.asarray(predict.preprocess_for_model(config, np.zeros_like(images[:1])))[0, 0, 0]

    def accuracy(xs: np.ndarray) -> float:
        predictions = np.concatenate(
            [np.asarray(apply(xs[i : i + 1000])).argmax(-1) for i in range(0, len(xs), 1000)]
        )
        return float((predictions == labels).mean())

    table = {0: accuracy(x)}
    for k in range(1, max_shift + 1):
        moves = [(0, k), (0, -k), (k, 0), (-k, 0)]
        table[k] = float(np.mean([accuracy(shift(x, dy, dx, fill)) for dy, dx in moves]))
    return table


def markdown(rows: list[dict], max_shift: int) -> str:
    head = ["model", "parameters", "test accuracy"] + [
        f"shift {k}px" for k in range(1, max_shift + 1)
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['parameters']:,}", f"{r['shift_accuracy']['0']:.4f}"]
        cells += [f"{r['shift_accuracy'][str(k)]:.4f}" for k in range(1, max_shift + 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="output folder (default: checkpoints/mlp_vs_cnn/DATASET)")
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--max-shift", type=int, default=4, help="largest shift in pixels")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-steps", type=int, help="stop each training run after N steps")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or f"checkpoints/mlp_vs_cnn/{args.dataset}")
    max_shift = args.max_shift

    rows = []
    for name, config in configs(args.dataset, args.overrides).items():
        run_dir = workdir / config.experiment
        print(f"training {name} in {run_dir}")
        results = train_and_evaluate(config, run_dir, max_steps=args.max_steps)
        model, variables, config = load(run_dir, "latest")
        images, labels = load_split_arrays(config.dataset.name, "test", config=config)
        table = shift_accuracies(config, model, variables, images, labels, max_shift)
        rows.append(
            {
                "model": name,
                "parameters": int(results["num_params"]),
                "steps": int(results["steps"]),
                "wall_time_s": round(float(results["wall_time_s"]), 1),
                "shift_accuracy": {str(k): round(v, 4) for k, v in table.items()},
            }
        )

    summary = {"dataset": args.dataset, "max_shift": max_shift, "models": rows}
    (workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(rows, max_shift)
    (workdir / "results.md").write_text(
        f"MLP vs CNN on {args.dataset}: test accuracy on images shifted by k pixels "
        "(mean over 4 directions)\n\n" + table
    )
    plot = viz.plot_shift_robustness(
        {r["model"]: r["shift_accuracy"] for r in rows}, workdir / "shift_robustness.png"
    )
    print(table, end="")
    print("wrote:", workdir / "results.json", workdir / "results.md", plot, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
