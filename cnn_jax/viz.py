"""Pictures of filters, feature maps, images, training curves and results, written as PNG files.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).
Every `plot_*` function creates the parent folder, writes one PNG and returns its path.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _grid(n: int, ncols: int | None = None) -> tuple[int, int]:
    ncols = ncols or min(n, 8)
    return math.ceil(n / ncols), ncols


def _display(image: Any) -> tuple[np.ndarray, str | None]:
    """An image [H, W], [H, W, 1] or [H, W, 3] scaled to [0, 1] for imshow, and its colour map."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"image: expected shape [H, W], [H, W, 1] or [H, W, 3], got {a.shape}")
    lo, hi = (float(v) for v in np.percentile(a, [0.5, 99.5]))  # robust to a few outliers
    a = np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)
    return a, ("gray" if a.ndim == 2 else None)


def _show(ax, image: Any, title: str | None = None) -> None:
    a, cmap = _display(image)
    ax.imshow(a, cmap=cmap, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def plot_image_grid(
    images: Sequence[Any],
    titles: Sequence[str] | None,
    path: str | Path,
    *,
    ncols: int | None = None,
    suptitle: str | None = None,
) -> Path:
    """Images (each [H, W], [H, W, 1] or [H, W, 3], any range, scaled per image) in a grid.

    The figure's tiles take the aspect ratio of the first image."""
    if len(images) == 0:
        raise ValueError("plot_image_grid: no images given")
    titles = list(titles) if titles is not None else [None] * len(images)
    if len(titles) != len(images):
        raise ValueError(f"plot_image_grid: {len(images)} images but {len(titles)} titles")
    nrows, ncols = _grid(len(images), ncols)
    h, w = np.shape(images[0])[:2]
    tile = 2.0 if w <= h else 3.0
    fig = _new_figure(tile * ncols, (tile * h / w + 0.3) * nrows + (0.4 if suptitle else 0))
    for i, (image, title) in enumerate(zip(images, titles)):
        _show(fig.add_subplot(nrows, ncols, i + 1), image, title)
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)


def plot_filters(
    kernel: Any, path: str | Path, *, max_filters: int = 64, title: str | None = None
) -> Path:
    """Convolution filters, one tile per output channel. kernel: [KH, KW, C_in, C_out] (HWIO).

    Three input channels are shown as RGB; otherwise each tile is the mean over input channels.
    """
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 4:
        raise ValueError(f"plot_filters: kernel must be [KH, KW, C_in, C_out], got shape {k.shape}")
    n = min(k.shape[3], max_filters)
    tiles = [k[:, :, :, o] if k.shape[2] == 3 else k[:, :, :, o].mean(axis=2) for o in range(n)]
    title = title or f"{k.shape[3]} filters {k.shape[0]}x{k.shape[1]}x{k.shape[2]}"
    return plot_image_grid(tiles, [str(o) for o in range(n)], path, suptitle=title)


def plot_feature_maps(
    activations: Mapping[str, Any],
    path: str | Path,
    *,
    max_channels: int = 8,
    title: str | None = None,
) -> Path:
    """One row per layer, showing its first `max_channels` channels.

    activations: layer name -> [H, W, C] (a leading batch axis of size 1 is dropped);
    vectors [C] (e.g. dense outputs) are drawn as a 1 x C strip.
    """
    rows = []
    for name, a in activations.items():
        a = np.asarray(a, dtype=np.float32)
        if a.ndim in (2, 4) and a.shape[0] == 1:
            a = a[0]
        if a.ndim == 1:
            rows.append((name, [a[None, :]], f"{name} {a.shape[0]}"))
        elif a.ndim == 3:
            c = min(a.shape[-1], max_channels)
            rows.append(
                (name, [a[:, :, i] for i in range(c)], f"{name} {'x'.join(map(str, a.shape))}")
            )
        else:
            raise ValueError(f"plot_feature_maps: {name!r} must be [H, W, C] or [C], got {a.shape}")
    if not rows:
        raise ValueError("plot_feature_maps: no activations given")
    ncols = max(len(maps) for _, maps, _ in rows)
    fig = _new_figure(1.6 * ncols + 1.5, 1.7 * len(rows))
    for r, (_, maps, label) in enumerate(rows):
        for c, m in enumerate(maps):
            ax = fig.add_subplot(len(rows), ncols, r * ncols + c + 1)
            _show(ax, m)
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def read_metrics(metrics_jsonl_path: str | Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per-epoch curves from a metrics.jsonl file: {'train'|'test': {'loss'|'accuracy': [(epoch, v)]}}.

    Accepts records with `split` and plain metric keys, or prefixed keys (`train_loss`,
    `test/accuracy`, `eval_accuracy`). The x value is the epoch when present (a fractional epoch
    e - 1 < x <= e counts as epoch e), else the step. Records of one epoch are averaged.
    """
    sums: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    with open(metrics_jsonl_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            x = record.get("epoch", record.get("step"))
            if not isinstance(x, (int, float)):
                continue
            if "epoch" in record:
                x = math.ceil(x - 1e-9)  # records during epoch e (fractional epochs) count as e
            split = record.get("split")
            for key, value in record.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                s, metric = split, key
                for sep in ("/", "_"):
                    head, _, tail = key.partition(sep)
                    if tail and head in ("train", "test", "eval"):
                        s, metric = head, tail
                        break
                s = "test" if s == "eval" else s
                if s in ("train", "test") and metric in ("loss", "accuracy"):
                    sums[s][metric][float(x)].append(float(value))
    return {
        s: {m: sorted((x, float(np.mean(v))) for x, v in points.items()) for m, points in d.items()}
        for s, d in sums.items()
    }


def plot_training_curves(metrics_jsonl_path: str | Path, path: str | Path) -> Path:
    """Loss and accuracy per epoch, train vs test, from a run's metrics.jsonl."""
    curves = read_metrics(metrics_jsonl_path)
    if not curves:
        raise ValueError(f"no train/test loss or accuracy records in {str(metrics_jsonl_path)!r}")
    fig = _new_figure(10, 4)
    for i, metric in enumerate(("loss", "accuracy")):
        ax = fig.add_subplot(1, 2, i + 1)
        for split, style in (("train", "-o"), ("test", "-s")):
            points = curves.get(split, {}).get(metric)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_probabilities(
    probs: Sequence[float],
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Class probabilities as horizontal bars. probs: [num_classes]."""
    p = np.asarray(probs, dtype=np.float32).reshape(-1)
    if len(p) != len(class_names):
        raise ValueError(
            f"plot_probabilities: {len(p)} probabilities but {len(class_names)} class names"
        )
    fig = _new_figure(5, 0.3 * len(p) + 1)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(p)), p, color=["C1" if i == p.argmax() else "C0" for i in range(len(p))])
    ax.set_yticks(range(len(p)), [str(n) for n in class_names])
    ax.invert_yaxis()
    for i, v in enumerate(p):
        ax.text(min(v, 0.85) + 0.01, i, f"{v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_shift_robustness(table: Mapping[str, Mapping[Any, float]], path: str | Path) -> Path:
    """Test accuracy against translation. table: model name -> {shift in pixels: accuracy}."""
    if not table:
        raise ValueError("plot_shift_robustness: empty table")
    fig = _new_figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    for name, row in table.items():
        points = sorted((int(k), float(v)) for k, v in row.items())
        xs, ys = zip(*points)
        ax.plot(xs, ys, "-o", label=name)
    ax.set_xlabel("shift (pixels)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
