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


# --------------------------------------------------------------------------------------------------
# Understanding a network: every channel of a layer, dense layers, overlays, top patches
# --------------------------------------------------------------------------------------------------


def _save_laid_out(fig: Figure, path: str | Path) -> Path:
    """`_save` for figures with a constrained layout, which places the titles and colour bars
    itself (a tight bounding box would measure every artist again: seconds for a grid)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _strip_batch(a: Any, ndim: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a[0] if a.ndim == ndim + 1 and a.shape[0] == 1 else a


def _colour_scale(a: np.ndarray) -> tuple[str, float, float]:
    """(colour map, vmin, vmax): signed values on a diverging map centred at 0, non-negative
    ones (rectified maps) from 0 on a sequential map."""
    lo, hi = float(np.min(a)), float(np.max(a))
    if lo < 0:
        m = max(-lo, hi, 1e-12)
        return "RdBu_r", -m, m
    return "magma", 0.0, max(hi, 1e-12)


def _page_paths(path: str | Path, pages: int) -> list[Path]:
    path = Path(path)
    if pages == 1:
        return [path]
    return [path.with_name(f"{path.stem}-page{p + 1}{path.suffix}") for p in range(pages)]


def plot_channel_pages(
    maps: Mapping[str, Any],
    path: str | Path,
    *,
    per_page: int = 64,
    ncols: int = 8,
    title: str | None = None,
) -> list[Path]:
    """Every channel of one layer, `per_page` channels to a page, for one or more versions of
    the layer's output side by side (e.g. {'block1/conv1': before, 'block1/conv1:act': after
    the activation}). maps: name -> [H, W, C] (a leading batch axis of 1 is dropped), all with
    the same C. Each version is drawn on one colour scale per page (a colour bar says which:
    signed values diverge from 0, rectified ones start at 0), each tile labelled by channel.

    Writes `path` when everything fits one page, else PATH-page1.png, PATH-page2.png, ...;
    returns the written paths."""
    arrays = {name: _strip_batch(a, 3) for name, a in maps.items()}
    if not arrays:
        raise ValueError("plot_channel_pages: no maps given")
    channels = {a.shape[-1] for a in arrays.values() if a.ndim == 3}
    if len(channels) != 1 or any(a.ndim != 3 for a in arrays.values()):
        shapes = {n: a.shape for n, a in arrays.items()}
        raise ValueError(f"plot_channel_pages: expected [H, W, C] maps with one C, got {shapes}")
    (c,) = channels
    per_page = max(1, int(per_page))
    pages = math.ceil(c / per_page)
    written = []
    for page, out in enumerate(_page_paths(path, pages)):
        first, last = page * per_page, min(c, (page + 1) * per_page)
        n = last - first
        nrows, cols = _grid(n, min(ncols, n))
        h, w = next(iter(arrays.values())).shape[:2]
        tile = 1.3 if cols > 4 else 1.8
        width, section_h = tile * cols + 1.0, (tile * h / w + 0.25) * nrows + 0.5
        fig = _new_figure(width, section_h * len(arrays) + 0.5)
        heading = f"channels {first}-{last - 1} of {c}" + (
            f" (page {page + 1} of {pages})" if pages > 1 else ""
        )
        # Placed by hand (a layout engine takes seconds for a grid): the first row holds the
        # page's heading, then one block per version, its tiles left and its colour bar right.
        subfigs = fig.subfigures(
            len(arrays) + 1, 1, height_ratios=[0.5] + [section_h] * len(arrays)
        )
        subfigs[0].text(
            0.5, 0.5, f"{title}: {heading}" if title else heading, ha="center", va="center",
            fontsize=11,
        )  # fmt: skip
        right = 1 - 0.9 / width
        for sub, (name, a) in zip(subfigs[1:], arrays.items()):
            cmap, vmin, vmax = _colour_scale(a[..., first:last])
            grid = {"left": 0.1 / width, "right": right, "bottom": 0.05 / section_h,
                    "top": 1 - 0.45 / section_h, "wspace": 0.08, "hspace": 0.25}  # fmt: skip
            axes = sub.subplots(nrows, cols, squeeze=False, gridspec_kw=grid)
            image = None
            for i, ax in enumerate(axes.flat):
                ax.set_xticks([])
                ax.set_yticks([])
                if i >= n:
                    ax.set_visible(False)
                    continue
                image = ax.imshow(
                    a[:, :, first + i], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
                )
                ax.set_title(str(first + i), fontsize=7, pad=2)
            bar = sub.add_axes((right + 0.25 / width, grid["bottom"] + 0.05, 0.12 / width, 0.7))
            sub.colorbar(image, cax=bar).ax.tick_params(labelsize=7)
            sub.suptitle(f"{name}  {h}x{w}x{c}", fontsize=9)
        written.append(_save_laid_out(fig, out))
    return written


def plot_dense_layers(
    values: Mapping[str, Any],
    path: str | Path,
    *,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Fully connected layers as bars, one row per layer, one bar per unit (its value for one
    image). values: name -> [D] (a leading batch axis of 1 is dropped). A layer with as many
    units as `class_names` is labelled with them and its largest unit highlighted."""
    rows = {name: _strip_batch(v, 1) for name, v in values.items()}
    if not rows or any(v.ndim != 1 for v in rows.values()):
        raise ValueError(
            f"plot_dense_layers: expected vectors [D], got { {n: v.shape for n, v in rows.items()} }"
        )
    width, height = max(6.0, min(16.0, 0.06 * max(map(len, rows.values())) + 4)), 1.9 * len(rows)
    fig = _new_figure(width, height + 0.4)
    fig.subplots_adjust(
        left=0.8 / width, right=1 - 0.2 / width, top=1 - 0.7 / (height + 0.4),
        bottom=0.35 / (height + 0.4), hspace=0.65,
    )  # fmt: skip
    for r, (name, v) in enumerate(rows.items()):
        ax = fig.add_subplot(len(rows), 1, r + 1)
        labelled = class_names is not None and len(class_names) == len(v)
        colours = ["C1" if labelled and i == int(v.argmax()) else "C0" for i in range(len(v))]
        ax.bar(np.arange(len(v)), v, color=colours, width=0.8)
        ax.axhline(0, color="k", linewidth=0.5)
        ax.set_xlim(-0.6, len(v) - 0.4)
        if labelled:
            ax.set_xticks(range(len(v)), [str(n) for n in class_names], fontsize=8)
        else:
            ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("value", fontsize=8)
        ax.set_title(f"{name}: {len(v)} units", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save_laid_out(fig, path)


def _image_for_overlay(image: Any) -> tuple[np.ndarray, str | None]:
    a, cmap = _display(_strip_batch(image, 3))
    return a, cmap


def plot_overlays(
    image: Any,
    maps: Mapping[str, Any],
    path: str | Path,
    *,
    title: str | None = None,
    alpha: float = 0.55,
    colorbar_labels: Mapping[str, str] | None = None,
) -> Path:
    """The image, then each map [H, W] drawn over it (colour = the map's value, with a colour
    bar labelled from `colorbar_labels`), side by side: saliency, SmoothGrad, Grad-CAM,
    occlusion sensitivity."""
    if not maps:
        raise ValueError("plot_overlays: no maps given")
    base, cmap = _image_for_overlay(image)
    labels = dict(colorbar_labels or {})
    n = len(maps) + 1
    fig = _new_figure(3.3 * n, 3.4)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, n, 1)
    ax.imshow(base, cmap=cmap, interpolation="nearest")
    ax.set_title("input", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for i, (name, m) in enumerate(maps.items()):
        m = np.asarray(m, np.float32)
        if m.shape != base.shape[:2]:
            raise ValueError(
                f"plot_overlays: map {name!r} is {m.shape}, the image {base.shape[:2]}"
            )
        ax = fig.add_subplot(1, n, i + 2)
        ax.imshow(
            base.mean(axis=-1) if base.ndim == 3 else base, cmap="gray", interpolation="nearest"
        )
        lo, hi = float(m.min()), float(m.max())
        if lo < 0:
            lim = max(-lo, hi, 1e-12)
            im = ax.imshow(
                m, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=alpha, interpolation="bilinear"
            )
        else:
            im = ax.imshow(
                m, cmap="jet", vmin=0, vmax=max(hi, 1e-12), alpha=alpha, interpolation="bilinear"
            )
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        if name in labels:
            bar.set_label(labels[name], fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_laid_out(fig, path)


def plot_occlusion(
    image: Any,
    probs: Any,
    tops: Sequence[int],
    lefts: Sequence[int],
    size: int,
    base: float,
    path: str | Path,
    *,
    class_name: str = "",
    title: str | None = None,
) -> Path:
    """Zeiler & Fergus' occlusion figure: the image with the grey square at the position that
    hurts most, and the class probability for every position of the square's centre (colour
    bar 0..1), unoccluded probability in the title."""
    base_img, cmap = _image_for_overlay(image)
    p = np.asarray(probs, np.float32)
    h, w = base_img.shape[:2]
    tops, lefts = np.asarray(tops), np.asarray(lefts)
    fig = _new_figure(7.6, 3.8)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(base_img, cmap=cmap, interpolation="nearest")
    i, j = np.unravel_index(int(p.argmin()), p.shape)
    from matplotlib.patches import Rectangle

    ax.add_patch(
        Rectangle((lefts[j] - 0.5, tops[i] - 0.5), size, size, facecolor="0.5", edgecolor="red")
    )
    ax.set_title(f"square {size}x{size} where p is lowest ({p.min():.3f})", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax = fig.add_subplot(1, 2, 2)
    half = (size - 1) / 2
    extent = (
        lefts[0] + half - 0.5,
        lefts[-1] + half + 0.5,
        tops[-1] + half + 0.5,
        tops[0] + half - 0.5,
    )
    ax.imshow(
        base_img.mean(axis=-1) if base_img.ndim == 3 else base_img,
        cmap="gray",
        extent=(-0.5, w - 0.5, h - 0.5, -0.5),
    )
    im = ax.imshow(
        p, cmap="jet", vmin=0, vmax=1, extent=extent, alpha=0.75, interpolation="nearest"
    )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(f"p({class_name}) with the square centred here", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(f"p({class_name})", fontsize=8)
    fig.suptitle(
        (f"{title}: " if title else "") + f"occlusion, p({class_name}) = {base:.3f} unoccluded",
        fontsize=10,
    )
    return _save_laid_out(fig, path)


def _signed_display(a: np.ndarray) -> np.ndarray:
    """A projection (gradient) [H, W, C] shown around mid-grey: 0.5 + a / (2 max|a|)."""
    a = np.asarray(a, np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    m = float(np.abs(a).max())
    return np.clip(0.5 + a / (2 * m), 0, 1) if m > 0 else np.full_like(a, 0.5)


def plot_top_patches(
    patches: Sequence[Sequence[Any]],
    path: str | Path,
    *,
    row_labels: Sequence[str],
    projections: Sequence[Sequence[Any]] | None = None,
    projection_name: str = "guided backprop",
    title: str | None = None,
    per_page: int = 16,
) -> list[Path]:
    """Zeiler & Fergus' figure: one row per channel, its top-k dataset patches (each cropped to
    the unit's receptive field; tiles labelled by rank) and, with `projections`, the same
    patches' projections to pixel space (mid-grey = 0). patches[row][j]: [h, w] or [h, w, C].
    Writes `per_page` rows per page (PATH-page1.png, ... when more); returns the paths."""
    if len(patches) == 0 or len(patches) != len(row_labels):
        raise ValueError(f"plot_top_patches: {len(patches)} rows but {len(row_labels)} labels")
    k = max(len(r) for r in patches)
    blocks = 2 if projections is not None else 1
    cols = k * blocks + (1 if blocks == 2 else 0)  # an empty column between the blocks
    pages = math.ceil(len(patches) / per_page)
    written = []
    for page, out in enumerate(_page_paths(path, pages)):
        rows = range(page * per_page, min(len(patches), (page + 1) * per_page))
        width, height = 1.0 * cols + 1.4, 1.05 * len(rows) + 0.9
        fig = _new_figure(width, height)
        fig.subplots_adjust(
            left=1.3 / width, right=1 - 0.1 / width, top=1 - 0.7 / height,
            bottom=0.1 / height, wspace=0.1, hspace=0.15,
        )  # fmt: skip
        for r_i, r in enumerate(rows):
            for j in range(k):
                for block in range(blocks):
                    col = j + block * (k + 1)
                    ax = fig.add_subplot(len(rows), cols, r_i * cols + col + 1)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if j >= len(patches[r]):
                        ax.set_visible(False)
                        continue
                    if block == 0:
                        a, cmap = _display(patches[r][j])
                        ax.imshow(a, cmap=cmap, interpolation="nearest")
                    else:
                        a = _signed_display(projections[r][j])
                        cmap = "gray" if a.ndim == 2 else None
                        ax.imshow(a, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                    if r_i == 0:
                        name = "patch" if block == 0 else projection_name
                        ax.set_title(f"{name} {j + 1}" if j == 0 else str(j + 1), fontsize=7)
                    if col == 0:
                        ax.set_ylabel(
                            row_labels[r], fontsize=8, rotation=0, ha="right", va="center"
                        )
        note = f"rows {rows[0] + 1}-{rows[-1] + 1} of {len(patches)}" if pages > 1 else ""
        heading = ", ".join(t for t in (title, note) if t)
        if heading:
            fig.suptitle(heading, fontsize=10)
        written.append(_save_laid_out(fig, out))
    return written


def plot_receptive_fields(
    image: Any, boxes: Mapping[str, Sequence[int]], path: str | Path, *, title: str | None = None
) -> Path:
    """The input with the region one unit of each layer sees drawn as a rectangle, labelled in
    the legend. boxes: label (e.g. 'block2/conv1 (14x14)') -> (top, left, bottom, right), bottom
    and right exclusive."""
    from matplotlib.patches import Rectangle

    base, cmap = _image_for_overlay(image)
    fig = _new_figure(5.5, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(base, cmap=cmap, interpolation="nearest")
    for i, (name, (top, left, bottom, right)) in enumerate(boxes.items()):
        ax.add_patch(
            Rectangle(
                (left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                edgecolor=f"C{i % 10}", linewidth=2,
                label=name,
            )
        )  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title="receptive field")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
