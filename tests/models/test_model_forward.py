"""Every registry model runs forward on small real inputs, in train and eval mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import abstract_variables, numpy_variables

from cnn_jax.models import available, get_model

KEY = jax.random.key(0)
NUM_CLASSES = 7

# (options, input shape) per model: 28x28x1 where the design allows, 32x32x3 otherwise, CIFAR stems
# for the ImageNet designs. AlexNet/ZFNet get narrow FC layers and VGG its CIFAR head so the weights
# stay small; the conv stacks are the real ones.
SMALL_INPUTS = {
    "lenet5": ({}, (2, 28, 28, 1)),
    "simple_convnet": ({}, (2, 28, 28, 1)),
    "mlp": ({}, (2, 28, 28, 1)),
    "alexnet": ({"cifar_stem": True, "head_features": (32, 32)}, (2, 28, 28, 1)),
    "zfnet": ({"cifar_stem": True, "head_features": (32, 32)}, (2, 28, 28, 1)),
    **{
        f"vgg{depth}{bn}": ({"head": "cifar"}, (2, 32, 32, 3))
        for depth in (11, 13, 16, 19)
        for bn in ("", "_bn")
    },
    "googlenet": ({"cifar_stem": True}, (2, 28, 28, 1)),
    **{
        f"resnet{depth}": ({"cifar_stem": True}, (2, 32, 32, 3)) for depth in (18, 34, 50, 101, 152)
    },
    "densenet121": ({"cifar_stem": True}, (2, 28, 28, 1)),
}
# Compiling these on 2 shared CPU cores takes longer than the suite's 20 s budget per test.
SLOW = {"googlenet", "densenet121"}
# Run op by op instead of jitting the whole model: their blocks repeat a few conv shapes, so the
# per-op compilations are shared (also across tests in one process) and beat compiling one big graph.
EAGER = {name for name in SMALL_INPUTS if name.startswith(("vgg", "resnet"))}


def test_every_model_has_a_small_input_case():
    assert sorted(SMALL_INPUTS) == available()


def check_forward(model, shape, jit=True):
    """Train-mode (BatchNorm stats must move) and eval-mode forward passes on random inputs."""
    variables = numpy_variables(model, shape)
    x = jax.random.normal(KEY, shape)
    train_apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    eval_apply = functools.partial(model.apply, train=False)
    if jit:
        train_apply, eval_apply = jax.jit(train_apply), jax.jit(eval_apply)
    logits, updates = train_apply(variables, x, rngs={"dropout": jax.random.key(1)})
    assert logits.shape == (shape[0], model.num_classes) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    if "batch_stats" in variables:
        moved = jax.tree.map(
            lambda old, new: not np.allclose(old, new),
            variables["batch_stats"],
            updates["batch_stats"],
        )
        assert all(jax.tree.leaves(moved)), "every BatchNorm's running stats update in train mode"
    else:
        assert not updates.get("batch_stats")

    eval_logits = eval_apply(variables, x)
    assert eval_logits.shape == logits.shape and eval_logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(eval_logits)))
    np.testing.assert_array_equal(eval_logits, eval_apply(variables, x))  # deterministic


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(SMALL_INPUTS)],
)
def test_forward_train_and_eval(name):
    options, shape = SMALL_INPUTS[name]
    check_forward(get_model(name, num_classes=NUM_CLASSES, **options), shape, jit=name not in EAGER)


def test_tiny_densenet_forward():
    # The DenseNet code path at a size that compiles quickly (DenseNet-121 itself is marked slow).
    from cnn_jax.models import DenseNet

    model = DenseNet(
        num_classes=NUM_CLASSES,
        block_config=(2, 2),
        growth_rate=4,
        num_init_features=8,
        cifar_stem=True,
        drop_rate=0.1,
    )
    check_forward(model, (2, 28, 28, 1))


def test_real_init_then_apply():
    # model.init with JAX's random initialisers (the forward tests above use NumPy-filled weights).
    model = get_model("lenet5", num_classes=10)
    x = jnp.ones((2, 28, 28, 1))
    variables = jax.jit(model.init)(KEY, x)
    assert set(variables) == {"params"}
    assert model.apply(variables, x).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(SMALL_INPUTS))
def test_bfloat16_activations_float32_params_and_logits(name):
    """dtype=bfloat16: every layer computes in bf16, params stay float32, logits are float32."""
    options, shape = SMALL_INPUTS[name]
    model = get_model(name, num_classes=NUM_CLASSES, dtype="bfloat16", **options)
    variables = abstract_variables(model, shape)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    apply = functools.partial(
        model.apply,
        train=True,
        rngs={"dropout": KEY},
        capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    logits, state = jax.eval_shape(apply, variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    assert logits.dtype == jnp.float32
    outputs = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    # Only the model itself and its classifier head (which casts logits) return float32.
    float32_outputs = {
        "/".join(str(k.key) for k in path[:-2])
        for path, leaf in outputs
        if leaf.dtype != jnp.bfloat16
    }
    assert float32_outputs <= {"", "head", "classifier"}, float32_outputs
    assert len(outputs) > 3


def test_bfloat16_real_forward():
    model = get_model(
        "resnet18", num_classes=NUM_CLASSES, dtype=jnp.bfloat16, cifar_stem=True, num_filters=8
    )
    check_forward(model, (2, 32, 32, 3))
