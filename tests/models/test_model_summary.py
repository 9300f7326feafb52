"""Keras-style summaries and parameter counting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.errors import ConfigError, ShapeError
from cnn_jax.models import get_model
from cnn_jax.models.summary import count_params, model_summary, summary_rows


def test_count_params_on_arrays_shapes_and_empty_trees():
    tree = {"a": np.zeros((3, 4)), "b": [jnp.ones(5), jax.ShapeDtypeStruct((2, 2, 2), jnp.float32)]}
    assert count_params(tree) == 12 + 5 + 8
    assert count_params({}) == 0


def table_of(text: str) -> list[list[str]]:
    """The body rows of a summary table, as lists of cells (cells are 2+ spaces apart)."""
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line and set(line) <= {"=", "-"}]
    body = lines[rules[1] + 1 : rules[2]]
    return [[cell.strip() for cell in row.split("  ") if cell.strip()] for row in body]


def test_lenet5_summary_text():
    text = model_summary(get_model("lenet5", num_classes=10), (28, 28, 1))
    lines = text.splitlines()
    assert lines[0] == 'Model: "LeNet5"   input [1, 28, 28, 1]'
    assert lines[2].split() == [
        "Layer", "(path)", "Type", "Output", "shape", "Param", "#", "RF", "Jump", "Start"
    ]  # fmt: skip
    # Receptive fields by hand: size += (k - 1) * jump, jump *= stride,
    # start += ((k - 1) / 2 - pad_low) * jump; conv1 pads 2 (SAME), conv2 none.
    assert table_of(text) == [
        ["block1", "ConvBlock", "[1, 14, 14, 6]", "156", "6", "2", "0.5"],
        ["conv1", "Conv", "[1, 28, 28, 6]", "156", "5", "1", "0"],
        ["pool", "Pool", "[1, 14, 14, 6]", "0", "6", "2", "0.5"],
        ["block2", "ConvBlock", "[1, 5, 5, 16]", "2,416", "16", "4", "5.5"],
        ["conv1", "Conv", "[1, 10, 10, 16]", "2,416", "14", "2", "4.5"],
        ["pool", "Pool", "[1, 5, 5, 16]", "0", "16", "4", "5.5"],
        ["head", "DenseHead", "[1, 10]", "59,134", "global"],
        ["hidden1", "Dense", "[1, 120]", "48,120", "global"],
        ["hidden2", "Dense", "[1, 84]", "10,164", "global"],
        ["logits", "Dense", "[1, 10]", "850", "global"],
    ]
    assert lines[-6:-2] == [
        "Output shape: [1, 10]",
        "Total params: 61,706 (0.24 MiB)",
        "Trainable params: 61,706",
        "Non-trainable params: 0",
    ]
    assert lines[-2].startswith("RF: input pixels a unit sees")
    plain = model_summary(get_model("lenet5", num_classes=10), (28, 28, 1), receptive_field=False)
    assert plain.splitlines()[2].split()[-2:] == ["Param", "#"]
    assert [row[:4] for row in table_of(text)] == table_of(plain)
    assert plain.splitlines()[-1] == "Non-trainable params: 0"


def test_mlp_summary_has_no_receptive_field_columns():
    text = model_summary(get_model("mlp", num_classes=10), (28, 28, 1))
    assert "RF" not in text.splitlines()[2] and "global" not in text


def test_lenet5_head_and_first_padding_options():
    # The guides' network after Harley: 32x32x1, six 5x5 filters (no padding) -> 28x28x6,
    # 2x2 max pool -> 14x14x6, sixteen 5x5 -> 10x10x16, pool -> 5x5x16 = 400, FC 120, 100, 10:
    # conv1 6*(5*5*1 + 1) = 156; conv2 16*(5*5*6 + 1) = 2,416; 400*120 + 120 = 48,120;
    # 120*100 + 100 = 12,100; 100*10 + 10 = 1,010; total 63,802.
    harley = get_model(
        "lenet5", num_classes=10, first_padding="VALID", pooling="max", hidden_features=(120, 100)
    )
    rows, totals = summary_rows(harley, (32, 32, 1))
    params = {row.path: row.params for row in rows}
    assert [params[k] for k in ("block1", "block2", "head/hidden1", "head/hidden2", "head/logits")] == [
        156, 2_416, 48_120, 12_100, 1_010
    ]  # fmt: skip
    assert totals["params"] == 63_802
    assert {row.path: row.output_shape for row in rows}["block1/conv1"] == (1, 28, 28, 6)
    # Today's default on 32x32 pads conv1 (SAME): 6x6x16 = 576 features, 576*120 + 120 = 69,240,
    # + 156 + 2,416 + 120*84 + 84 + 84*10 + 10 = 82,826.
    _, totals = summary_rows(get_model("lenet5", num_classes=10), (32, 32, 1))
    assert totals["params"] == 82_826
    # No hidden layers: 400*10 + 10 = 4,010 after the convs.
    _, totals = summary_rows(
        get_model("lenet5", num_classes=10, first_padding="VALID", hidden_features=()), (32, 32, 1)
    )
    assert totals["params"] == 156 + 2_416 + 4_010


def test_lenet5_default_variables_are_unchanged():
    variables = jax.eval_shape(
        get_model("lenet5", num_classes=10).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))
    )
    shapes = {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
    }
    assert shapes == {
        "params/block1/conv1/kernel": (5, 5, 1, 6),
        "params/block1/conv1/bias": (6,),
        "params/block2/conv1/kernel": (5, 5, 6, 16),
        "params/block2/conv1/bias": (16,),
        "params/head/hidden1/kernel": (400, 120),
        "params/head/hidden1/bias": (120,),
        "params/head/hidden2/kernel": (120, 84),
        "params/head/hidden2/bias": (84,),
        "params/head/logits/kernel": (84, 10),
        "params/head/logits/bias": (10,),
    }


def test_lenet5_options_from_a_config_and_its_json():
    from cnn_jax import config as config_lib

    config = config_lib.apply_overrides(
        config_lib.load_config("lenet5_digits"),
        ["model.options.first_padding=VALID", "model.options.hidden_features=120,100"],
    )
    saved = config_lib.config_from_json(config_lib.config_to_json(config))  # tuples become lists
    for c in (config, saved):
        model = get_model(c.model.name, num_classes=10, **c.model.options.to_dict())
        assert summary_rows(model, (32, 32, 1))[1]["params"] == 63_802


@pytest.mark.parametrize("widths", ["120,100", (120, 0), (120.0,), (True,), 120, None])
def test_bad_hidden_features(widths):
    with pytest.raises(ConfigError, match="hidden_features="):
        get_model("lenet5", num_classes=10, hidden_features=widths)


def test_cli_summary_options(capsys):
    from cnn_jax import cli

    args = ["summary", "lenet5", "--input-shape", "32,32,1", "--option", "first_padding=VALID"]
    assert cli.main([*args, "--option", "hidden_features=120,100"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 63,802" in out and "[1, 28, 28, 6]" in out
    assert ["hidden2", "Dense", "[1, 100]", "12,100", "global"] in table_of(out)
    assert cli.main([*args, "--option", "hidden_features=wide"]) == 2
    assert "hidden_features='wide' is not valid" in capsys.readouterr().err
    assert cli.main([*args, "--option", "widths=1"]) == 2
    assert "has no option(s) 'widths'" in capsys.readouterr().err
    assert cli.main([*args, "--option", "VALID"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


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
    block5 = next(row for row in table_of(text) if row[0] == "block5")
    # By hand: stages of 2, 2, 4, 4, 4 3x3 convs, each ending in a 2x2 pool: the pools see 6, 16,
    # 52, 124 and 268 pixels (jump 32, start 0.5 + 1 + 2 + 4 + 8 = 15.5).
    assert block5 == ["block5", "ConvBlock", "[1, 7, 7, 512]", "9,439,232", "268", "32", "15.5"]


def test_summary_of_too_small_input_raises_shape_error():
    with pytest.raises(ShapeError, match="block5/pool"):
        model_summary(get_model("vgg11", num_classes=10), (28, 28, 1))
