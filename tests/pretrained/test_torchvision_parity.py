"""Every torchvision twin computes torchvision's function: random torchvision weights (BatchNorm
running statistics randomised so they matter), converted with `cnn_jax.pretrained`, give
torchvision's eval-mode logits within 1e-4 relative on the same random batch, at 224x224 and at
odd sizes (asymmetric strided-conv padding, ceil-mode pools, uneven adaptive-pool bins).

Needs torch and torchvision (the `test` extra); skipped with the reason when they are missing.
"""

from __future__ import annotations

import time
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import pretrained
from cnn_jax.models import get_model
from cnn_jax.pretrained import torch_compat

MISSING = torch_compat.missing_reason()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"torchvision parity: {MISSING}")

RTOL = 1e-4
BATCH = 2

# (height, width) of the parity batches per twin: 224x224, and an odd size whose last feature map
# is not the adaptive pool's (AlexNet 6x6, VGG 7x7), so its bins average and repeat unevenly.
SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    name: ((224, 224), (199, 233)) for name in pretrained.TWINS
}


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


def torchvision_options(name: str, transform_input: bool) -> dict:
    if name == "googlenet":
        return {"aux_logits": False, "init_weights": False, "transform_input": transform_input}
    return {}


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("name", list(pretrained.TWINS))
def test_twin_computes_torchvisions_logits(name):
    import torch

    # GoogLeNet's ImageNet weights come with transform_input (torchvision's default for them).
    transform_input = pretrained.TORCHVISION_OPTIONS.get(name, {}).get("transform_input", False)
    reference, state = torchvision_model(name, **torchvision_options(name, transform_input))
    variables = pretrained.from_torchvision(state, name)
    back = pretrained.to_torchvision(variables, name)  # the round trip, bit for bit
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) for k in state)
    model = get_model(name, num_classes=1000, **pretrained.TORCHVISION_OPTIONS.get(name, {}))

    rng = np.random.default_rng(0)
    for height, width in SIZES[name]:
        images = rng.normal(size=(BATCH, 3, height, width)).astype(np.float32)  # NCHW
        start = time.process_time()
        with torch.no_grad():
            expected = reference(torch.from_numpy(images)).numpy()
        torch_seconds = time.process_time() - start
        start = time.process_time()
        logits = np.asarray(model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1))))
        jax_seconds = time.process_time() - start
        error = relative_error(logits, expected)
        print(f"{name} {height}x{width}: relative error {error:.1e} "
              f"(CPU s: torch {torch_seconds:.1f}, jax {jax_seconds:.1f})")  # fmt: skip
        assert logits.shape == expected.shape == (BATCH, 1000)
        assert error < RTOL, f"{name} at {height}x{width}: {error:.2e}"


def test_googlenet_without_transform_input():
    """torchvision's GoogLeNet default (random weights): transform_input off on both sides."""
    import torch

    reference, state = torchvision_model("googlenet", **torchvision_options("googlenet", False))
    model = get_model("googlenet", num_classes=1000)
    images = np.random.default_rng(1).normal(size=(BATCH, 3, 97, 131)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    variables = pretrained.from_torchvision(state, "googlenet")
    logits = np.asarray(model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1))))
    assert relative_error(logits, expected) < RTOL
