"""Hand-set filters from the CNN guides applied to real images, and conv output sizes.

    python experiments/filters.py [--workdir checkpoints/filters]

Applies Sobel-x/y, edge (Laplacian), sharpen and blur kernels with `cnn_jax.ops.conv2d` to a
real handwritten digit (MNIST when prepared for tfds, else scikit-learn's digits) and to a photo
that ships with scikit-learn (china.jpg), saving the input/output grids. Then compares the output
sizes of stride 1 vs 2 and padding 0 vs 1 with the formula floor((n + 2p - k) / s) + 1.
Writes filters_digit.png, filters_photo.png, output_sizes.md and output_sizes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cnn_jax import filters, ops, viz
from cnn_jax.errors import CnnJaxError

KERNELS = ["sobel_x", "sobel_y", "edge_detect", "sharpen", "gaussian_blur", "box_blur"]


def load_digit() -> tuple[np.ndarray, str]:
    """A test digit as float32 [H, W] in [0, 1], and where it came from."""
    try:
        from cnn_jax.data import load_split_arrays

        images, labels = load_split_arrays("mnist", "test")
        i = int(np.flatnonzero(labels == 8)[0])
        return images[i, :, :, 0] / np.float32(255), f"MNIST test image {i} (an 8)"
    except (ImportError, CnnJaxError):  # MNIST not prepared: use the embedded digits
        from sklearn.datasets import load_digits

        digits = load_digits()
        i = int(np.flatnonzero(digits.target == 8)[0])
        return digits.images[i].astype(np.float32) / 16, f"sklearn digits image {i} (an 8)"


def load_photo() -> np.ndarray:
    """scikit-learn's china.jpg as grayscale float32 [427, 640] in [0, 1]."""
    from sklearn.datasets import load_sample_image

    rgb = load_sample_image("china.jpg").astype(np.float32) / 255
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def filter_grid(image: np.ndarray, title: str, path: Path) -> Path:
    outputs = [np.asarray(filters.apply_filter(image, name)) for name in KERNELS]
    # Sharpen and blur give images again: show them in the input's [0, 1] range, clipped.
    # Edge filters give signed responses: shown scaled (mid-grey = 0).
    outputs = [
        o.clip(0, 1) if "blur" in n or n == "sharpen" else o for n, o in zip(KERNELS, outputs)
    ]
    return viz.plot_image_grid(
        [image, *outputs], ["input", *KERNELS], path, ncols=4, suptitle=title
    )


def output_sizes(sizes: dict[str, tuple[int, int]], kernel: int = 3) -> list[dict]:
    """Actual conv2d output shapes vs `ops.conv_output_size` vs the guides' formula."""
    rows = []
    for name, (h, w) in sizes.items():
        x = np.zeros((1, h, w, 1), np.float32)
        k = np.zeros((kernel, kernel, 1, 1), np.float32)
        for stride in (1, 2):
            for padding in (0, 1):
                actual = ops.conv2d(x, k, stride=stride, padding=padding).shape[1:3]
                rows.append(
                    {
                        "input": name,
                        "n": f"{h}x{w}",
                        "kernel": kernel,
                        "stride": stride,
                        "padding": padding,
                        "formula": "x".join(
                            str((n + 2 * padding - kernel) // stride + 1) for n in (h, w)
                        ),
                        "conv_output_size": "x".join(
                            str(ops.conv_output_size(n, kernel, stride, padding)) for n in (h, w)
                        ),
                        "conv2d": "x".join(map(str, actual)),
                    }
                )
    return rows


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="checkpoints/filters", help="output folder")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    digit, source = load_digit()
    photo = load_photo()
    written = [
        filter_grid(digit, source, workdir / "filters_digit.png"),
        filter_grid(photo, "china.jpg (scikit-learn sample image)", workdir / "filters_photo.png"),
    ]
    rows = output_sizes({"digit": digit.shape, "photo": photo.shape})
    assert all(r["formula"] == r["conv_output_size"] == r["conv2d"] for r in rows)
    table = markdown_table(rows)
    (workdir / "output_sizes.md").write_text(
        "Output size of a 3x3 convolution: floor((n + 2p - k) / s) + 1\n\n" + table
    )
    (workdir / "output_sizes.json").write_text(json.dumps(rows, indent=2) + "\n")
    written += [workdir / "output_sizes.md", workdir / "output_sizes.json"]
    print(table, end="")
    print("wrote:", *written, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
