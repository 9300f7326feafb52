"""Weights files of every kind this zoo reads, by one entry point: their format, their variables
and the model they fit. Used by fine-tuning (`model.pretrained`) and `cnn-jax predict --weights`.

Formats (`FORMATS`; 'auto' tells them by the file name):

  * torchvision: a torchvision state dict of a twin (`.safetensors`, `.pth`, `.pt`, `.bin`),
    converted by `cnn_jax.pretrained.from_torchvision`;
  * keras: Keras' VGG-16 / VGG-19 weights (`.h5`), `cnn_jax.pretrained.keras`;
  * cnn_jax: this zoo's own variable names ('params/conv1/kernel'), as `cnn-jax export` writes
    them: `.npz`, or `.safetensors` for models without a torchvision twin (a `.safetensors` file
    whose tensors all have these names is read as cnn_jax whatever the format says).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cnn_jax.errors import ConfigError, DataError

FORMATS = ("torchvision", "keras", "cnn_jax")
_SUFFIX_FORMATS = {
    ".safetensors": "torchvision",
    ".pth": "torchvision",
    ".pt": "torchvision",
    ".bin": "torchvision",
    ".h5": "keras",
    ".hdf5": "keras",
    ".npz": "cnn_jax",
}
_COLLECTIONS = ("params", "batch_stats")
_IMAGENET_SHAPE = (224, 224, 3)  # what `cnn-jax predict --weights` feeds the model


def weights_format(path: str | Path, fmt: str = "auto", setting: str = "the format") -> str:
    """The format of a weights file: `fmt` unless 'auto', else by its suffix. `setting` names
    where the user gives the format (e.g. 'model.pretrained_format'), for the error."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ConfigError(
                f"{setting} {fmt!r} is not a weights format; expected auto or one of {FORMATS}"
            )
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ConfigError(
            f"weights file {str(path)!r}: cannot tell its format from the name; expected a name "
            f"ending in {', '.join(_SUFFIX_FORMATS)}, or set {setting} to one of {FORMATS}"
        )
    return _SUFFIX_FORMATS[suffix]


def read_variables(
    path: str | Path, model_name: str, fmt: str = "auto", setting: str = "the format"
) -> tuple[dict, str]:
    """(variables {'params'[, 'batch_stats']} as nested dicts of numpy arrays, format) of this
    zoo's `model_name` from the weights file at `path`. Raises `DataError` naming the file (and
    the tensors) when it is missing, unreadable or does not fit `model_name`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"weights file {str(path)!r} does not exist or is not a file (the README's "
            "'Pretrained weights' has the one-time commands that fetch torchvision's and Keras' "
            "files)"
        )
    fmt = weights_format(path, fmt, setting)
    if fmt == "keras":
        from cnn_jax.pretrained.keras import from_keras, read_keras_weights

        return from_keras(read_keras_weights(path), model_name), fmt
    if path.suffix.lower() == ".npz":
        from cnn_jax.train.checkpoints import load_npz

        return _checked_cnn_jax(load_npz(path), path), "cnn_jax"
    from cnn_jax.pretrained import from_torchvision, read_state_dict

    tensors = read_state_dict(path)
    if tensors and all(name.split("/")[0] in _COLLECTIONS for name in tensors):
        from flax.traverse_util import unflatten_dict

        return _checked_cnn_jax(unflatten_dict(tensors, sep="/"), path), "cnn_jax"
    if fmt == "cnn_jax":
        raise DataError(
            f"weights file {str(path)!r} does not have this zoo's variable names "
            "('params/...', 'batch_stats/...'); is it torchvision's?"
        )
    return from_torchvision(tensors, model_name), fmt


def _checked_cnn_jax(variables: dict, path: Path) -> dict:
    found = sorted(variables)
    if "params" not in variables or set(found) - set(_COLLECTIONS):
        raise DataError(
            f"weights file {str(path)!r} does not hold this zoo's variables: expected the "
            f"collections 'params' and 'batch_stats', found {found}"
        )
    return variables


def load_model(
    path: str | Path, model_name: str, fmt: str = "auto", setting: str = "the format"
) -> tuple[Any, dict, str]:
    """(model, variables, format): this zoo's `model_name` built for the weights file at `path`
    (its number of classes, and torchvision's options for a torchvision file, e.g. GoogLeNet's
    `transform_input`) with the file's variables, ready for `model.apply(variables, x,
    train=False)`."""
    import jax
    import jax.numpy as jnp

    from cnn_jax.models import get_model
    from cnn_jax.pretrained import HEADS, TORCHVISION_OPTIONS
    from cnn_jax.pretrained.finetune import backbone_variables, head_paths

    variables, fmt = read_variables(path, model_name, fmt, setting)
    options = TORCHVISION_OPTIONS.get(model_name, {}) if fmt == "torchvision" else {}
    model = get_model(model_name, num_classes=1, **options)
    # The converters checked every tensor of a torchvision or Keras file; a cnn_jax file is
    # checked here, against the model with the file's number of classes.
    if model_name in HEADS:  # the twins' heads are known; others are found by tracing
        kernel = "/".join((*HEADS[model_name], "kernel"))
    else:
        kernel = next(p for p in head_paths(model, _IMAGENET_SHAPE) if p.endswith("kernel"))
    node = variables["params"]
    for part in kernel.split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    if np.ndim(node) != 2:
        raise DataError(f"weights file {str(path)!r} has no 2-D head kernel 'params/{kernel}'")
    model = model.clone(num_classes=int(np.shape(node)[-1]))
    if fmt == "cnn_jax":
        variables = backbone_variables(
            variables, model, _IMAGENET_SHAPE, frozenset(), source=f"the weights of {str(path)!r}"
        )
    return model, jax.tree.map(jnp.asarray, variables), fmt
