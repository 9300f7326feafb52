"""The model registry: names, options, errors, and a cheap, TensorFlow-free import."""

import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import pytest

from cnn_jax.errors import ConfigError
from cnn_jax.models import available, get_model, model_options

EXPECTED_NAMES = {
    "lenet5",
    "simple_convnet",
    "mlp",
    "alexnet",
    "zfnet",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "googlenet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "densenet121",
}


def test_available_lists_the_zoo_sorted():
    assert available() == sorted(EXPECTED_NAMES)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_get_model_builds_a_module_with_dtype_options(name):
    model = get_model(name, num_classes=3)
    assert isinstance(model, nn.Module) and model.num_classes == 3
    assert {"dtype", "param_dtype"} <= set(model_options(name))


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown model 'resnet19'.*lenet5.*resnet18") as info:
        get_model("resnet19", num_classes=10)
    assert isinstance(info.value, ValueError)


def test_unknown_option_names_it_and_the_valid_options():
    with pytest.raises(
        ConfigError,
        match=r"'lenet5' has no option\(s\) 'depth'; valid options: "
        r"act, conv, dtype, first_padding, hidden_features, norm, param_dtype, pool, pooling",
    ):
        get_model("lenet5", num_classes=10, depth=3)


SWAPPABLE = {"conv", "norm", "act", "pool"}


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_building_blocks_are_options(name):
    expected = (
        {"act"} if name == "mlp" else SWAPPABLE - ({"norm"} if name.endswith("_bn") else set())
    )
    assert expected <= set(model_options(name))
    assert not {"activation", "use_batchnorm"} & set(model_options(name))


def test_architecture_defining_fields_are_not_options():
    assert "stage_sizes" not in model_options("resnet50")
    assert "norm" not in model_options("vgg16_bn")  # VGG-16 with norm=BatchNorm
    assert "block_config" not in model_options("densenet121")
    assert "cifar_stem" in model_options("resnet50")
    with pytest.raises(ConfigError, match="no option.*'stage_convs'"):
        get_model("vgg16", num_classes=10, stage_convs=(1, 1, 1, 1, 1))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10", None])
def test_bad_num_classes(bad):
    with pytest.raises(ConfigError, match="num_classes"):
        get_model("mlp", num_classes=bad)


def test_dtype_options_accept_names():
    model = get_model("lenet5", num_classes=10, dtype="bfloat16", param_dtype="float32")
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    with pytest.raises(ConfigError, match="dtype='bfloat17'"):
        get_model("lenet5", num_classes=10, dtype="bfloat17")


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("lenet5", {"act": "swish"}, "act='swish'"),
        ("lenet5", {"norm": "batchnorm"}, "norm='batchnorm'"),
        ("lenet5", {"pooling": "min"}, "pooling='min'"),
        ("lenet5", {"first_padding": "FULL"}, "first_padding='FULL'"),
        ("vgg16", {"head": "tiny"}, "head='tiny'"),
        ("simple_convnet", {"act": "elu"}, "act='elu'"),
        ("resnet18", {"norm": 1}, "norm=1"),
        ("googlenet", {"act": None}, "act=None"),
    ],
)
def test_bad_option_values_fail_when_the_model_is_built(name, options, message):
    with pytest.raises(ConfigError, match=message):
        get_model(name, num_classes=10, **options)


def test_models_import_without_tensorflow_tfds_or_orbax():
    code = (
        "import sys, cnn_jax.models, cnn_jax.models.summary, cnn_jax.layers\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules}"
        " & {'tensorflow', 'tensorflow_datasets', 'orbax', 'torch'})\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
