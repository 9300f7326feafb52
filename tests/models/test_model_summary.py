"""Keras-style summaries and parameter counting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.errors import ShapeError
from cnn_jax.models import get_model
from cnn_jax.models.summary import count_params, model_summary, summary_rows


def test_count_params_on_arrays_shapes_and_empty_trees():
    tree = {"a": np.zeros((3, 4)), "b": [jnp.ones(5), jax.ShapeDtypeStruct((2, 2, 2), jnp.float32)]}
    assert count_params(tree) == 12 + 5 + 8
    assert count_params({}) == 0


def test_lenet5_summary_text():
    text = model_summary(get_model("lenet5", num_classes=10), (28, 28, 1))
    lines = text.splitlines()
    assert lines[0] == 'Model: "LeNet5"   input [1, 28, 28, 1]'
    assert lines[2].split() == ["Layer", "(path)", "Type", "Output", "shape", "Param", "#"]
    body = [line.split("  ") for line in lines[4:-5]]
    table = [[cell.strip() for cell in row if cell.strip()] for row in body]
    assert table == [
        ["block1", "ConvBlock", "[1, 14, 14, 6]", "156"],
        ["conv1", "Conv", "[1, 28, 28, 6]", "156"],
        ["pool", "Pool", "[1, 14, 14, 6]", "0"],
        ["block2", "ConvBlock", "[1, 5, 5, 16]", "2,416"],
        ["conv1", "Conv", "[1, 10, 10, 16]", "2,416"],
        ["pool", "Pool", "[1, 5, 5, 16]", "0"],
        ["head", "DenseHead", "[1, 10]", "59,134"],
        ["hidden1", "Dense", "[1, 120]", "48,120"],
        ["hidden2", "Dense", "[1, 84]", "10,164"],
        ["logits", "Dense", "[1, 10]", "850"],
    ]
    assert lines[-4:] == [
        "Output shape: [1, 10]",
        "Total params: 61,706 (0.24 MiB)",
        "Trainable params: 61,706",
        "Non-trainable params: 0",
    ]


def test_rows_depth_batch_size_and_batchnorm_totals():
    model = get_model("resnet18", num_classes=1000)
    rows, totals = summary_rows(model, (224, 224, 3), batch_size=4, depth=1)
    assert [row.path for row in rows][:3] == ["conv1", "bn1", "maxpool"]
    assert rows[-1].path == "fc" and rows[-1].output_shape == (4, 1000)
    assert all(row.depth == 1 for row in rows)
    assert sum(row.params for row in rows) == totals["params"] == 11_689_512
    bn_stats = 2 * (64 + 2 * (64 * 2 + 128 * 2 + 256 * 2 + 512 * 2) + 128 + 256 + 512)
    assert totals["non_trainable"] == bn_stats  # running mean + var per BatchNorm channel
    assert totals["input_shape"] == (4, 224, 224, 3)


def test_big_model_summary_allocates_nothing_and_shows_the_total():
    text = model_summary(get_model("vgg19", num_classes=1000), (224, 224, 3), depth=1)
    assert "Total params: 143,667,240" in text
    block5 = next(line for line in text.splitlines() if line.startswith("block5 "))
    assert block5.split()[1:] == ["ConvBlock", "[1,", "7,", "7,", "512]", "9,439,232"]


def test_summary_of_too_small_input_raises_shape_error():
    with pytest.raises(ShapeError, match="block5/pool"):
        model_summary(get_model("vgg11", num_classes=10), (28, 28, 1))
