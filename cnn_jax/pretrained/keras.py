"""Keras' VGG-16 and VGG-19 (`keras.applications`) weights as this zoo's `vgg16` / `vgg19`
variables.

Keras' VGGs and this zoo's share everything but names: 3x3 convs with bias and ReLU, 2x2 max
pools, then (at 224x224, a 7x7x512 map) flatten -> fc1 4096 -> fc2 4096 -> predictions 1000.
Both store conv kernels HWIO and dense kernels (in, out), and both flatten the channels-last map in
(H, W, C) order, so every tensor is copied as it is. Two differences are in the inputs and outputs:

  * Keras' weights expect its "caffe" preprocessing: BGR channels, the ImageNet mean subtracted,
    no std (`cnn_jax.pretrained.imagenet` preprocessing "keras_vgg");
  * Keras ends in a softmax (`classifier_activation="softmax"`); this zoo's models give logits,
    so their softmax is Keras' output (or build Keras with `classifier_activation=None`).

Weights come from `model.get_weights()` (a list in Keras' layer order) or from a weights file:
Keras 3's `.weights.h5` (`model.save_weights`) or the older Keras HDF5 layout, which is what
`keras.applications.VGG16(weights="imagenet")` downloads (`vgg16_weights_tf_dim_ordering_tf_
kernels.h5`). Files are read with h5py; neither Keras nor TensorFlow is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnn_jax.errors import ConfigError, DataError

# Convs per stage, as in this zoo's VGG16 / VGG19.
_STAGE_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
KERAS_MODELS = tuple(_STAGE_CONVS)
KERAS_SUFFIXES = (".h5", ".hdf5")


def layer_map(model_name: str) -> dict[str, tuple[str, ...]]:
    """Keras layer name -> this zoo's module path in `params`, in Keras' layer order."""
    if model_name not in _STAGE_CONVS:
        raise ConfigError(
            f"model {model_name!r} has no Keras converter; Keras weights convert for: "
            f"{', '.join(KERAS_MODELS)}"
        )
    layers = {
        f"block{stage}_conv{conv}": (f"block{stage}", f"conv{conv}")
        for stage, num_convs in enumerate(_STAGE_CONVS[model_name], start=1)
        for conv in range(1, num_convs + 1)
    }
    layers.update(
        fc1=("classifier", "hidden1"),
        fc2=("classifier", "hidden2"),
        predictions=("classifier", "logits"),
    )
    return layers


def from_keras(
    weights: Sequence[np.ndarray] | Mapping[str, Sequence[np.ndarray]], model_name: str
) -> dict:
    """This zoo's `{'params': ...}` (nested dicts of float32 numpy arrays) for `model_name`
    ('vgg16' or 'vgg19') from Keras' VGG weights with the top (`include_top=True`).

    weights: `keras_model.get_weights()` (kernel, bias per layer in Keras' layer order), or a
    mapping Keras layer name -> [kernel, bias] (`read_keras_weights`). The number of classes is
    the predictions layer's. Raises `DataError` naming each missing, unexpected or mis-shaped
    tensor (e.g. a file saved with `include_top=False`, which has no fc1, fc2, predictions).
    """
    layers = layer_map(model_name)
    if isinstance(weights, Mapping):
        by_layer = {str(k): list(v) for k, v in weights.items() if len(v)}
    else:
        weights = list(weights)
        if len(weights) != 2 * len(layers):
            raise DataError(
                f"Keras {model_name} has {2 * len(layers)} weight arrays (kernel and bias of "
                f"{len(layers)} layers); got {len(weights)}"
            )
        by_layer = {name: weights[2 * i : 2 * i + 2] for i, name in enumerate(layers)}
    missing = [name for name in layers if name not in by_layer]
    unexpected = [name for name in by_layer if name not in layers]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing layer(s) {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected layer(s) {', '.join(unexpected)}")
        raise DataError(f"the weights do not match Keras' {model_name}: {'; '.join(problems)}")
    num_classes = int(np.shape(by_layer["predictions"][0])[-1])
    expected = _expected_shapes(model_name, num_classes)
    params: dict[str, Any] = {}
    mismatched = []
    for layer, path in layers.items():
        arrays = by_layer[layer]
        if len(arrays) != 2:
            mismatched.append(f"{layer} has {len(arrays)} arrays, expected 2 (kernel, bias)")
            continue
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        module = node.setdefault(path[-1], {})
        for leaf, array in zip(("kernel", "bias"), arrays):
            want = expected[(*path, leaf)]
            if tuple(np.shape(array)) != want:
                mismatched.append(f"{layer} {leaf} is {tuple(np.shape(array))}, expected {want}")
            module[leaf] = np.asarray(array, np.float32)
    if mismatched:
        raise DataError(f"the weights do not match Keras' {model_name}: {'; '.join(mismatched)}")
    return {"params": params}


def _expected_shapes(model_name: str, num_classes: int) -> dict[tuple[str, ...], tuple]:
    """Path -> shape of every parameter of this zoo's `model_name` at 224x224."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from cnn_jax.models import get_model

    model = get_model(model_name, num_classes=num_classes)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    return {path: tuple(s.shape) for path, s in flatten_dict(shapes).items()}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_keras_weights(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> its weight arrays (kernel, bias) from an HDF5 weights file: Keras 3's
    `.weights.h5` (groups layers/<layer>/vars/0, 1) or the older layout of `model.save_weights`
    in Keras 2 and of Keras' downloadable ImageNet weights (attribute `layer_names`, each layer's
    `weight_names` in order). Raises `DataError` naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file {str(path)!r} does not exist or is not a file")
    try:
        import h5py
    except ImportError:
        raise DataError(
            f"weights file {str(path)!r}: reading Keras weights needs h5py (pip install h5py)"
        ) from None
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs:  # Keras 2 / legacy HDF5
                layers = {}
                for name in map(_text, f.attrs["layer_names"]):
                    group = f[name]
                    names = [_text(n) for n in group.attrs.get("weight_names", [])]
                    layers[name] = [np.asarray(group[n]) for n in names]
                return layers
            if "layers" in f:  # Keras 3 .weights.h5
                layers = {}
                for group in f["layers"].values():
                    if "vars" not in group:
                        continue
                    variables = group["vars"]
                    name = _text(variables.attrs.get("name", group.name.rsplit("/", 1)[-1]))
                    keys = sorted(variables.keys(), key=int)
                    layers[name] = [np.asarray(variables[k]) for k in keys]
                return layers
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read Keras weights file {str(path)!r}: {e}") from e
    raise DataError(
        f"weights file {str(path)!r} is HDF5 but not a Keras weights file (no 'layer_names' "
        "attribute, no 'layers' group)"
    )


def load_keras_weights(path: str | os.PathLike, model_name: str) -> tuple[Any, dict]:
    """(model, variables): this zoo's `model_name` ('vgg16' / 'vgg19') with the Keras weights of
    the file at `path`; `model.apply(variables, x, train=False)` gives Keras' pre-softmax output
    for the same input (preprocessed with "keras_vgg")."""
    import jax
    import jax.numpy as jnp

    from cnn_jax.models import get_model

    variables = from_keras(read_keras_weights(path), model_name)
    num_classes = variables["params"]["classifier"]["logits"]["bias"].shape[0]
    model = get_model(model_name, num_classes=int(num_classes))
    return model, jax.tree.map(jnp.asarray, variables)
