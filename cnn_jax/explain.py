"""What a CNN computes and why it predicts what it does, for any Flax module.

Every function takes a model (any `flax.linen.Module`, the zoo's or your own), its variables and
model inputs `x: float [N, H, W, C]` (already preprocessed, as the model sees them), and computes
under `jax.jit` (compiled once per model and layer).

Layers are named by their module path, as `model.apply(..., capture_intermediates=True)` would
('block1/conv1', 'head/hidden1'); `layer_shapes` lists them in call order. When the model takes
its activation function as an `act` field (every zoo model, and the convention in the README's
"Adding a model"), the activation is recorded too: 'block1/conv1:act' is the activation applied
to block1/conv1's output (its rectified map), and 'layer1_0:act' an activation applied inside
module layer1_0 to a value no module returned (a residual sum, for instance).

  * activations: `activations` (every layer, or the ones named), `layer_shapes`;
  * why this prediction: `saliency` (input gradient), `smoothgrad`, `grad_cam` (any layer with
    spatial maps), `occlusion` (a grey square swept over the image);
  * what a filter responds to (Zeiler & Fergus): `top_units` (the top-k dataset images per
    channel with the position of the strongest unit and its receptive-field box), `project`
    (guided backpropagation / deconvnet projection of a unit to pixel space, through a ReLU
    with a `jax.custom_vjp` backward pass), `maximize_activations` (inputs optimised to excite
    channels, with jitter and blur regularisation);
  * pictures (`save_*`, drawn with `cnn_jax.viz`): what `cnn-jax visualize` and the gallery
    experiment write.

Class scores are logits (before the softmax), as in Simonyan et al. and Grad-CAM; occlusion
records softmax probabilities, as Zeiler & Fergus did.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.errors import CnnJaxError, ConfigError, ShapeError
from cnn_jax.layers import activation_fn

ACT_SUFFIX = ":act"
RULES = ("guided", "deconvnet", "gradient")

# --------------------------------------------------------------------------------------------------
# Recording every module's output (and the activation applied to it) during one forward pass
# --------------------------------------------------------------------------------------------------


class _Recorder:
    """Records the output of every module call, in call order, through `nn.intercept_methods`;
    `wrap_act` wraps the model's activation so its results are recorded too. `perturb` adds an
    array to a named output (zeros, to take gradients with respect to that layer)."""

    def __init__(self, perturb: dict[str, jax.Array] | None = None):
        self.outputs: dict[str, jax.Array] = {}
        self.perturb = perturb or {}
        self._by_id: dict[int, str] = {}  # id(output array) -> its name: the act's input is one
        self._stack: list[nn.Module] = []  # modules being called, innermost last
        self._calls: Counter = Counter()

    def _unique(self, name: str) -> str:
        self._calls[name] += 1
        return name if self._calls[name] == 1 else f"{name}#{self._calls[name]}"

    def _record(self, name: str, out: jax.Array) -> jax.Array:
        if name in self.perturb:
            out = out + self.perturb[name].astype(out.dtype)
        self.outputs[name] = out
        self._by_id[id(out)] = name
        return out

    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        # A subclass calling super().__call__ (layers.Conv) is the same layer: record it once.
        if context.method_name != "__call__" or (self._stack and self._stack[-1] is module):
            return next_fun(*args, **kwargs)
        self._stack.append(module)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            self._stack.pop()
        if not module.path or not isinstance(out, jax.Array):  # the model itself; tuples
            return out
        return self._record(self._unique("/".join(module.path)), out)

    def wrap_act(self, fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
        def act(x: jax.Array) -> jax.Array:
            source = self._by_id.get(id(x))
            if source is None:  # applied to a value no module returned: name it by its caller
                caller = "/".join(self._stack[-1].path) if self._stack else ""
                source = caller or "model"
            return self._record(self._unique(source + ACT_SUFFIX), fn(x))

        return act


def has_act_field(model: nn.Module) -> bool:
    """Whether `model` takes its activation as an `act` field (every zoo model does)."""
    return any(f.name == "act" for f in dataclasses.fields(model))


def _takes_train(model: nn.Module) -> bool:
    try:
        return "train" in inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False


def _apply(model, variables, x, recorder: _Recorder, act=None) -> jax.Array:
    """model(x) in inference mode under `recorder`; `act` replaces the model's activation."""
    if has_act_field(model):
        model = model.clone(act=recorder.wrap_act(act or activation_fn(model.act)))
    elif act is not None:
        raise ConfigError(
            f"{type(model).__name__} has no 'act' field, so its activations cannot be replaced "
            "(guided backpropagation and deconvnet need them); build it with an act field as the "
            "zoo models do, or use rule='gradient'"
        )
    kwargs = {"train": False} if _takes_train(model) else {}
    with nn.intercept_methods(recorder.intercept):
        return model.apply(variables, x, **kwargs)


@functools.lru_cache(maxsize=64)
def _cached_jit(fn, model, static):
    return jax.jit(functools.partial(fn, model, *static))


def _jit(fn, model, *static):
    """jax.jit(fn) with `model` and `static` bound, compiled once per model (when hashable)."""
    try:
        return _cached_jit(fn, model, static)
    except TypeError:  # a model with an unhashable field: compiled per call
        return jax.jit(functools.partial(fn, model, *static))


def _as_input(x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ShapeError(f"x: expected model inputs [N, H, W, C], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(
            f"x: expected float model inputs (preprocessed), got dtype {x.dtype}; preprocess "
            "uint8 images first (cnn_jax.predict.preprocess_for_model)"
        )
    return x


# --------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------


def layer_shapes(model, variables, x) -> dict[str, tuple[int, ...]]:
    """Every recorded layer's output shape, in call order (shapes only: nothing is computed).
    x: model inputs [N, H, W, C] (or a `jax.ShapeDtypeStruct`)."""
    x = x if isinstance(x, jax.ShapeDtypeStruct) else _as_input(x)
    names: list[str] = []

    def forward(variables, x):
        recorder = _Recorder()
        _apply(model, variables, x, recorder)
        names.extend(recorder.outputs)  # eval_shape always traces, so this always runs
        return list(recorder.outputs.values())

    shapes = jax.eval_shape(forward, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return {name: tuple(s.shape) for name, s in zip(names, shapes)}


def check_layer(shapes: dict[str, tuple[int, ...]], layer: str, what: str = "layer") -> str:
    """`layer` if it is one of `shapes` (from `layer_shapes`), else a ConfigError listing them."""
    if layer in shapes:
        return layer
    close = difflib.get_close_matches(str(layer), list(shapes), n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise ConfigError(
        f"{what}={layer!r} is not a layer of this model{hint}; its layers: {', '.join(shapes)}"
    )


def default_cam_layer(shapes: dict[str, tuple[int, ...]]) -> str:
    """Grad-CAM's usual layer: the last rectified map with more than one position (the last
    conv's, before the head), or the block that merges it with maps of the same size (an
    Inception module's concatenation); else the last layer with spatial maps."""
    spatial = [n for n, s in shapes.items() if len(s) == 4 and s[1] * s[2] > 1]
    if not spatial:
        raise ConfigError("the model has no layer with spatial maps [N, H, W, C] for Grad-CAM")
    rectified = [n for n in spatial if ACT_SUFFIX in n]
    layer = (rectified or spatial)[-1]
    parts = layer.split(ACT_SUFFIX)[0].split("/")
    for depth in range(len(parts) - 1, 0, -1):  # outwards, while the maps keep their size
        container = "/".join(parts[:depth])
        if container not in spatial or shapes[container][1:3] != shapes[layer][1:3]:
            break
        layer = container
    return layer


def _capture_core(model, names, variables, x):
    recorder = _Recorder()
    logits = _apply(model, variables, x, recorder)
    return logits, [recorder.outputs[n].astype(jnp.float32) for n in names]


def activations(model, variables, x, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The outputs of every module (or of the named `layers`) for inputs x [N, H, W, C], in call
    order: name -> float32 [N, ...] ([N, H', W', C'] for conv and pooling layers, [N, D] for
    dense ones), with the rectified maps ('NAME:act') where the model has an `act` field."""
    x = _as_input(x)
    shapes = layer_shapes(model, variables, x)
    names = tuple(shapes) if layers is None else tuple(check_layer(shapes, n) for n in layers)
    _, outputs = _jit(_capture_core, model, names)(variables, x)
    return {n: np.asarray(a) for n, a in zip(names, outputs)}


def logits(model, variables, x) -> np.ndarray:
    """The model's float32 outputs for inputs x [N, H, W, C]."""
    out, _ = _jit(_capture_core, model, ())(variables, _as_input(x))
    return np.asarray(out, np.float32)


# --------------------------------------------------------------------------------------------------
# Why this prediction: saliency, SmoothGrad, Grad-CAM, occlusion
# --------------------------------------------------------------------------------------------------


def _targets(model, variables, x, target) -> jax.Array:
    """target as int32 [N]: the given class (one for all, or one per image), else predicted."""
    if target is None:
        return jnp.asarray(logits(model, variables, x).argmax(-1), jnp.int32)
    t = np.broadcast_to(np.asarray(target), (x.shape[0],)).astype(np.int64)
    return jnp.asarray(t, jnp.int32)


def _class_score(out: jax.Array, target: jax.Array) -> jax.Array:
    """Sum over the batch of each image's target logit (images are independent at inference)."""
    out = out.astype(jnp.float32)
    if out.ndim != 2:
        raise ShapeError(f"the model's output must be [N, classes] logits, got {out.shape}")
    return jnp.take_along_axis(out, target[:, None], axis=1).sum()


def _check_target(model, variables, x, target) -> jax.Array:
    t = _targets(model, variables, x, target)
    classes = logits(model, variables, x[:1]).shape[-1]
    bad = [int(c) for c in np.asarray(t) if not 0 <= c < classes]
    if bad:
        raise ConfigError(f"target={bad[0]} is not a class of this model (0..{classes - 1})")
    return t


def _input_gradient_core(model, variables, x, target):
    def score(x):
        return _class_score(_apply(model, variables, x, _Recorder()), target)

    return jax.grad(score)(x)


def saliency(model, variables, x, target=None) -> np.ndarray:
    """Simonyan et al.'s saliency: |d score / d input|, the maximum over colour channels:
    float32 [N, H, W]. target: a class (or one per image); default: the predicted class."""
    x = _as_input(x)
    t = _check_target(model, variables, x, target)
    grads = _jit(_input_gradient_core, model)(variables, x, t)
    return np.asarray(jnp.abs(grads).max(axis=-1), np.float32)


def _smoothgrad_core(model, samples, variables, x, target, noise):
    def one(n):
        g = _input_gradient_core(model, variables, x + n, target)
        return jnp.abs(g).max(axis=-1)

    return jax.lax.map(one, noise, batch_size=min(samples, 8)).mean(axis=0)


def smoothgrad(
    model, variables, x, target=None, *, samples: int = 32, noise: float = 0.15, seed: int = 0
) -> np.ndarray:
    """SmoothGrad (Smilkov et al.): the saliency map averaged over `samples` copies of each
    image with Gaussian noise of std `noise` x (the image's max - min): float32 [N, H, W]."""
    if int(samples) < 1 or not noise >= 0:
        raise ConfigError(f"smoothgrad: samples={samples} must be >= 1 and noise={noise} >= 0")
    x = _as_input(x)
    t = _check_target(model, variables, x, target)
    sigma = noise * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
    # NumPy draws the noise: a JAX generator inside the compiled function costs seconds to compile
    draws = np.random.default_rng(seed).standard_normal((int(samples), *x.shape), np.float32)
    draws *= np.asarray(sigma)[None, :, None, None, None]
    out = _jit(_smoothgrad_core, model, int(samples))(variables, x, t, jnp.asarray(draws))
    return np.asarray(out, np.float32)


def _grad_cam_core(model, layer, shape, variables, x, target):
    def score(delta):
        recorder = _Recorder(perturb={layer: delta})
        out = _apply(model, variables, x, recorder)
        return _class_score(out, target), recorder.outputs[layer].astype(jnp.float32)

    grads, maps = jax.grad(score, has_aux=True)(jnp.zeros(shape, jnp.float32))
    weights = grads.mean(axis=(1, 2), keepdims=True)  # alpha_k: the pooled gradients
    return jax.nn.relu((weights * maps).sum(axis=-1))


def layer_field(model, input_shape: Sequence[int], layer: str):
    """The receptive field (`cnn_jax.receptive_field.LayerReceptiveField`: size, jump and start
    per axis) of `layer` ('NAME:act' has NAME's) for inputs of `input_shape` (H, W, C), or None
    when it is global (dense layers) or cannot be derived (a module the analysis cannot trace)."""
    return _fields(model, tuple(int(s) for s in input_shape)).get(layer.split(ACT_SUFFIX)[0])


@functools.lru_cache(maxsize=16)
def _cached_fields(model, input_shape):
    return _read_fields(model, input_shape)


def _fields(model, input_shape) -> dict[str, Any]:
    try:
        return _cached_fields(model, input_shape)
    except TypeError:  # unhashable model
        return _read_fields(model, input_shape)


def _read_fields(model, input_shape) -> dict[str, Any]:
    try:
        from cnn_jax.receptive_field import receptive_fields

        records = receptive_fields(model, input_shape)
    except (ImportError, TypeError, ValueError, CnnJaxError):
        return {}  # e.g. a module without a `train` argument: callers fall back
    seen = Counter(r.path for r in records)
    return {r.path: r for r in records if seen[r.path] == 1 and not r.is_global}


def field_box(field, i: int, j: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), bottom and right exclusive, of the input pixels unit (i, j)
    of a layer with receptive field `field` sees, clipped to an image of `size` (H, W)."""
    (top, bottom), (left, right) = field.window(int(i), int(j))
    h, w = size
    return (
        max(0, math.ceil(top)),
        max(0, math.ceil(left)),
        min(h, math.floor(bottom) + 1),
        min(w, math.floor(right) + 1),
    )


def upsample(maps, size: tuple[int, int], field=None) -> np.ndarray:
    """Maps [N, h, w] of a layer interpolated (bilinearly) to input pixels [N, H, W]. With the
    layer's receptive field, unit (i, j) is placed at the centre of the input window it sees
    (start + i * jump), values beyond the outermost centres held constant; without, the map is
    stretched over the image (as most Grad-CAM code does, which shifts maps of unpadded
    layers towards the corners)."""
    maps = np.asarray(maps, np.float32)
    if field is None:
        resized = jax.image.resize(jnp.asarray(maps), (maps.shape[0], *size), "bilinear")
        return np.asarray(resized)
    out = maps
    for axis, (n_in, start, jump) in enumerate(zip(size, field.start, field.jump)):
        # fractional unit index of every input pixel along this axis, clamped to the map
        position = np.clip(
            (np.arange(n_in) - float(start)) / float(jump), 0, out.shape[axis + 1] - 1
        )
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, out.shape[axis + 1] - 1)
        frac = (position - low).reshape([-1 if a == axis + 1 else 1 for a in range(3)])
        out = (
            np.take(out, low, axis=axis + 1) * (1 - frac) + np.take(out, high, axis=axis + 1) * frac
        )
    return out.astype(np.float32)


def grad_cam(
    model, variables, x, target=None, *, layer: str | None = None
) -> tuple[np.ndarray, str]:
    """Grad-CAM (Selvaraju et al.) at `layer` (default: `default_cam_layer`): ReLU of the layer's
    channels weighted by the spatial mean of the class score's gradient, upsampled to the input
    and scaled to [0, 1] per image. Returns (float32 [N, H, W], the layer used)."""
    x = _as_input(x)
    shapes = layer_shapes(model, variables, x)
    layer = default_cam_layer(shapes) if layer is None else check_layer(shapes, layer)
    shape = shapes[layer]
    if len(shape) != 4:
        raise ConfigError(
            f"layer={layer!r} has output shape {shape}; Grad-CAM needs a layer with spatial maps "
            "[N, H, W, C] (a convolution, activation or pooling layer)"
        )
    t = _check_target(model, variables, x, target)
    cam = _jit(_grad_cam_core, model, layer, shape)(variables, x, t)
    cam = upsample(cam, x.shape[1:3], layer_field(model, x.shape[1:], layer))
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0).astype(np.float32), layer


@dataclasses.dataclass
class Occlusion:
    """Occlusion sensitivity for one image (Zeiler & Fergus, Fig. 7).

    probs: [gy, gx] the target's probability with the square's top-left corner at
    (tops[i], lefts[j]); base: its probability without occlusion; sensitivity: [H, W] per pixel,
    the mean drop (base - prob) over the squares that cover it."""

    target: int
    size: int
    stride: int
    tops: np.ndarray
    lefts: np.ndarray
    probs: np.ndarray
    base: float
    sensitivity: np.ndarray


def _occlusion_core(model, size, variables, image, target, corners, fill):
    patch = jnp.broadcast_to(fill.astype(image.dtype), (size, size, image.shape[-1]))

    def occlude(corner):
        return jax.lax.dynamic_update_slice(image, patch, (corner[0], corner[1], 0))

    out = _apply(model, variables, jax.vmap(occlude)(corners), _Recorder())
    return jax.nn.softmax(out.astype(jnp.float32), axis=-1)[:, target]


def _positions(n: int, size: int, stride: int) -> np.ndarray:
    last = n - size
    return np.unique(np.append(np.arange(0, last + 1, stride), last))


def occlusion(
    model,
    variables,
    image,
    target: int | None = None,
    *,
    size: int | None = None,
    stride: int | None = None,
    fill: float | Sequence[float] = 0.0,
    batch_size: int = 64,
) -> Occlusion:
    """The target's probability as a `size` x `size` square of value `fill` is swept over one
    image [H, W, C] (model input) with `stride`. Defaults: size a quarter of the shorter side,
    stride a quarter of the size; fill 0, the dataset's mean colour for inputs normalised by
    mean and std (every cnn_jax dataset). target: default the predicted class."""
    image = _as_input(jnp.asarray(image)[None])[0]
    h, w, c = image.shape
    size = int(size) if size is not None else max(1, min(h, w) // 4)
    stride = int(stride) if stride is not None else max(1, size // 4)
    if not 1 <= size <= min(h, w):
        raise ConfigError(f"occlusion size={size} must be between 1 and the image side {min(h, w)}")
    if stride < 1:
        raise ConfigError(f"occlusion stride={stride} must be >= 1")
    fill_arr = jnp.broadcast_to(jnp.asarray(fill, jnp.float32), (c,))
    t = int(_check_target(model, variables, image[None], target)[0])
    tops, lefts = _positions(h, size, stride), _positions(w, size, stride)
    corners = np.stack(np.meshgrid(tops, lefts, indexing="ij"), -1).reshape(-1, 2)
    run = _jit(_occlusion_core, model, size)
    chunk = min(batch_size, len(corners))
    probs = []
    for start in range(0, len(corners), chunk):  # equal chunks: one compilation
        part = corners[start : start + chunk]
        padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
        probs.append(
            np.asarray(run(variables, image, t, jnp.asarray(padded), fill_arr))[: len(part)]
        )
    probs = np.concatenate(probs).reshape(len(tops), len(lefts))
    base = float(jax.nn.softmax(logits(model, variables, image[None])[0])[t])
    drop, count = np.zeros((h, w), np.float64), np.zeros((h, w), np.float64)
    for i, top in enumerate(tops):
        for j, left in enumerate(lefts):
            drop[top : top + size, left : left + size] += base - probs[i, j]
            count[top : top + size, left : left + size] += 1
    sensitivity = (drop / np.maximum(count, 1)).astype(np.float32)
    return Occlusion(t, size, stride, tops, lefts, probs.astype(np.float32), base, sensitivity)


# --------------------------------------------------------------------------------------------------
# Zeiler & Fergus: projections to pixel space, top dataset units, activation maximisation
# --------------------------------------------------------------------------------------------------


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass lets through only positive gradients at positive inputs
    (guided backpropagation, Springenberg et al.)."""
    return jax.nn.relu(x)


def _guided_fwd(x):
    return jax.nn.relu(x), x


def _guided_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_fwd, _guided_bwd)


@jax.custom_vjp
def deconv_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass rectifies the gradient itself, whatever the forward input
    (Zeiler & Fergus' deconvnet)."""
    return jax.nn.relu(x)


def _deconv_fwd(x):
    return jax.nn.relu(x), None


def _deconv_bwd(_, g):
    return (jax.nn.relu(g),)


deconv_relu.defvjp(_deconv_fwd, _deconv_bwd)

_RULE_ACTS = {"guided": guided_relu, "deconvnet": deconv_relu, "gradient": None}


def _is_relu(act) -> bool:
    return act == "relu" or act in (nn.relu, jax.nn.relu)


def _unit_map(recorder: _Recorder, out, layer, channel) -> jax.Array:
    """[N, P]: for each image, its `channel` (per image) of `layer` flattened over positions."""
    a = (out if layer is None else recorder.outputs[layer]).astype(jnp.float32)
    a = jnp.take_along_axis(a, channel.reshape((-1,) + (1,) * (a.ndim - 1)), axis=-1)[..., 0]
    return a.reshape(a.shape[0], -1)


def _project_core(model, layer, rule, variables, x, channel, position):
    def score(x):
        recorder = _Recorder()
        out = _apply(model, variables, x, recorder, act=_RULE_ACTS[rule])
        units = _unit_map(recorder, out, layer, channel)
        pick = jnp.where(position < 0, units.argmax(axis=1), position)  # -1: the strongest
        return jnp.take_along_axis(units, pick[:, None], axis=1).sum()

    return jax.grad(score)(x)


def project(
    model,
    variables,
    x,
    *,
    layer: str | None = None,
    channel=None,
    position=None,
    rule: str = "guided",
) -> np.ndarray:
    """One unit per image projected back to pixel space: the gradient of the unit with respect
    to the input, with every ReLU's backward pass replaced (`rule`): 'guided' (guided
    backpropagation), 'deconvnet' (Zeiler & Fergus) or 'gradient' (plain). float32 [N, H, W, C].

    layer: default the model's output, with `channel` the class (default: the predicted one);
    channel: one for all images or one per image; position: the unit's flat index in the
    channel's map (one or per image; default: each image's strongest unit).
    'guided' and 'deconvnet' need a model with ReLU as its `act` field."""
    x = _as_input(x)
    if rule not in RULES:
        raise ConfigError(f"rule={rule!r} is not valid; expected one of {list(RULES)}")
    if rule != "gradient" and not (has_act_field(model) and _is_relu(model.act)):
        act = getattr(model, "act", None)
        raise ConfigError(
            f"rule={rule!r} replaces ReLU's backward pass, but {type(model).__name__} has "
            f"act={act!r}; use rule='gradient' or a model with act='relu'"
        )
    n = x.shape[0]
    if layer is None:
        channel = _check_target(model, variables, x, channel)
    else:
        shapes = layer_shapes(model, variables, x)
        width = shapes[check_layer(shapes, layer)][-1]
        channel = np.broadcast_to(np.asarray(0 if channel is None else channel), (n,))
        if not ((channel >= 0) & (channel < width)).all():
            raise ConfigError(f"channel={channel.tolist()} out of range for {layer!r} ({width})")
        channel = jnp.asarray(channel, jnp.int32)
    position = jnp.asarray(np.broadcast_to(-1 if position is None else position, (n,)), jnp.int32)
    grads = _jit(_project_core, model, layer, rule)(variables, x, channel, position)
    return np.asarray(grads, np.float32)


def guided_grad_cam(
    model, variables, x, target=None, *, layer: str | None = None
) -> tuple[np.ndarray, str]:
    """Guided Grad-CAM (Selvaraju et al.): the guided-backpropagation map of the class score
    times the upsampled Grad-CAM map, pixel-sharp and class-discriminative. Returns (float32
    [N, H, W, C], the Grad-CAM layer used)."""
    x = _as_input(x)
    t = _check_target(model, variables, x, target)
    cam, layer = grad_cam(model, variables, x, t, layer=layer)
    guided = project(model, variables, x, channel=t, rule="guided")
    return guided * cam[..., None], layer


@dataclasses.dataclass
class TopUnits:
    """The k dataset images that excite each channel of `layer` most (`top_units`).

    For channel `channels[i]`, its j-th strongest image is `index[i, j]`, whose strongest unit
    (value `value[i, j]`) sits at (`y[i, j]`, `x[i, j]`) in the layer's map; `boxes[i, j]` is
    the input region that unit sees, (top, left, bottom, right), bottom and right exclusive,
    clipped to the image."""

    layer: str
    channels: np.ndarray
    index: np.ndarray
    y: np.ndarray
    x: np.ndarray
    value: np.ndarray
    boxes: np.ndarray


def _channel_max_core(model, layer, variables, x):
    recorder = _Recorder()
    _apply(model, variables, x, recorder)
    a = recorder.outputs[layer].astype(jnp.float32)
    a = a.reshape(a.shape[0], -1, a.shape[-1])  # [N, positions, C]
    return a.max(axis=1), a.argmax(axis=1)


def top_units(
    model,
    variables,
    images,
    *,
    layer: str,
    k: int = 9,
    channels: Sequence[int] | None = None,
    batch_size: int = 256,
) -> TopUnits:
    """For each channel of `layer` (default all), the `k` images of `images` (model inputs
    [N, H, W, C], a dataset split) whose strongest unit in that channel is strongest, with the
    unit's position and the input box it sees: its receptive field (`layer_field`), clipped to
    the image, or where that cannot be derived, the support of the unit's input gradient."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ShapeError(f"images: expected model inputs [N, H, W, C], got {images.shape}")
    shapes = layer_shapes(model, variables, jnp.asarray(images[:1], jnp.float32))
    shape = shapes[check_layer(shapes, layer)]
    width = shape[-1]
    channels = np.arange(width) if channels is None else np.asarray(channels, np.int64)
    if channels.ndim != 1 or not ((channels >= 0) & (channels < width)).all():
        raise ConfigError(f"channels={channels.tolist()} out of range for {layer!r} ({width})")
    k = min(int(k), len(images))
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1")
    run = _jit(_channel_max_core, model, layer)
    batch = min(batch_size, len(images))
    maxima, argmax = [], []
    for start in range(0, len(images), batch):  # equal batches: one compilation
        part = images[start : start + batch]
        pad = np.repeat(part[-1:], batch - len(part), axis=0)
        m, a = run(variables, jnp.asarray(np.concatenate([part, pad]), jnp.float32))
        maxima.append(np.asarray(m)[: len(part)])
        argmax.append(np.asarray(a)[: len(part)])
    maxima, argmax = np.concatenate(maxima)[:, channels], np.concatenate(argmax)[:, channels]
    order = np.argsort(-maxima, axis=0, kind="stable")[:k].T  # [C', k] image indices
    value = np.take_along_axis(maxima.T, order, axis=1)
    flat = np.take_along_axis(argmax.T, order, axis=1)
    map_w = shape[2] if len(shape) == 4 else 1
    ys, xs = flat // map_w, flat % map_w
    field = layer_field(model, images.shape[1:], layer) if len(shape) == 4 else None
    if field is not None:
        boxes = np.array(
            [field_box(field, y, x, images.shape[1:3]) for y, x in zip(ys.ravel(), xs.ravel())]
        ).reshape(*ys.shape, 4)
    elif len(shape) == 4:  # no analytical field: the support of each unit's input gradient
        boxes = _gradient_boxes(model, variables, images, layer, channels, order, flat)
    else:  # a dense layer sees the whole image
        boxes = np.broadcast_to([0, 0, *images.shape[1:3]], (*ys.shape, 4)).copy()
    return TopUnits(layer, channels, order, ys, xs, value, boxes)


def _gradient_boxes(model, variables, images, layer, channels, index, flat) -> np.ndarray:
    """[C', k, 4] bounding boxes of the input-gradient support of each chosen unit."""
    c, k = index.shape
    x = jnp.asarray(images[index.reshape(-1)], jnp.float32)
    grads = project(
        model,
        variables,
        x,
        layer=layer,
        channel=np.repeat(channels, k),
        position=flat.reshape(-1),
        rule="gradient",
    )
    boxes = np.array([_support_box(g) for g in np.abs(grads).sum(axis=-1)])
    return boxes.reshape(c, k, 4)


def _support_box(grad2d: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(grad2d.any(axis=1)), np.flatnonzero(grad2d.any(axis=0))
    if len(rows) == 0:  # a unit the input cannot move (dead): the whole image
        return 0, 0, grad2d.shape[0], grad2d.shape[1]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def crop(image, box) -> np.ndarray:
    """image [H, W, ...] cut to box (top, left, bottom, right)."""
    top, left, bottom, right = (int(v) for v in box)
    return np.asarray(image)[top:bottom, left:right]


def _gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """Depthwise Gaussian blur of [N, H, W, C] (3-sigma radius, at least 1 pixel)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    g = np.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    g /= g.sum()
    c = x.shape[-1]
    kernel = jnp.asarray(np.tile(np.outer(g, g)[:, :, None, None], (1, 1, 1, c)), x.dtype)
    padded = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    return jax.lax.conv_general_dilated(
        padded, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )  # fmt: skip


def _maximize_core(model, layer, steps, blur, variables, channels, starts, shifts, hyper, lo, hi):
    import optax

    learning_rate, l2 = hyper
    blur_sigma, blur_every = blur
    tx = optax.adam(learning_rate)

    def one(channel, x, shifts):  # one channel
        def centre_unit(x):
            """The channel's centre unit (its only unit for dense layers and the output)."""
            recorder = _Recorder()
            out = _apply(model, variables, x, recorder)
            a = (out if layer is None else recorder.outputs[layer])[0, ..., channel]
            return a[a.shape[0] // 2, a.shape[1] // 2].astype(jnp.float32) if a.ndim == 2 else a

        def objective(x, shift):
            value = centre_unit(jnp.roll(x, shift, axis=(1, 2)))
            return -value + l2 * jnp.mean(jnp.square(x - (lo + hi) / 2))

        def step(i, carry):
            x, opt_state = carry
            updates, opt_state = tx.update(jax.grad(objective)(x, shifts[i]), opt_state, x)
            x = optax.apply_updates(x, updates)
            if blur_every:
                x = jnp.where((i + 1) % blur_every == 0, _gaussian_blur(x, blur_sigma), x)
            return jnp.clip(x, lo, hi), opt_state

        x, _ = jax.lax.fori_loop(0, steps, step, (x[None], tx.init(x[None])))
        return x[0], centre_unit(x)

    # vmapped `chunk` channels at a time: memory stays bounded for large models, many channels
    chunk = min(8, len(channels))
    return jax.lax.map(lambda a: one(*a), (channels, starts, shifts), batch_size=chunk)


def maximize_activation(
    model, variables, input_shape: Sequence[int], *, channel: int = 0, **options
) -> tuple[np.ndarray, float]:
    """`maximize_activations` for one channel: (input [H, W, C], the unit's value for it)."""
    images, reached = maximize_activations(
        model, variables, input_shape, channels=[channel], **options
    )
    return images[0], float(reached[0])


def maximize_activations(
    model,
    variables,
    input_shape: Sequence[int],
    *,
    layer: str | None = None,
    channels: Sequence[int] = (0,),
    steps: int = 200,
    learning_rate: float = 0.05,
    jitter: int = 2,
    blur_sigma: float = 0.5,
    blur_every: int = 4,
    l2: float = 1e-3,
    value_range: tuple[Any, Any] = (-3.0, 3.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """For each of `channels` of `layer`, an input [H, W, C] optimised (Adam, `steps`) to
    excite the channel's centre unit, whose receptive field the pattern fills (default layer:
    the model's output, channels classes). Regularised as in Yosinski et al.: each step sees
    the input shifted by up to `jitter` pixels, it is blurred (Gaussian, `blur_sigma`) every
    `blur_every` steps, pulled to mid-range by `l2`, and clipped to `value_range` (model-input
    units; per channel allowed). Returns (inputs [K, H, W, C], the units' values for them [K]);
    the channels are optimised together. Use pre-activation layers ('block1/conv1', not
    ':act'): a rectified unit that starts at 0 has no gradient."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ShapeError(f"input_shape: expected (H, W, C), got {input_shape!r}")
    if int(steps) < 0 or int(jitter) < 0 or int(blur_every) < 0:
        raise ConfigError("maximize_activation: steps, jitter and blur_every must be >= 0")
    spec = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    if layer is None:
        out = jax.eval_shape(lambda v, x: _apply(model, v, x, _Recorder()), variables, spec)
        width = out.shape[-1]
    else:
        shapes = layer_shapes(model, variables, spec)
        width = shapes[check_layer(shapes, layer)][-1]
    channels = np.asarray(channels, np.int64).reshape(-1)
    bad = [int(c) for c in channels if not 0 <= c < width]
    if bad or len(channels) == 0:
        raise ConfigError(
            f"channel={bad[0] if bad else None} out of range for {layer or 'the output'!r} "
            f"({width})"
        )
    lo = np.broadcast_to(np.asarray(value_range[0], np.float32), (shape[-1],))
    hi = np.broadcast_to(np.asarray(value_range[1], np.float32), (shape[-1],))
    # NumPy draws the starts and the shifts: a JAX generator would cost seconds of compiling
    rng = np.random.default_rng(seed)
    k = len(channels)
    starts = (lo + hi) / 2 + 0.01 * rng.standard_normal((k, *shape), np.float32)
    shifts = rng.integers(-int(jitter), int(jitter) + 1, (k, max(int(steps), 1), 2), np.int32)
    hyper = (jnp.float32(learning_rate), jnp.float32(l2))
    blur = (float(blur_sigma), int(blur_every))
    # a multiple of the chunk `_maximize_core` vmaps (padded with the last channel): one loop
    # body to compile, not a second for the remainder
    lanes = np.minimum(np.arange(-(-k // min(8, k)) * min(8, k)), k - 1)
    run = _jit(_maximize_core, model, layer, int(steps), blur)
    images, reached = run(
        variables, jnp.asarray(channels[lanes], jnp.int32), jnp.asarray(starts[lanes]),
        jnp.asarray(shifts[lanes]), hyper, jnp.asarray(lo), jnp.asarray(hi),
    )  # fmt: skip
    return np.asarray(images, np.float32)[:k], np.asarray(reached, np.float32)[:k]


# --------------------------------------------------------------------------------------------------
# Pictures: the functions above drawn with cnn_jax.viz (used by `cnn-jax visualize` and the
# gallery experiment). Each writes PNG files and returns their paths.
# --------------------------------------------------------------------------------------------------


def layer_file_name(layer: str) -> str:
    """A layer name as a file name: 'block1/conv1:act' -> 'block1_conv1_act'."""
    return layer.replace("/", "_").replace(":", "_").replace("#", "_")


def _leaf_layers(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The layers that are not containers of other layers (a block's output repeats its last
    child's), without the ':act' entries (drawn beside their layer)."""
    names = [n for n in shapes if ACT_SUFFIX not in n]
    leaves = [n for n in names if not any(m.startswith(n + "/") for m in names)]
    # an activation applied inside a container to a value no module returned ('layer1_0:act')
    leaves += [n for n in shapes if n.endswith(ACT_SUFFIX) and n.split(ACT_SUFFIX)[0] not in leaves]
    return [n for n in shapes if n in leaves]


def save_activations(
    model,
    variables,
    x,
    outdir,
    *,
    layers: Sequence[str] | None = None,
    per_page: int = 64,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> list:
    """Every channel of every layer (or of `layers`) for one input x [1, H, W, C], before and
    after its activation: one file per layer with spatial maps (LAYER.png, paginated by
    `viz.plot_channel_pages`), and dense.png with the fully connected layers as bars."""
    from pathlib import Path

    from cnn_jax import viz

    x = _as_input(x)[:1]
    shapes = layer_shapes(model, variables, x)
    chosen = _leaf_layers(shapes) if layers is None else [check_layer(shapes, n) for n in layers]
    wanted = list(
        dict.fromkeys(chosen + [n + ACT_SUFFIX for n in chosen if n + ACT_SUFFIX in shapes])
    )
    acts = activations(model, variables, x, wanted)
    outdir = Path(outdir)
    written, dense = [], {}
    for name in chosen:
        group = {n: acts[n][0] for n in (name, name + ACT_SUFFIX) if n in acts}
        if len(shapes[name]) == 4:
            written += viz.plot_channel_pages(
                group, outdir / f"{layer_file_name(name)}.png", per_page=per_page, title=title
            )
        else:
            dense.update({n: a.reshape(-1) for n, a in group.items()})
    if dense:
        written.append(
            viz.plot_dense_layers(dense, outdir / "dense.png", title=title, class_names=class_names)
        )
    return written


def save_saliency(
    model, variables, x, path, *, target=None, class_name="", samples=32, noise=0.15, title=""
):
    """saliency and SmoothGrad over one input x [1, H, W, C], in one PNG."""
    from cnn_jax import viz

    x = _as_input(x)[:1]
    maps = {
        "saliency": saliency(model, variables, x, target)[0],
        f"SmoothGrad ({samples} samples)": smoothgrad(
            model, variables, x, target, samples=samples, noise=noise
        )[0],
    }
    label = f"|d logit({class_name}) / d pixel|"
    return viz.plot_overlays(
        x[0], maps, path, title=title, colorbar_labels=dict.fromkeys(maps, label)
    )


def save_grad_cam(model, variables, x, path, *, target=None, layer=None, class_name="", title=""):
    """Grad-CAM and Guided Grad-CAM (its positive part) over one input x [1, H, W, C]."""
    from cnn_jax import viz

    x = _as_input(x)[:1]
    cam, layer = grad_cam(model, variables, x, target, layer=layer)
    guided = project(model, variables, x, channel=target, rule="guided") * cam[..., None]
    maps = {f"Grad-CAM at {layer}": cam[0], "Guided Grad-CAM": np.maximum(guided[0], 0).sum(-1)}
    labels = {f"Grad-CAM at {layer}": f"evidence for {class_name} (max = 1)"}
    return viz.plot_overlays(x[0], maps, path, title=title, colorbar_labels=labels)


def save_occlusion(
    model, variables, x, path, *, target=None, size=None, stride=None, class_name="", title=""
):
    """Zeiler & Fergus' occlusion figure for one input x [1, H, W, C]. Returns (path, Occlusion)."""
    from cnn_jax import viz

    x = _as_input(x)[:1]
    occ = occlusion(model, variables, x[0], target, size=size, stride=stride)
    picture = viz.plot_occlusion(
        x[0], occ.probs, occ.tops, occ.lefts, occ.size, occ.base, path,
        class_name=class_name, title=title,
    )  # fmt: skip
    return picture, occ


def save_top_patches(
    model,
    variables,
    images,
    path,
    *,
    layer: str,
    k: int = 9,
    channels: Sequence[int] | None = None,
    rule: str = "guided",
    title: str = "",
    per_page: int = 16,
):
    """Zeiler & Fergus' figure for `layer`: per channel its top-k patches of `images` (model
    inputs [N, H, W, C]) cropped to the unit's receptive field, beside the same units projected
    to pixel space with `rule`. Returns (paths, TopUnits)."""
    from cnn_jax import viz

    top = top_units(model, variables, images, layer=layer, k=k, channels=channels)
    c, k = top.index.shape
    map_w = layer_shapes(model, variables, jnp.asarray(images[:1], jnp.float32))[layer]
    map_w = map_w[2] if len(map_w) == 4 else 1
    projections = project(
        model, variables, jnp.asarray(images[top.index.reshape(-1)], jnp.float32),
        layer=layer, channel=np.repeat(top.channels, k),
        position=(top.y * map_w + top.x).reshape(-1), rule=rule,
    ).reshape(c, k, *images.shape[1:])  # fmt: skip
    patches = [[crop(images[i], b) for i, b in zip(top.index[r], top.boxes[r])] for r in range(c)]
    projs = [[crop(projections[r, j], top.boxes[r, j]) for j in range(k)] for r in range(c)]
    labels = [
        f"ch {ch}" + (" (never > 0)" if top.value[r].max() <= 0 else "")
        for r, ch in enumerate(top.channels)
    ]
    field = layer_field(model, images.shape[1:], layer)
    seen = f"receptive field {field.size[0]}x{field.size[1]}" if field else "input-gradient support"
    heading = (f"{title}: " if title else "") + (
        f"{layer}, top {k} of {len(images)} images per channel, patches cropped to the {seen}"
    )
    paths = viz.plot_top_patches(
        patches, path, row_labels=labels, projections=projs, per_page=per_page,
        projection_name={"guided": "guided backprop", "deconvnet": "deconvnet"}.get(rule, rule),
        title=heading,
    )  # fmt: skip
    return paths, top


def save_maximized(
    model,
    variables,
    input_shape,
    path,
    *,
    layer: str | None = None,
    channels: Sequence[int] = (0,),
    names: Sequence[str] | None = None,
    title: str = "",
    **options,
):
    """One optimised input per channel of `layer` (default: the classes), in a grid.
    options: `maximize_activations`' (steps, jitter, blur_sigma, value_range, ...)."""
    from cnn_jax import viz

    images, reached = maximize_activations(
        model, variables, input_shape, layer=layer, channels=list(channels), **options
    )
    names = names if names is not None else [f"ch {c}" for c in channels]
    titles = [f"{name}: {value:.3g}" for name, value in zip(names, reached)]
    heading = (f"{title}: " if title else "") + (
        f"inputs that excite {layer} (its centre unit)"
        if layer
        else "inputs that excite each class (logit)"
    )
    return viz.plot_image_grid(images, titles, path, suptitle=heading)


def centre_unit_boxes(model, input_shape: Sequence[int]) -> dict[str, tuple[tuple, tuple]]:
    """For every conv and pooling layer with a receptive field: (the input box its centre unit
    sees, clipped to the image; the field's size (H, W)), what `viz.plot_receptive_fields`
    draws."""
    h, w = int(input_shape[0]), int(input_shape[1])
    boxes = {}
    for path, field in _fields(model, tuple(int(s) for s in input_shape)).items():
        if field.module.endswith(("Conv", "Pool")) and field.output_shape:
            oh, ow = field.output_shape[1:3]
            box = field_box(field, (oh - 1) // 2, (ow - 1) // 2, (h, w))
            boxes[path] = (box, tuple(field.size))
    return boxes
