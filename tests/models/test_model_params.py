"""Parameter counts pinned to the published (torchvision) numbers, via jax.eval_shape (no allocation)."""

import jax
import jax.numpy as jnp
import pytest
from model_helpers import abstract_variables

from cnn_jax.models import get_model
from cnn_jax.models.summary import count_params

# torchvision's published counts at 224x224x3 with 1000 classes.
TORCHVISION_COUNTS = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "googlenet": 6_624_904,  # without the auxiliary classifiers
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "densenet121": 7_978_856,
}


def params_of(name, shape, num_classes, **options):
    model = get_model(name, num_classes=num_classes, **options)
    return count_params(abstract_variables(model, shape)["params"])


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_imagenet_parameter_count_matches_torchvision(name):
    assert params_of(name, (1, 224, 224, 3), 1000) == TORCHVISION_COUNTS[name]


def test_lenet5_has_61706_parameters_on_mnist_and_on_its_original_32x32_input():
    assert params_of("lenet5", (1, 28, 28, 1), 10) == 61_706  # first_padding="SAME": 28 -> 28
    assert params_of("lenet5", (1, 32, 32, 1), 10, first_padding="VALID") == 61_706


def test_lenet5_layer_by_layer():
    variables = abstract_variables(get_model("lenet5", num_classes=10), (1, 28, 28, 1))
    counts = {
        f"{block}/{layer}": count_params(tree)
        for block, layers in variables["params"].items()
        for layer, tree in layers.items()
    }
    assert counts == {
        "block1/conv1": 156,
        "block2/conv1": 2416,
        "head/hidden1": 48120,
        "head/hidden2": 10164,
        "head/logits": 850,
    }


def test_zfnet_count_from_its_layer_arithmetic():
    convs = [
        (7 * 7 * 3, 96),
        (5 * 5 * 96, 256),
        (3 * 3 * 256, 384),
        (3 * 3 * 384, 384),
        (3 * 3 * 384, 256),
    ]
    dense = [(6 * 6 * 256, 4096), (4096, 4096), (4096, 1000)]
    expected = sum(fan_in * out + out for fan_in, out in convs + dense)
    assert expected == 62_357_608
    assert params_of("zfnet", (1, 224, 224, 3), 1000) == expected


def test_small_input_variants():
    # The usual CIFAR ResNet-18 (3x3 stem, no max pool).
    assert params_of("resnet18", (1, 32, 32, 3), 10, cifar_stem=True) == 11_173_962
    # CIFAR head: 14.71 M conv weights + BN + a 512 -> 10 classifier.
    assert params_of("vgg16_bn", (1, 32, 32, 3), 10, head="cifar") == 14_728_266
    # The ImageNet head keeps the torchvision count at any input size (adaptive pooling).
    assert params_of("vgg16", (1, 32, 32, 3), 1000) == TORCHVISION_COUNTS["vgg16"]


def test_param_dtype_sets_parameter_dtype_and_not_the_count():
    model = get_model("resnet18", num_classes=10, param_dtype=jnp.bfloat16)
    variables = abstract_variables(model, (1, 32, 32, 3))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {
        jnp.dtype(jnp.bfloat16)
    }
    assert count_params(variables["params"]) == 11_181_642
