"""torchvision state dicts <-> this zoo's variables, tensor for tensor.

The mapping is derived from the twin's own variable tree (its shapes from `jax.eval_shape`, nothing
computed): each Flax module path has one torchvision module name (`_torch_module`), and each leaf
one tensor name and layout (`_Tensor`). Both directions check that every tensor is accounted for.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cnn_jax.errors import ConfigError, DataError

# cnn_jax model name -> the torchvision.models builder with the same architecture and tensors.
TWINS: dict[str, str] = {
    name: name
    for name in (
        "alexnet",
        "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "densenet121",
        "googlenet",
    )
}  # fmt: skip

# The model options torchvision's builders use with their ImageNet weights (`load_weights` applies
# them unless told otherwise): GoogLeNet's weights expect `transform_input` (ImageNet-normalised
# input re-normalised to [-1, 1]).
TORCHVISION_OPTIONS: dict[str, dict[str, Any]] = {"googlenet": {"transform_input": True}}


def _family(model_name: str) -> str:
    return re.match(r"[a-z]+", model_name).group(0)


# The final classification layer's path in `params` (what fine-tuning replaces), per family.
_HEAD_PATHS = {
    "alexnet": ("classifier", "logits"),
    "vgg": ("classifier", "logits"),
    "resnet": ("fc",),
    "densenet": ("classifier",),
    "googlenet": ("fc",),
}
HEADS: dict[str, tuple[str, ...]] = {name: _HEAD_PATHS[_family(name)] for name in TWINS}

# The first fully connected layer flattens a [C, H, W] map: PyTorch in NCHW order, this zoo NHWC.
_FIRST_FC = {"alexnet": (256, 6, 6), "vgg": (512, 7, 7)}

# The input size the variable trees are traced at (any size gives the same tree).
_TEMPLATE_SIZE = 224


def _check_twin(model_name: str) -> None:
    if model_name not in TWINS:
        raise ConfigError(
            f"model {model_name!r} has no torchvision twin; models with torchvision weights: "
            f"{', '.join(TWINS)}"
        )


# --------------------------------------------------------------------------------------------------
# Module names
# --------------------------------------------------------------------------------------------------


def _vgg_feature_indices(stage_convs, batch_norm: bool) -> dict[tuple[str, str], int]:
    """(block, conv/norm) -> index in torchvision's `features` Sequential (conv, [bn], relu per
    conv, one max pool per stage)."""
    indices, i = {}, 0
    for stage, num_convs in enumerate(stage_convs, start=1):
        for conv in range(1, num_convs + 1):
            indices[(f"block{stage}", f"conv{conv}")] = i
            i += 1
            if batch_norm:
                indices[(f"block{stage}", f"norm{conv}")] = i
                i += 1
            i += 1  # ReLU
        i += 1  # MaxPool
    return indices


def _torch_module(model: Any, model_name: str, path: tuple[str, ...]) -> str | None:
    """torchvision's module name for the Flax module at `path`, None when there is none."""
    family = _family(model_name)
    joined = "/".join(path)
    if family == "alexnet":
        convs = {f"conv{i}": f"features.{j}" for i, j in enumerate((0, 3, 6, 8, 10), start=1)}
        head = {"classifier/hidden1": "classifier.1", "classifier/hidden2": "classifier.4",
                "classifier/logits": "classifier.6"}  # fmt: skip
        return {**convs, **head}.get(joined)
    if family == "vgg":
        head = {"classifier/hidden1": "classifier.0", "classifier/hidden2": "classifier.3",
                "classifier/logits": "classifier.6"}  # fmt: skip
        if joined in head:
            return head[joined]
        index = _vgg_feature_indices(model.stage_convs, model.norm is not None).get(path)
        return None if index is None else f"features.{index}"
    if family == "resnet":
        match = re.fullmatch(r"layer(\d)_(\d+)/(\w+)", joined)
        if match:
            stage, block, layer = match.groups()
            layer = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
                layer, layer
            )
            return f"layer{stage}.{block}.{layer}"
        return joined if joined in ("conv1", "bn1", "fc") else None
    if family == "densenet":
        match = re.fullmatch(r"denseblock(\d)_layer(\d+)/(\w+)", joined)
        if match:
            return "features.denseblock{}.denselayer{}.{}".format(*match.groups())
        if joined == "classifier":
            return joined
        return "features." + joined.replace("/", ".")
    if family == "googlenet":
        branches = {"branch2_reduce": "branch2.0", "branch2": "branch2.1",
                    "branch3_reduce": "branch3.0", "branch3": "branch3.1", "branch4": "branch4.1"}  # fmt: skip
        return ".".join(branches.get(part, part) for part in path)
    return None


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor: its torchvision name, its place in the Flax variables and its layout."""

    torch_key: str
    collection: str  # 'params' or 'batch_stats'
    path: tuple[str, ...]  # inside the collection
    kind: str  # 'conv' (OIHW <-> HWIO), 'linear' ((out, in) <-> (in, out)) or 'vector'
    shape: tuple[int, ...]  # the Flax shape
    dtype: Any
    flatten_chw: tuple[int, int, int] | None = None  # a first FC layer's [C, H, W] input map

    @property
    def torch_shape(self) -> tuple[int, ...]:
        if self.kind == "conv":
            h, w, i, o = self.shape
            return (o, i, h, w)
        if self.kind == "linear":
            return self.shape[::-1]
        return self.shape

    def to_flax(self, tensor: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return tensor.transpose(2, 3, 1, 0)
        if self.kind == "linear":
            if self.flatten_chw:
                c, h, w = self.flatten_chw
                return tensor.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
            return tensor.T
        return tensor

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return array.transpose(3, 2, 0, 1)
        if self.kind == "linear":
            if self.flatten_chw:
                c, h, w = self.flatten_chw
                return array.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
            return array.T
        return array


_TORCH_SUFFIX = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@functools.lru_cache(maxsize=8)
def _tensors(model_name: str, num_classes: int) -> tuple[_Tensor, ...]:
    """Every tensor of the twin `model_name` with `num_classes` outputs."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from cnn_jax.models import get_model

    model = get_model(model_name, num_classes=num_classes)
    images = jax.ShapeDtypeStruct((1, _TEMPLATE_SIZE, _TEMPLATE_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    first_fc = _FIRST_FC.get(_family(model_name))
    tensors = []
    for (collection, *path, leaf), value in flatten_dict(dict(shapes)).items():
        path = tuple(path)
        module = _torch_module(model, model_name, path)
        if module is None:
            raise AssertionError(f"no torchvision name for {collection}/{'/'.join(path)}")
        kind = "vector"
        if leaf == "kernel":
            kind = "conv" if len(value.shape) == 4 else "linear"
        is_first_fc = (
            first_fc is not None and path == ("classifier", "hidden1") and leaf == "kernel"
        )
        tensors.append(
            _Tensor(
                torch_key=f"{module}.{_TORCH_SUFFIX[(collection, leaf)]}",
                collection=collection,
                path=(*path, leaf),
                kind=kind,
                shape=tuple(value.shape),
                dtype=value.dtype,
                flatten_chw=first_fc if is_first_fc else None,
            )
        )
    return tuple(tensors)


def _bn_modules(tensors: tuple[_Tensor, ...]) -> list[str]:
    """torchvision names of the BatchNorm modules (those with running statistics)."""
    return [t.torch_key[: -len(".running_mean")] for t in tensors if t.path[-1] == "mean"]


def _head_key(model_name: str) -> str:
    return {"alexnet": "classifier.6", "vgg": "classifier.6", "resnet": "fc", "densenet":
            "classifier", "googlenet": "fc"}[_family(model_name)] + ".weight"  # fmt: skip


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _raise_unless_matching(what: str, model_name: str, unmapped, missing, mismatched) -> None:
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} unmapped tensor(s) {_names(unmapped)}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) {_names(missing)}")
    if mismatched:
        shown = [f"{k!r} is {got}, expected {want}" for k, got, want in sorted(mismatched)[:8]]
        more = f" and {len(mismatched) - 8} more" if len(mismatched) > 8 else ""
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(shown)}{more}")
    if problems:
        raise DataError(
            f"{what} does not match torchvision's {TWINS[model_name]} "
            f"(cnn_jax model {model_name!r}): {'; '.join(problems)}"
        )


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------

# Old torchvision DenseNet files name 'norm.1' what the module now calls 'norm1' (torchvision's own
# loader renames them the same way).
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|"
    r"num_batches_tracked))$"
)


def _canonical(state_dict: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """The state dict with legacy DenseNet names renamed and GoogLeNet's auxiliary heads
    (training-only classifiers with no twin) dropped."""
    if not isinstance(state_dict, Mapping):
        raise DataError(
            f"a state dict must map tensor names to arrays; got a {type(state_dict).__name__}"
        )
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise DataError(f"state dict key {key!r} is not a string")
        if _family(model_name) == "googlenet" and key.startswith(("aux1.", "aux2.")):
            continue
        if _family(model_name) == "densenet":
            key = _DENSENET_LEGACY.sub(r"\1\2", key)
        out[key] = value
    return out


def num_classes_of(state_dict: Mapping[str, Any], model_name: str) -> int:
    """The number of classes of the final layer of `state_dict` (torchvision names), 1000 when the
    layer is missing (`from_torchvision` then names it)."""
    _check_twin(model_name)
    head = _canonical(state_dict, model_name).get(_head_key(model_name))
    shape = np.shape(head) if head is not None else ()
    return int(shape[0]) if len(shape) == 2 and shape[0] >= 1 else 1000


def from_torchvision(state_dict: Mapping[str, Any], model_name: str) -> dict:
    """This zoo's variables `{'params': ..., ['batch_stats': ...]}` (nested dicts of float32
    numpy arrays) from a torchvision state dict of `model_name`'s twin (tensor names as in
    `torchvision.models.<name>().state_dict()`, values numpy arrays or anything `np.asarray`
    takes).

    The number of classes is the final layer's. `num_batches_tracked` and GoogLeNet's aux heads
    are dropped; any other tensor must map to exactly one variable of the same size. Raises
    `ConfigError` for a model without a twin and `DataError` naming every unmapped, missing,
    mis-shaped or non-float tensor.
    """
    _check_twin(model_name)
    from flax.traverse_util import unflatten_dict

    state = _canonical(state_dict, model_name)
    tensors = _tensors(model_name, num_classes_of(state, model_name))
    bn_counters = {f"{m}.num_batches_tracked" for m in _bn_modules(tensors)}
    expected = {t.torch_key for t in tensors}
    unmapped = set(state) - expected - bn_counters
    missing = expected - set(state)
    mismatched, not_float = [], []
    for t in tensors:
        if t.torch_key in state:
            shape = tuple(np.shape(state[t.torch_key]))
            if shape != t.torch_shape:
                mismatched.append((t.torch_key, shape, t.torch_shape))
            elif not np.issubdtype(np.asarray(state[t.torch_key]).dtype, np.floating):
                not_float.append(t.torch_key)
    _raise_unless_matching("the state dict", model_name, unmapped, missing, mismatched)
    if not_float:
        raise DataError(f"tensor(s) {_names(not_float)} are not floating point")
    flat = {
        (t.collection, *t.path): np.ascontiguousarray(
            t.to_flax(np.asarray(state[t.torch_key])), dtype=t.dtype
        )
        for t in tensors
    }
    return unflatten_dict(flat)


def to_torchvision(variables: Mapping[str, Any], model_name: str) -> dict[str, np.ndarray]:
    """torchvision's state dict (tensor name -> contiguous numpy array) of this zoo's variables of
    `model_name`'s twin, loadable with `torchvision.models.<name>(num_classes=...)
    .load_state_dict(...)` (GoogLeNet built with `aux_logits=False`). BatchNorm layers get a
    `num_batches_tracked` of 0. Raises `DataError` naming every variable without a torchvision
    tensor, every missing one and every size that differs from the twin's (e.g. variables of a
    model built with `cifar_stem=True`)."""
    _check_twin(model_name)
    import jax
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict

    flat = {
        "/".join(key): value
        for key, value in flatten_dict(unfreeze(dict(variables))).items()
        if key[0] in ("params", "batch_stats")
    }
    head = flat.get("/".join(("params", *HEADS[model_name], "kernel")))
    num_classes = int(np.shape(head)[-1]) if head is not None and np.ndim(head) == 2 else 1000
    tensors = _tensors(model_name, num_classes)
    by_name = {"/".join((t.collection, *t.path)): t for t in tensors}
    unmapped = set(flat) - set(by_name)
    missing = set(by_name) - set(flat)
    mismatched = [
        (name, tuple(np.shape(flat[name])), t.shape)
        for name, t in by_name.items()
        if name in flat and tuple(np.shape(flat[name])) != t.shape
    ]
    _raise_unless_matching("the variables", model_name, unmapped, missing, mismatched)
    state = {
        t.torch_key: np.ascontiguousarray(t.to_torch(np.asarray(jax.device_get(flat[name]))))
        for name, t in by_name.items()
    }
    for module in _bn_modules(tensors):
        state[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
    return state
