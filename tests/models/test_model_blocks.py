"""Swappable building blocks: every family takes `conv`, `norm`, `act` and (where it pools) `pool`."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_helpers import RNGS, abstract_variables, numpy_variables

from cnn_jax import layers
from cnn_jax.models import DenseNet, get_model, model_options
from cnn_jax.models.resnet import ResNetBlock
from cnn_jax.models.summary import count_params, summary_rows

# One model per family, with a small input it accepts: (options, input shape).
FAMILIES = {
    "lenet5": ({}, (2, 28, 28, 1)),
    "simple_convnet": ({"features": (8, 16)}, (2, 8, 8, 3)),
    "alexnet": ({"cifar_stem": True, "head_features": (8, 8)}, (2, 15, 15, 3)),
    "zfnet": ({"cifar_stem": True, "head_features": (8, 8)}, (2, 22, 22, 3)),
    "vgg11": ({"head": "cifar"}, (2, 32, 32, 3)),
    "vgg11_bn": ({"head": "cifar"}, (2, 32, 32, 3)),
    "googlenet": ({"cifar_stem": True}, (2, 8, 8, 3)),
    "resnet18": ({"cifar_stem": True}, (2, 8, 8, 3)),
    "resnet50": ({}, (2, 8, 8, 3)),
    # DenseNet-121's code with two short blocks (tracing all 121 layers takes seconds).
    "densenet": ({"cifar_stem": True, "growth_rate": 4, "num_init_features": 8}, (2, 8, 8, 3)),
}
WITH_NORM_OPTION = sorted(n for n in FAMILIES if n != "vgg11_bn")  # vgg11_bn fixes norm=BatchNorm
# Two groups divide every normalised width in the zoo (LeNet-5's 6 included).
GroupNorm2 = functools.partial(nn.GroupNorm, num_groups=2)


def build(name, **options):
    base, shape = FAMILIES[name]
    if name == "densenet":
        return DenseNet(num_classes=3, block_config=(2, 2), **base, **options), shape
    return get_model(name, num_classes=3, **base, **options), shape


def params_of(model, shape):
    return abstract_variables(model, shape)


def module_rows(model, shape):
    """{path: module class name} of every submodule called, from a shape-only trace."""
    rows, _ = summary_rows(model, shape[1:], batch_size=shape[0], train=True)
    return {row.path: row.module for row in rows}


def leaf_paths(tree):
    return {
        "/".join(str(k.key) for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def norm_modules(params):
    """Paths of modules whose parameters are exactly a norm's scale and bias."""
    found = set()

    def visit(tree, path):
        if set(tree) == {"scale", "bias"}:
            found.add("/".join(path))
            return
        for key, value in tree.items():
            if isinstance(value, dict):
                visit(value, (*path, key))

    visit(params, ())
    return found


# ----------------------------------------------------------------------------- defaults


def test_defaults_are_todays_blocks():
    for name in FAMILIES:
        model, _ = build(name)
        assert model.conv is layers.Conv and model.pool is layers.Pool, name
        assert layers.activation_fn(model.act) is (nn.tanh if name == "lenet5" else nn.relu)
    assert build("lenet5")[0].norm is None and build("lenet5")[0].pooling == "avg"
    for name in ("lenet5", "simple_convnet", "alexnet", "zfnet", "vgg11"):
        assert build(name)[0].norm is None
    assert build("vgg11_bn")[0].norm is layers.BatchNorm
    assert build("resnet18")[0].norm is layers.BatchNorm
    assert get_model("densenet121", num_classes=3).norm is layers.BatchNorm
    googlenet_norm = build("googlenet")[0].norm  # torchvision's BasicConv2d eps
    assert googlenet_norm.func is nn.BatchNorm
    assert googlenet_norm.keywords == {"momentum": 0.9, "epsilon": 1e-3}
    assert "act" in model_options("mlp") and "conv" not in model_options("mlp")


# ----------------------------------------------------------------------------- conv and pool


class RecordingConv(layers.Conv):
    """A Conv-like class: shows up under its own name in summaries."""


class RecordingPool(layers.Pool):
    pass


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_custom_conv_and_pool_are_used_everywhere(name):
    default, shape = build(name)
    swapped, _ = build(name, conv=RecordingConv, pool=RecordingPool)
    before, after = module_rows(default, shape), module_rows(swapped, shape)
    convs = {p for p, m in before.items() if m == "Conv"}
    pools = {p for p, m in before.items() if m == "Pool"}
    assert convs and (pools or name.startswith("resnet"))
    assert {p for p, m in after.items() if m == "RecordingConv"} == convs
    assert {p for p, m in after.items() if m == "RecordingPool"} == pools
    assert not {"Conv", "Pool"} & set(after.values())
    # Same variables: names, shapes and count.
    assert leaf_paths(params_of(swapped, shape)) == leaf_paths(params_of(default, shape))


def test_custom_conv_partial_initialises_every_conv_kernel():
    conv = functools.partial(layers.Conv, kernel_init=nn.initializers.constant(0.25))
    model = get_model("lenet5", num_classes=3, conv=conv, pooling="max")
    params = model.init(RNGS, jnp.zeros((1, 12, 12, 1)))["params"]
    np.testing.assert_array_equal(params["block1"]["conv1"]["kernel"], np.float32(0.25))
    np.testing.assert_array_equal(params["block2"]["conv1"]["kernel"], np.float32(0.25))
    assert not np.allclose(params["head"]["hidden1"]["kernel"], 0.25)  # Dense layers keep theirs


def test_lenet_pooling_kinds_go_through_pool():
    model, shape = build("lenet5", pooling="sum", pool=RecordingPool)
    rows = module_rows(model, shape)
    assert [p for p, m in rows.items() if m == "RecordingPool"] == ["block1/pool", "block2/pool"]
    x = jnp.ones(shape)
    variables = numpy_variables(model, shape)
    summed = model.apply(variables, x)
    averaged = build("lenet5")[0].apply(variables, x)
    assert not np.allclose(summed, averaged)


# ----------------------------------------------------------------------------- norm


@pytest.mark.parametrize("name", WITH_NORM_OPTION)
def test_norm_none_removes_every_norm(name):
    default, shape = build(name)
    plain = params_of(build(name, norm=None)[0], shape)
    assert set(plain) == {"params"}  # no batch_stats
    assert not norm_modules(plain["params"])
    assert {p.rsplit("/", 1)[1] for p in leaf_paths(plain["params"])} <= {"kernel", "bias"}
    if default.norm is None:
        return
    full = params_of(default, shape)["params"]
    norms = norm_modules(full)
    assert norms
    norm_params = sum(count_params(full_sub) for full_sub in _subtrees(full, norms))
    assert count_params(plain["params"]) == count_params(full) - norm_params


def _subtrees(tree, paths):
    for path in paths:
        node = tree
        for key in path.split("/"):
            node = node[key]
        yield node


@pytest.mark.parametrize("name", WITH_NORM_OPTION)
@pytest.mark.parametrize(
    "norm", [GroupNorm2, nn.LayerNorm, "layer"], ids=["group", "layer", "name"]
)
def test_group_and_layer_norm_with_gelu(name, norm):
    """Every family builds and runs (shapes only) with GroupNorm / LayerNorm and gelu; the norms
    replace BatchNorm one for one (same paths) and keep no batch statistics."""
    model, shape = build(name, norm=norm, act=nn.gelu)
    variables = params_of(model, shape)
    assert set(variables) == {"params"}
    with_batchnorm = params_of(build(name, norm="batch")[0], shape)["params"]
    assert norm_modules(variables["params"]) == norm_modules(with_batchnorm)
    logits, state = jax.eval_shape(
        functools.partial(model.apply, train=True, mutable=["batch_stats"], rngs=RNGS),
        variables,
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    assert logits.shape == (shape[0], 3) and not state


def test_norm_and_act_by_name():
    model = get_model("resnet18", num_classes=3, norm="group", act="leaky_relu")
    variables = abstract_variables(model, (1, 8, 8, 3))
    assert set(variables) == {"params"}
    assert set(variables["params"]["bn1"]) == {"scale", "bias"}


def test_resnet_zero_init_only_for_norms_with_scale_init():
    class Shift(nn.Module):
        """A norm without scale_init (nor dtype fields)."""

        @nn.compact
        def __call__(self, x):
            return x + self.param("shift", nn.initializers.zeros, (x.shape[-1],))

    model = get_model("resnet18", num_classes=3, cifar_stem=True, num_filters=4, norm=Shift)
    params = abstract_variables(model, (1, 4, 4, 3))["params"]
    assert set(params["layer1_0"]["bn2"]) == {"shift"}
    # GroupNorm has a scale_init: the block's last norm starts at zero scale, as BatchNorm does.
    block = ResNetBlock(
        4, conv=layers.Conv, norm=layers.make_norm(GroupNorm2, train=True), act=nn.relu, strides=2
    )
    params = block.init(RNGS, jnp.zeros((1, 4, 4, 2)))["params"]
    np.testing.assert_array_equal(params["bn2"]["scale"], 0.0)
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(params["downsample_bn"]["scale"], 1.0)


# ----------------------------------------------------------------------------- one train step

TRAIN_CASES = {
    "resnet18": (
        lambda norm: get_model(
            "resnet18", num_classes=3, cifar_stem=True, num_filters=8, norm=norm
        ),
        (4, 32, 32, 3),
    ),
    "simple_convnet": (
        lambda norm: get_model("simple_convnet", num_classes=3, features=(8, 16), norm=norm),
        (4, 16, 16, 3),
    ),
    "densenet": (
        lambda norm: DenseNet(
            num_classes=3,
            block_config=(2, 2),
            growth_rate=4,
            num_init_features=8,
            cifar_stem=True,
            norm=norm,
        ),
        (4, 8, 8, 3),
    ),
}


@pytest.mark.parametrize("norm", [GroupNorm2, nn.LayerNorm], ids=["group", "layer"])
@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_one_sgd_step_with_group_and_layer_norm(name, norm):
    make, shape = TRAIN_CASES[name]
    model = make(norm)
    x = jax.random.normal(jax.random.key(0), shape)
    labels = jnp.arange(shape[0]) % 3
    variables = numpy_variables(model, shape)  # quicker than a random init on CPU
    assert set(variables) == {"params"}
    tx = optax.sgd(0.1)

    def step(params, opt_state):
        def loss_fn(params):
            logits, _ = model.apply(
                {"params": params},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(1)},
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates)

    compiled = (
        jax.jit(step)
        .lower(variables["params"], tx.init(variables["params"]))
        .compile(compiler_options={"xla_backend_optimization_level": 0})
    )
    loss, new_params = compiled(variables["params"], tx.init(variables["params"]))
    assert np.isfinite(float(loss))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["params"], new_params)
    # Unit norm scales (numpy_variables; a real init zeroes ResNet's last scale per block, which
    # would hold the block's convs still on the first step): every parameter gets a gradient.
    assert all(jax.tree.leaves(changed)), changed
