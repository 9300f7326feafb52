"""Forward-mode and second-order autodiff through the zoo's models built with their default modules.

The default modules compute with XLA's own ops and standard autodiff (no custom VJPs), so `jax.jvp`,
`jax.jacfwd` and `jax.hessian` work through them. Each model is differentiated with respect to one
scalar s that scales its input, at the smallest input it accepts, in eval mode, and the derivatives
are checked against reverse mode and central finite differences. Every model gets forward mode;
second order (whose compilation is ~3x longer) runs on one model per family and block type.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import numpy_variables

from cnn_jax.models import DenseNet, available, get_model

NUM_CLASSES = 3
# (options, input size, channels): the smallest input each model accepts (with its CIFAR stem where
# that is smaller), narrow FC heads where the model has wide ones.
SMALLEST = {
    "lenet5": ({}, 12, 1),
    "simple_convnet": ({}, 8, 1),
    "mlp": ({"hidden_features": (8,)}, 2, 1),
    "alexnet": ({"cifar_stem": True, "head_features": (8, 8)}, 15, 1),
    "zfnet": ({"cifar_stem": True, "head_features": (8, 8)}, 22, 1),
    **{f"vgg{d}{bn}": ({"head": "cifar"}, 32, 1) for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    "googlenet": ({"cifar_stem": True}, 2, 1),
    **{f"resnet{d}": ({}, 1, 1) for d in (18, 34, 50, 101, 152)},
    "densenet121": ({"cifar_stem": True}, 8, 1),
}
# Compiling these deep graphs' derivatives takes longer than the suite's 20 s per test on 2 shared
# CPU cores (10-25 s each).
SLOW = {"densenet121", "googlenet", "resnet101", "resnet152"}
# One model per family for the second-order check (~3x the compile time): the deeper ResNets and
# VGGs repeat these layer types (a bottleneck is 1x1 and 3x3 convs, as in ResNet-18), ZFNet is
# AlexNet's, and tiny_densenet runs DenseNet-121's code at a small size.
SECOND_ORDER = ["lenet5", "mlp", "simple_convnet", "alexnet", "vgg11_bn", "resnet18"]
SECOND_ORDER += ["tiny_densenet", pytest.param("googlenet", marks=pytest.mark.slow)]


def test_every_model_has_a_case():
    assert sorted(SMALLEST) == available()


def build(name):
    """(model, input x [1, H, W, C], variables) with He-normal kernels and zero biases."""
    if name == "tiny_densenet":
        model = DenseNet(
            num_classes=NUM_CLASSES,
            block_config=(2, 2),
            growth_rate=4,
            num_init_features=8,
            cifar_stem=True,
        )
        shape = (1, 4, 4, 1)
    else:
        options, size, channels = SMALLEST[name]
        model = get_model(name, num_classes=NUM_CLASSES, **options)
        shape = (1, size, size, channels)
    x = jax.random.normal(jax.random.key(0), shape)
    return model, x, numpy_variables(model, shape)


def compile_derivatives(model, variables, x, second_order):
    """A compiled s -> dict of the loss and its derivatives at s (jvp, jacfwd, grad, hessian)."""

    def derivatives(s, variables, x):
        def loss(s):  # squared error of the logits for s * x against class 0
            logits = model.apply(variables, s * x, train=False)
            return 0.5 * jnp.sum((logits - jax.nn.one_hot(0, NUM_CLASSES)) ** 2)

        value, tangent = jax.jvp(loss, (s,), (jnp.ones_like(s),))
        out = {"value": value, "jvp": tangent}
        if second_order:
            out["jacfwd"] = jax.jacfwd(loss)(s)
            out["grad"] = jax.grad(loss)(s)
            out["hessian"] = jax.hessian(loss)(s)
        return out

    # Variables as arguments (not constants), and XLA's quickest compile: fine for one tiny batch.
    return (
        jax.jit(derivatives)
        .lower(jnp.float32(1.0), variables, x)
        .compile(compiler_options={"xla_backend_optimization_level": 0})
    )


def check_derivatives(model, x, variables, second_order):
    fn = compile_derivatives(model, variables, x, second_order)
    d = {k: float(v) for k, v in fn(jnp.float32(1.0), variables, x).items()}
    assert all(map(math.isfinite, d.values())), d
    # Central differences. With zero biases the ReLU models are positively homogeneous, so the loss
    # is quadratic in s (no ReLU kink between the points): only float32 rounding, which scales with
    # the loss, separates the two (and, for LeNet-5's tanh, an O(h^2) term).
    h = 1e-2
    up, down = (
        {k: float(v) for k, v in fn(jnp.float32(1.0 + e), variables, x).items()} for e in (h, -h)
    )
    atol = 1e-4 * (abs(d["value"]) + abs(d["jvp"]))
    np.testing.assert_allclose((up["value"] - down["value"]) / (2 * h), d["jvp"], 1e-3, atol)
    if second_order:
        np.testing.assert_allclose(d["jacfwd"], d["jvp"], rtol=1e-6)
        np.testing.assert_allclose(d["grad"], d["jvp"], rtol=1e-4)  # reverse vs forward mode
        np.testing.assert_allclose((up["jvp"] - down["jvp"]) / (2 * h), d["hessian"], 1e-3, atol)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(SMALLEST)]
)
def test_forward_mode_through_every_model(name):
    check_derivatives(*build(name), second_order=False)


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_jacfwd_and_hessian_per_family(name):
    check_derivatives(*build(name), second_order=True)
