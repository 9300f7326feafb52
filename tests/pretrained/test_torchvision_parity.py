"""Every torchvision twin computes torchvision's function: random torchvision weights (BatchNorm
running statistics randomised so they matter), converted with `cnn_jax.pretrained`, give
torchvision's eval-mode logits within 1e-4 relative on the same random batch, at 224x224 and at
odd sizes (asymmetric strided-conv padding, ceil-mode pools, uneven adaptive-pool bins).

Needs torch and torchvision (the `test` extra); skipped with the reason when they are missing.
Round trips and the conversion errors are tested without torch in test_pretrained_convert.py.
"""

from __future__ import annotations

import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import pretrained
from cnn_jax.models import get_model
from cnn_jax.pretrained import torch_compat

MISSING = torch_compat.missing_reason()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"torchvision parity: {MISSING}")

RTOL = 1e-4
BATCH = 1  # eval mode: examples are independent, and one halves the cost

# (height, width) of the parity batches: ImageNet's 224x224, and an odd size whose last feature map
# (AlexNet 4x8, VGG 5x9) is smaller than the adaptive pool's output (6x6, 7x7) in height and larger
# in width, so its bins repeat rows and average overlapping columns; strided convs and ceil-mode
# pools meet odd sizes at every stage.
SIZES = ((224, 224), (161, 291))

# DenseNet's and GoogLeNet's layers nearly all differ in shape, so one compiled forward pass is
# cheapest; the ResNets and VGGs repeat their layers, so op by op (compiled once per shape and
# reused by the next model) is.
JIT = {"densenet121", "googlenet"}


def torchvision_model(name: str, **options):
    """torchvision's `name`, eval mode, with random weights drawn here (not by torchvision's slow
    initialisers): He-uniform conv and linear weights, small biases, BatchNorm affine and running
    statistics all random. Returns (model, state dict as numpy arrays)."""
    import torch

    tv = torch_compat.import_torchvision()
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        model = getattr(tv.models, name)(weights=None, **options)
    rng = np.random.default_rng(zlib.crc32(name.encode()))

    def uniform(low: float, high: float, shape) -> np.ndarray:  # float32 throughout: fast
        values = rng.random(shape, np.float32)
        values *= np.float32(high - low)
        values += np.float32(low)
        return values

    state = {}
    for key, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if key.endswith("num_batches_tracked"):
            state[key] = np.zeros(shape, np.int64)
        elif key.endswith("running_mean"):
            state[key] = uniform(-0.3, 0.3, shape)
        elif key.endswith("running_var"):
            state[key] = uniform(0.5, 2.0, shape)
        elif len(shape) >= 2:  # conv or linear weight: He uniform, so activations keep their scale
            bound = float(np.sqrt(6.0 / np.prod(shape[1:])))
            state[key] = uniform(-bound, bound, shape)
        elif key.endswith("weight"):  # BatchNorm scale
            state[key] = uniform(0.5, 1.5, shape)
        else:  # biases
            state[key] = uniform(-0.1, 0.1, shape)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, assign=True)
    return model.eval(), state


def torchvision_options(name: str, transform_input: bool = False) -> dict:
    if name == "googlenet":
        return {"aux_logits": False, "init_weights": False, "transform_input": transform_input}
    return {}


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("name", list(pretrained.TWINS))
def test_twin_computes_torchvisions_logits(name):
    import torch

    # GoogLeNet at 224x224 with transform_input (torchvision's setting for its ImageNet weights,
    # `TORCHVISION_OPTIONS`), at the odd size without (torchvision's default otherwise).
    options = dict(pretrained.TORCHVISION_OPTIONS.get(name, {}))
    reference, state = torchvision_model(name, **torchvision_options(name, transform_input=True))
    variables = pretrained.from_torchvision(state, name)

    rng = np.random.default_rng(0)
    for size_index, (height, width) in enumerate(SIZES):
        if name == "googlenet":
            reference.transform_input = options["transform_input"] = size_index == 0
        model = get_model(name, num_classes=1000, **options)
        forward = jax.jit(model.apply) if name in JIT else model.apply
        images = rng.normal(size=(BATCH, 3, height, width)).astype(np.float32)  # NCHW
        start = time.process_time()
        with torch.no_grad():
            expected = reference(torch.from_numpy(images)).numpy()
        torch_seconds = time.process_time() - start
        start = time.process_time()
        logits = np.asarray(forward(variables, jnp.asarray(images.transpose(0, 2, 3, 1))))
        jax_seconds = time.process_time() - start
        error = relative_error(logits, expected)
        print(f"{name} {height}x{width}: relative error {error:.1e} "
              f"(CPU s: torch {torch_seconds:.1f}, jax {jax_seconds:.1f})")  # fmt: skip
        assert logits.shape == expected.shape == (BATCH, 1000)
        assert error < RTOL, f"{name} at {height}x{width}: {error:.2e}"
