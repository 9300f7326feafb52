import json

import numpy as np
import pytest
from PIL import Image

from cnn_jax import viz

rng = np.random.default_rng(0)


def assert_png(path):
    assert path.exists()
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        assert im.size[0] > 50 and im.size[1] > 50


@pytest.mark.parametrize("c_in", [1, 3, 6])
def test_plot_filters(tmp_path, c_in):
    out = viz.plot_filters(rng.normal(size=(5, 5, c_in, 6)), tmp_path / "sub" / "filters.png")
    assert out == tmp_path / "sub" / "filters.png"
    assert_png(out)


def test_plot_filters_rejects_wrong_rank(tmp_path):
    with pytest.raises(ValueError, match="KH, KW, C_in, C_out"):
        viz.plot_filters(np.zeros((5, 5, 6)), tmp_path / "f.png")


def test_plot_feature_maps(tmp_path):
    acts = {
        "conv1": rng.normal(size=(1, 28, 28, 6)),
        "pool1": rng.normal(size=(14, 14, 6)),
        "conv2": rng.normal(size=(10, 10, 16)),
        "logits": rng.normal(size=(10,)),
    }
    assert_png(viz.plot_feature_maps(acts, tmp_path / "maps.png", max_channels=4))


def test_plot_image_grid(tmp_path):
    images = [rng.integers(0, 255, (8, 8)), rng.random((16, 16, 1)), rng.random((20, 30, 3))]
    assert_png(viz.plot_image_grid(images, ["a", "b", "c"], tmp_path / "grid.png"))
    with pytest.raises(ValueError, match="titles"):
        viz.plot_image_grid(images, ["a"], tmp_path / "bad.png")


def test_plot_training_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = []
    for epoch in range(1, 4):
        lines.append(
            {"step": epoch * 10, "epoch": epoch, "train_loss": 1 / epoch, "train_accuracy": 0.5}
        )
        lines.append(
            {
                "step": epoch * 10,
                "epoch": epoch,
                "split": "test",
                "loss": 1.2 / epoch,
                "accuracy": 0.4,
            }
        )
    metrics.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"cut short')
    curves = viz.read_metrics(metrics)
    assert curves["train"]["loss"] == [(1.0, 1.0), (2.0, 0.5), (3.0, 1 / 3)]
    assert [y for _, y in curves["test"]["accuracy"]] == [0.4, 0.4, 0.4]
    assert_png(viz.plot_training_curves(metrics, tmp_path / "curves.png"))


def test_plot_training_curves_empty(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no train/test"):
        viz.plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")


def test_plot_probabilities(tmp_path):
    p = rng.random(10)
    assert_png(viz.plot_probabilities(p / p.sum(), [str(i) for i in range(10)], tmp_path / "p.png"))


def test_plot_shift_robustness(tmp_path):
    table = {"mlp": {0: 0.97, 1: 0.8, 2: 0.5}, "cnn": {"0": 0.99, "1": 0.98, "2": 0.9}}
    assert_png(viz.plot_shift_robustness(table, tmp_path / "shift.png"))


def test_read_metrics_keeps_fractional_epochs(tmp_path):
    """Train records logged mid-epoch (the engine's format) stay at their own fractional epoch
    (they were rounded up to the next whole epoch: 0.64 epochs plotted at 1.00)."""
    records = [
        {"step": 5, "split": "train", "epoch": 0.5, "loss": 2.0, "accuracy": 0.2},
        {"step": 10, "split": "train", "epoch": 1.0, "loss": 1.0, "accuracy": 0.4},
        {"step": 10, "split": "test", "epoch": 1.0, "loss": 1.5, "accuracy": 0.3},
        {"step": 15, "split": "train", "epoch": 1.5, "loss": 0.5, "accuracy": 0.8},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = viz.read_metrics(path)
    assert curves["train"]["loss"] == [(0.5, 2.0), (1.0, 1.0), (1.5, 0.5)]
    assert curves["test"]["accuracy"] == [(1.0, 0.3)]


def test_read_metrics_skips_damaged_lines(tmp_path):
    """A line that is JSON but not an object, or not UTF-8, is skipped like a cut-short line
    (a list raised AttributeError; a non-UTF-8 byte a UnicodeDecodeError: no curves at all)."""
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"step": 3, "split": "train", "epoch": 0.25, "loss": 2.0}).encode()
    path.write_bytes(b"[1, 2]\n7\n" + b'{"step": 1, "loss": "\xff\xfe"}\n' + good + b"\n")
    assert viz.read_metrics(path) == {"train": {"loss": [(0.25, 2.0)]}}


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib Figures the plot functions save, in order (to check what they draw)."""
    saved, real_save = [], viz._save

    def save(fig, path):
        saved.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(viz, "_save", save)
    return saved


def engine_records(epoch, step=16):
    """What the training engine logs at `epoch` (fractional): a train and a test record."""
    return [
        {"step": step, "split": "train", "epoch": epoch, "loss": 2.1, "accuracy": 0.3},
        {"step": step, "split": "test", "epoch": epoch, "loss": 2.0, "accuracy": 0.35},
    ]


def test_training_curves_after_part_of_an_epoch(tmp_path, figures):
    """After 0.64 epochs the single points sit at x = 0.64 (they were drawn at 1.00), as visible
    markers, under a title naming the run; the axis starts at 0."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = {"experiment": "lenet5_digits", "model": {"name": "lenet5"}}
    (workdir / "config.json").write_text(json.dumps({**config, "dataset": {"name": "digits"}}))
    (workdir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in engine_records(0.64))
    )
    assert_png(viz.plot_training_curves(workdir / "metrics.jsonl", tmp_path / "curves.png"))
    (fig,) = figures
    assert fig._suptitle.get_text() == "lenet5_digits (lenet5 on digits): 0.64 epochs"
    loss_ax, accuracy_ax = fig.axes
    for ax, values in ((loss_ax, {"train": 2.1, "test": 2.0}), (accuracy_ax, {})):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"train", "test"}
        for line in lines.values():
            assert list(line.get_xdata()) == [0.64]
            assert line.get_marker() not in (None, "", "None", " ") and line.get_markersize() >= 4
        for split, value in values.items():
            assert list(lines[split].get_ydata()) == [value]
        assert ax.get_xlabel() == "epoch"
        assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 0.64


def test_training_curves_x_is_each_points_own_epoch(tmp_path, figures):
    """Points logged every 0.25 epoch are plotted at 0.25, 0.5, ... (not binned per epoch);
    without a config.json the title names the folder; steps when records have no epoch."""
    records = [r for e in (0.25, 0.5, 0.75, 1.0, 1.25) for r in engine_records(e)]
    metrics = tmp_path / "my_run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    viz.plot_training_curves(metrics, tmp_path / "curves.png")
    viz.plot_training_curves(metrics, tmp_path / "curves2.png", title="mine")
    for line in figures[0].axes[0].get_lines():
        assert list(line.get_xdata()) == [0.25, 0.5, 0.75, 1.0, 1.25]
    assert figures[0]._suptitle.get_text() == "my_run: 1.25 epochs"
    assert figures[1]._suptitle.get_text() == "mine"
    metrics.write_text(json.dumps({"step": 40, "train_loss": 1.0}) + "\n")
    viz.plot_training_curves(metrics, tmp_path / "curves3.png")
    ax = figures[2].axes[0]
    assert ax.get_xlabel() == "step" and list(ax.get_lines()[0].get_xdata()) == [40]
    assert figures[2]._suptitle.get_text() == "my_run: 40 steps"


def row_labels(fig):
    return [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]


def test_feature_maps_say_how_many_channels_they_show(tmp_path, figures):
    """A layer with more channels than shown says '8 of 16 channels' (it showed 8 silently)."""
    acts = {
        "input": rng.normal(size=(32, 32, 1)),
        "conv1": rng.normal(size=(28, 28, 6)),
        "conv2": rng.normal(size=(1, 10, 10, 16)),
    }
    viz.plot_feature_maps(acts, tmp_path / "maps.png", title="test image 3")
    (fig,) = figures
    assert row_labels(fig) == ["input 32x32x1", "conv1 28x28x6", "conv2 10x10x16\n8 of 16 channels"]
    assert len(fig.axes) == 1 + 6 + 8


def test_filters_and_probabilities_say_what_they_leave_out(tmp_path, figures):
    """96 filters show 64 'first 64 of 96'; 1000 classes show the 20 most probable 'top 20 of
    1000' (a 1000-bar, 300-inch-tall picture before), the most probable first."""
    viz.plot_filters(rng.normal(size=(3, 3, 3, 96)), tmp_path / "f.png", title="conv1")
    assert figures[0]._suptitle.get_text() == "conv1 (first 64 of 96 filters)"
    viz.plot_filters(rng.normal(size=(3, 3, 3, 6)), tmp_path / "g.png", title="conv1")
    assert figures[1]._suptitle.get_text() == "conv1"
    p = rng.random(1000)
    viz.plot_probabilities(p, [f"c{i}" for i in range(1000)], tmp_path / "p.png", title="img")
    ax = figures[2].axes[0]
    assert ax.get_title() == "img (top 20 of 1000 classes)"
    top = np.argsort(-p)[:20]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"c{i}" for i in top]
    assert [bar.get_width() for bar in ax.patches] == pytest.approx(p[top])
    viz.plot_probabilities(p[:10], [str(i) for i in range(10)], tmp_path / "q.png")
    ax = figures[3].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(10)]


@pytest.fixture
def laid_out(monkeypatch):
    """The Figures the understanding pictures save (constrained layout), in order."""
    saved, real_save = [], viz._save_laid_out

    def save(fig, path):
        saved.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(viz, "_save_laid_out", save)
    return saved


def test_channel_pages_show_every_channel_before_and_after_the_activation(tmp_path, laid_out):
    """20 channels at 8 a page: 3 pages, every channel once per version, each tile numbered,
    a colour bar per version: diverging around 0 before the ReLU, from 0 after it."""
    before = rng.normal(size=(1, 6, 6, 20))
    maps = {"conv1": before, "conv1:act": np.maximum(before, 0)}
    paths = viz.plot_channel_pages(maps, tmp_path / "conv1.png", per_page=8, title="image 3")
    assert [p.name for p in paths] == [f"conv1-page{i}.png" for i in (1, 2, 3)]
    for path in paths:
        assert_png(path)
    shown = {}
    for page, fig in enumerate(laid_out):
        heading, *versions = fig.subfigs
        assert heading.texts[0].get_text() == (
            f"image 3: channels {8 * page}-{min(8 * page + 7, 19)} of 20 (page {page + 1} of 3)"
        )
        for version, name in zip(versions, maps):
            assert version._suptitle.get_text() == f"{name}  6x6x20"
            tiles = [ax for ax in version.axes if ax.get_visible() and ax.images and ax.get_title()]
            shown.setdefault(name, []).extend(int(ax.get_title()) for ax in tiles)
            (bar,) = [ax for ax in version.axes if not ax.get_title()]  # the colour bar
            low, high = tiles[0].images[0].get_clim()
            assert (low < 0 and low == -high) if name == "conv1" else low == 0
            assert bar.get_ylim() == pytest.approx((low, high))
    assert shown == {"conv1": list(range(20)), "conv1:act": list(range(20))}
    path = tmp_path / "one.png"
    assert viz.plot_channel_pages({"c": before[0, :, :, :5]}, path) == [path]
    with pytest.raises(ValueError, match="one C"):
        viz.plot_channel_pages({"a": before, "b": before[..., :4]}, tmp_path / "x.png")


def test_dense_layers_overlays_occlusion_patches_and_fields(tmp_path, laid_out):
    path = viz.plot_dense_layers(
        {"hidden": rng.normal(size=(1, 12)), "logits": np.arange(3.0)}, tmp_path / "dense.png",
        class_names=["a", "b", "c"],
    )  # fmt: skip
    assert_png(path)
    image = rng.random((16, 16, 1))
    maps = {"saliency": rng.random((16, 16)), "signed": rng.normal(size=(16, 16))}
    assert_png(
        viz.plot_overlays(image, maps, tmp_path / "o.png", colorbar_labels={"saliency": "|g|"})
    )
    fig = laid_out[-1]
    assert [ax.get_title() for ax in fig.axes[:1]] == ["input"]
    assert "|g|" in [ax.get_ylabel() for ax in fig.axes]
    with pytest.raises(ValueError, match="map 'x' is"):
        viz.plot_overlays(image, {"x": np.zeros((8, 8))}, tmp_path / "bad.png")
    probs = np.ones((3, 3))
    probs[1, 2] = 0.25
    viz.plot_occlusion(image, probs, [0, 4, 8], [0, 4, 8], 8, 0.99, tmp_path / "occ.png",
                       class_name="7")  # fmt: skip
    left = laid_out[-1].axes[0]
    (square,) = left.patches
    assert square.get_xy() == (8 - 0.5, 4 - 0.5) and left.get_title().endswith("(0.250)")
    patches = [[rng.random((5, 5)), rng.random((3, 5))] for _ in range(3)]
    paths = viz.plot_top_patches(
        patches, tmp_path / "top.png", row_labels=["ch 0", "ch 1", "ch 2"], projections=patches,
        per_page=2,
    )  # fmt: skip
    assert [p.name for p in paths] == ["top-page1.png", "top-page2.png"]
    boxes = {"conv1": (3, 3, 8, 8), "conv2": (0, 0, 14, 14)}
    assert_png(viz.plot_receptive_fields(image, boxes, tmp_path / "rf.png"))
