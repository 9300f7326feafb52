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
    if n < k.shape[3]:
        title += f" (first {n} of {k.shape[3]} filters)"
    return plot_image_grid(tiles, [str(o) for o in range(n)], path, suptitle=title)


def plot_feature_maps(
    activations: Mapping[str, Any],
    path: str | Path,
    *,
    max_channels: int = 8,
    title: str | None = None,
) -> Path:
    """One row per layer, showing its first `max_channels` channels; the row's label gives the
    layer's shape and, when channels are left out, how many are shown ('8 of 16 channels').

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
            label = f"{name} {'x'.join(map(str, a.shape))}"
            if c < a.shape[-1]:
                label += f"\n{c} of {a.shape[-1]} channels"
            rows.append((name, [a[:, :, i] for i in range(c)], label))
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


def _read_curves(metrics_jsonl_path: str | Path) -> tuple[dict, str]:
    """(read_metrics' curves, the x axis's unit: 'epoch' or 'step')."""
    sums: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    units = set()
    # errors="replace": a damaged (non-UTF-8) line is skipped below like any other bad line
    with open(metrics_jsonl_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if not isinstance(record, dict):
                continue
            unit = "epoch" if "epoch" in record else "step"
            x = record.get(unit)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
                continue
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
                    units.add(unit)
    curves = {
        s: {m: sorted((x, float(np.mean(v))) for x, v in points.items()) for m, points in d.items()}
        for s, d in sums.items()
    }
    return curves, ("step" if units == {"step"} else "epoch")


def read_metrics(metrics_jsonl_path: str | Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Curves from a metrics.jsonl file: {'train'|'test': {'loss'|'accuracy': [(x, value)]}}.

    Accepts records with `split` and plain metric keys, or prefixed keys (`train_loss`,
    `test/accuracy`, `eval_accuracy`). x is the record's own epoch, fractional as logged (a
    record after 0.64 epochs is at x = 0.64, not rounded to an epoch), else its step. Records
    with the same split and x are averaged; lines that are not JSON objects are skipped.
    """
    return _read_curves(metrics_jsonl_path)[0]


def _run_title(metrics_jsonl_path: Path) -> str:
    """'EXPERIMENT (MODEL on DATASET)' from the config.json beside metrics.jsonl, else the name
    of the folder that holds it."""
    folder = metrics_jsonl_path.resolve().parent
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        experiment = str(config.get("experiment") or folder.name)
        model, dataset = config["model"]["name"], config["dataset"]["name"]
        return f"{experiment} ({model} on {dataset})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return folder.name


def plot_training_curves(
    metrics_jsonl_path: str | Path, path: str | Path, *, title: str | None = None
) -> Path:
    """Loss and accuracy, train vs test, from a run's metrics.jsonl, each logged point at its
    own (fractional) epoch; the points are drawn as markers, so a single point shows.

    title: default: the run's experiment, model and dataset from the config.json beside the
    metrics file (else that folder's name), and how far it got ('0.64 epochs').
    """
    metrics_jsonl_path = Path(metrics_jsonl_path)
    curves, unit = _read_curves(metrics_jsonl_path)
    if not curves:
        raise ValueError(f"no train/test loss or accuracy records in {str(metrics_jsonl_path)!r}")
    if title is None:
        last = max(x for d in curves.values() for points in d.values() for x, _ in points)
        title = f"{_run_title(metrics_jsonl_path)}: {last:.4g} {unit}{'s' if last != 1 else ''}"
    fig = _new_figure(10, 4.4)
    for i, metric in enumerate(("loss", "accuracy")):
        ax = fig.add_subplot(1, 2, i + 1)
        for split, marker in (("train", "o"), ("test", "s")):
            points = curves.get(split, {}).get(metric)
            if points:
                xs, ys = zip(*points)
                size = 5 if len(points) <= 60 else 2  # many points: the line carries the shape
                ax.plot(xs, ys, "-" + marker, markersize=size, label=split)
        ax.set_xlim(left=0)
        ax.set_xlabel(unit)
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def plot_probabilities(
    probs: Sequence[float],
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
    max_classes: int = 20,
) -> Path:
    """Class probabilities as horizontal bars. probs: [num_classes].

    Up to `max_classes` classes are drawn in class order; with more (ImageNet's 1000), the
    `max_classes` most probable, highest first, and the title says so ('top 20 of 1000 classes').
    """
    p = np.asarray(probs, dtype=np.float32).reshape(-1)
    if len(p) != len(class_names):
        raise ValueError(
            f"plot_probabilities: {len(p)} probabilities but {len(class_names)} class names"
        )
    shown = np.arange(len(p))
    if len(p) > max_classes:
        shown = np.argsort(-p, kind="stable")[:max_classes]
        note = f"top {max_classes} of {len(p)} classes"
        title = f"{title} ({note})" if title else note
    fig = _new_figure(5, 0.3 * len(shown) + 1)
    ax = fig.add_subplot(1, 1, 1)
    best = int(p.argmax())
    ax.barh(range(len(shown)), p[shown], color=["C1" if i == best else "C0" for i in shown])
    ax.set_yticks(range(len(shown)), [str(class_names[i]) for i in shown])
    ax.invert_yaxis()
    for row, v in enumerate(p[shown]):
        ax.text(min(v, 0.85) + 0.01, row, f"{v:.3f}", va="center", fontsize=8)
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
