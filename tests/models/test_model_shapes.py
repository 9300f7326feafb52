"""Which input sizes each model accepts, the layer named when one is too small, 224x224 layer shapes."""

import jax
import jax.numpy as jnp
import pytest
from model_helpers import abstract_variables

from cnn_jax.errors import ShapeError
from cnn_jax.models import available, get_model
from cnn_jax.models.summary import summary_rows

STEM_MODELS = {"alexnet", "zfnet", "googlenet", "densenet121", "resnet18", "resnet50"}
# ResNet-34/101/152 share ResNet-18/50's stem and blocks (their CIFAR-stem forward passes and
# 224x224 counts are tested elsewhere); leaving them out keeps this matrix quick.
SAME_AS_TESTED = {"resnet34", "resnet101", "resnet152"}
# Without a CIFAR stem (or, for VGG, at all) these inputs are too small; the error names the layer.
TOO_SMALL = {
    ("alexnet", 28): "pool2",
    ("alexnet", 32): "pool5",
    ("zfnet", 28): "pool2",
    ("zfnet", 32): "pool5",
    ("densenet121", 28): "transition3/pool",
    **{(f"vgg{d}{bn}", 28): "block5/pool" for d in (11, 13, 16, 19) for bn in ("", "_bn")},
}


def small_input_cases():
    for name in sorted(set(available()) - SAME_AS_TESTED):
        for cifar_stem in (False, True) if name in STEM_MODELS else (None,):
            for size, channels in ((28, 1), (32, 3)):
                yield name, cifar_stem, size, channels


@pytest.mark.parametrize("name, cifar_stem, size, channels", list(small_input_cases()))
def test_small_inputs_train_and_eval_shapes(name, cifar_stem, size, channels):
    options = {} if cifar_stem is None else {"cifar_stem": cifar_stem}
    model = get_model(name, num_classes=10, **options)
    shape = (2, size, size, channels)
    expected_layer = None if cifar_stem else TOO_SMALL.get((name, size))
    if expected_layer:
        with pytest.raises(ShapeError, match=f"input too small: layer '{expected_layer}'"):
            abstract_variables(model, shape)
        return
    variables = abstract_variables(model, shape)
    for train in (False, True):
        logits, _ = jax.eval_shape(
            lambda v, x, train=train: model.apply(
                v, x, train=train, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
            ),
            variables,
            jax.ShapeDtypeStruct(shape, jnp.float32),
        )
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_too_small_error_also_raised_eagerly():
    model = get_model("lenet5", num_classes=10)  # 8x8 -> conv1 (SAME) 8x8 -> pool 4x4 -> conv2 5x5
    with pytest.raises(ShapeError, match=r"layer 'block2/conv1'.*empty 0x0 output from its 4x4"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize("name", ["lenet5", "resnet18", "vgg11", "googlenet", "densenet121"])
def test_non_image_input_is_a_shape_error(name):
    with pytest.raises(ShapeError, match=r"expects images of shape \[N, H, W, C\].*\(28, 28\)"):
        abstract_variables(get_model(name, num_classes=10), (28, 28))


def layer_shapes(name, size=224, **options):
    rows, _ = summary_rows(get_model(name, num_classes=1000, **options), (size, size, 3))
    return {row.path: row.output_shape[1:] for row in rows}


def test_alexnet_224_feature_maps():
    shapes = layer_shapes("alexnet")
    assert shapes["conv1"] == (55, 55, 64) and shapes["pool1"] == (27, 27, 64)
    assert shapes["pool2"] == (13, 13, 192) and shapes["pool5"] == (6, 6, 256)


def test_zfnet_224_feature_maps_match_the_paper():
    shapes = layer_shapes("zfnet")
    sizes = [shapes[layer][0] for layer in ("conv1", "pool1", "conv2", "pool2", "conv5", "pool5")]
    assert sizes == [110, 55, 26, 13, 13, 6]


def test_vgg_224_and_adaptive_pool_for_other_sizes():
    assert layer_shapes("vgg16")["block5"] == (7, 7, 512)
    shapes = layer_shapes("vgg16", size=64)
    assert shapes["block5"] == (2, 2, 512) and shapes["avgpool"] == (7, 7, 512)


def test_googlenet_224_feature_maps():
    shapes = layer_shapes("googlenet")
    assert [shapes[p][0] for p in ("pool1", "pool2", "pool3", "pool4")] == [56, 28, 14, 7]
    assert shapes["inception5b"] == (7, 7, 1024)


def test_resnet_and_densenet_224_feature_maps():
    resnet = layer_shapes("resnet50")
    assert resnet["maxpool"] == (56, 56, 64) and resnet["layer4_2"] == (7, 7, 2048)
    densenet = layer_shapes("densenet121")
    assert densenet["transition3"] == (7, 7, 512) and densenet["norm5"] == (7, 7, 1024)


def test_cifar_stems_keep_resolution():
    assert layer_shapes("resnet18", size=32, cifar_stem=True)["layer4_1"] == (4, 4, 512)
    assert layer_shapes("densenet121", size=32, cifar_stem=True)["norm5"] == (4, 4, 1024)
    assert layer_shapes("googlenet", size=32, cifar_stem=True)["inception5b"] == (8, 8, 1024)
