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


def test_read_metrics_bins_fractional_epochs(tmp_path):
    """Train records logged mid-epoch (the engine's format) count towards the epoch they end."""
    records = [
        {"step": 5, "split": "train", "epoch": 0.5, "loss": 2.0, "accuracy": 0.2},
        {"step": 10, "split": "train", "epoch": 1.0, "loss": 1.0, "accuracy": 0.4},
        {"step": 10, "split": "test", "epoch": 1.0, "loss": 1.5, "accuracy": 0.3},
        {"step": 15, "split": "train", "epoch": 1.5, "loss": 0.5, "accuracy": 0.8},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = viz.read_metrics(path)
    assert curves["train"]["loss"] == [(1, 1.5), (2, 0.5)]
    assert curves["test"]["accuracy"] == [(1, 0.3)]
