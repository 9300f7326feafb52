"""MLP vs CNN: the guides' argument for convolutions, measured.

    python experiments/mlp_vs_cnn.py [--workdir checkpoints/mlp_vs_cnn] [--dataset digits|mnist]
        [--max-shift K] [--set KEY=VALUE ...] [--max-steps N]

Trains LeNet-5 and an MLP of about the same parameter count with the same training budget (data,
epochs, batch size, optimizer and schedule; no shift augmentation), then measures test accuracy on the test images
translated by 0..K pixels (zero fill; the mean over shifts left, right, up and down). The CNN's
shared, local filters and pooling make it tolerate small shifts; the MLP's position-specific
weights do not. Writes results.json, results.md and shift_robustness.png to the workdir; each
model trains in its own sub-folder (re-running resumes and reuses them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_collections
import numpy as np

from cnn_jax import inference, viz
from cnn_jax.config import apply_overrides, load_config, validate_config
from cnn_jax.data import load_split_arrays
from cnn_jax.train import load_trained, train_and_evaluate

MLP_HIDDEN = [64, 32]  # ~ LeNet-5's 62k parameters on 28x28 or 32x32 inputs
DEFAULT_MAX_SHIFT = {"digits": 2, "mnist": 4}  # digits are 8x8: one pixel is 1/8 of the width


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


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate uint8 [N, H, W, C] images by (dy, dx) pixels, filling with zeros."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def accuracy(config, model, variables, images, labels, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        probs = inference.predict_probs(config, model, variables, images[i : i + batch])
        correct += int((probs.argmax(-1) == labels[i : i + batch]).sum())
    return correct / len(images)


def shift_accuracies(config, model, variables, images, labels, max_shift: int) -> dict[int, float]:
    table = {0: accuracy(config, model, variables, images, labels)}
    for k in range(1, max_shift + 1):
        moves = [(0, k), (0, -k), (k, 0), (-k, 0)]
        accs = [accuracy(config, model, variables, shift(images, *m), labels) for m in moves]
        table[k] = float(np.mean(accs))
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
    parser.add_argument("--workdir", default="checkpoints/mlp_vs_cnn", help="output folder")
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--max-shift", type=int, help="largest shift in pixels (digits 2, mnist 4)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-steps", type=int, help="stop each training run after N steps")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    max_shift = args.max_shift if args.max_shift is not None else DEFAULT_MAX_SHIFT[args.dataset]

    rows = []
    for name, config in configs(args.dataset, args.overrides).items():
        run_dir = workdir / config.experiment
        print(f"training {name} in {run_dir}")
        results = train_and_evaluate(config, run_dir, max_steps=args.max_steps)
        config, model, variables = load_trained(run_dir, "latest")
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
