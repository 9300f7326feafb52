"""Weight files: read torchvision state dicts (.safetensors, .pth), write torchvision-named
.safetensors, and build a twin with a file's weights."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnn_jax.errors import ConfigError, DataError
from cnn_jax.pretrained.convert import (
    TORCHVISION_OPTIONS,
    _check_twin,
    from_torchvision,
    num_classes_of,
    to_torchvision,
)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise DataError(
            "reading or writing .safetensors files needs the safetensors package: "
            "pip install safetensors (it comes with 'cnn_jax[full]')"
        ) from None
    return safetensors.numpy


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a weights file as numpy arrays, by name.

    `.safetensors`: read with safetensors' numpy API (torch not needed). `.pth` / `.pt` / `.bin`:
    a pickled state dict, read with `torch.load(weights_only=True)` (no code runs) when torch is
    installed. Raises `DataError` naming the file when it is missing, unreadable, of another kind
    or (for .pth) torch is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        st = _safetensors_numpy()
        try:
            return dict(st.load_file(path))
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ValueError
            raise DataError(f"cannot read weights file {str(path)!r} as safetensors: {e}") from e
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise DataError(
        f"weights file {str(path)!r}: expected a name ending in "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise DataError(
            f"weights file {str(path)!r} is a PyTorch pickle: reading it needs torch (pip install "
            "torch==2.13.0), or convert it to .safetensors where torch is installed (see the "
            "README's 'Pretrained weights')"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code in the pickle, RuntimeError, EOFError, ...
        raise DataError(f"cannot read weights file {str(path)!r} with torch.load: {e}") from e
    if not isinstance(state, Mapping):
        raise DataError(
            f"weights file {str(path)!r} holds a {type(state).__name__}; expected a state dict "
            "(tensor name -> tensor), as `model.state_dict()` gives"
        )
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(
                f"weights file {str(path)!r}: entry {key!r} is a {type(value).__name__}, not a "
                "tensor; expected a state dict (tensor name -> tensor)"
            )
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        tensors[str(key)] = value.numpy()
    return tensors


def save_safetensors(
    variables: Mapping[str, Any], model_name: str, path: str | os.PathLike
) -> Path:
    """Writes this zoo's variables of twin `model_name` as a torchvision-named .safetensors file
    (`to_torchvision`), readable by `safetensors.torch.load_file` + `load_state_dict`. Written
    beside and renamed, so a failure never leaves half a file. Returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"path {str(path)!r}: expected a file name ending in .safetensors")
    tensors = to_torchvision(variables, model_name)
    metadata = {"format": "pt", "cnn_jax_model": model_name}
    write_safetensors(tensors, path, metadata)
    return path


def write_safetensors(
    tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.numpy.save_file`, atomically; an OSError becomes a `DataError` naming `path`."""
    st = _safetensors_numpy()
    import safetensors

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    except safetensors.SafetensorError as e:  # its I/O errors (no such folder, disk full)
        raise DataError(f"cannot write {str(path)!r}: {e}") from e
    finally:
        with contextlib.suppress(OSError):  # e.g. no folder to have written it in
            tmp.unlink(missing_ok=True)


def load_weights(
    path: str | os.PathLike, model_name: str, num_classes: int | None = None, **options: Any
) -> tuple[Any, dict]:
    """(model, variables): twin `model_name` built with torchvision's options
    (`TORCHVISION_OPTIONS`, e.g. GoogLeNet's `transform_input=True`; `options` add to or
    override them) and the weights of the file at `path` (`read_state_dict`), converted with
    `from_torchvision`; `model.apply(variables, x, train=False)` then gives torchvision's logits
    for the same (NHWC) input.

    num_classes: None takes the file's; a number must match the file's final layer (replace the
    head afterwards to fine-tune for other classes; `HEADS` names it). Options that change the
    variables (e.g. `cifar_stem=True`) are refused. Raises `ConfigError` for a model without a
    twin or a bad option, `DataError` for an unreadable file or any unmatched tensor.
    """
    _check_twin(model_name)
    state = read_state_dict(path)
    file_classes = num_classes_of(state, model_name)
    variables = from_torchvision(state, model_name)
    if num_classes is not None and num_classes != file_classes:
        raise DataError(
            f"num_classes={num_classes!r} does not match weights file {str(path)!r}, whose final "
            f"layer has {file_classes} classes"
        )
    import jax
    import jax.numpy as jnp

    from cnn_jax.models import get_model

    model = get_model(
        model_name,
        num_classes=file_classes,
        **{**TORCHVISION_OPTIONS.get(model_name, {}), **options},
    )
    if options:
        _check_options_keep_variables(model, model_name, variables, options)
    return model, jax.tree.map(jnp.asarray, variables)


def _check_options_keep_variables(model, model_name: str, variables: dict, options: dict) -> None:
    import jax
    import jax.numpy as jnp

    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    want = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), dict(shapes))
    got = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
    if want != got:
        raise ConfigError(
            f"options {options!r} change {model_name}'s variables, so torchvision's weights do not "
            "fit them; load without these options"
        )
