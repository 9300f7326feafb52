"""The explorer's model side: one compiled function from a uint8 image to every layer's output,
the layers' geometry for the page's hover highlights, and the decoding of request bodies.

Layers are found while the model is traced: a Flax method interceptor sees every module call,
and keeps the convolutions and poolings (the modules `cnn_jax.predict.layer_activations`
captures: class names ending in Conv or Pool) and the dense layers, in call order, with their
input and output shapes and (for `nn.Conv` and `cnn_jax.layers.Pool`) window, stride, dilation
and padding. The same tracing inside `jax.jit` returns their outputs, so the page gets the model
input, every map, every dense layer and the softmax from one compiled call.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import time
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import layers as layers_lib
from cnn_jax import predict
from cnn_jax.errors import CnnJaxError, DataError

# Channels of one conv/pool layer sent to the page (the first ones); every unit of a dense layer is.
MAX_CHANNELS = 32
# Request images are decoded only up to this many pixels (a small PNG can declare a huge canvas).
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
RAW_CONTENT_TYPE = "application/octet-stream"


class ImageTooLarge(DataError):
    """A request image with more pixels than `MAX_IMAGE_PIXELS`."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution, pooling or dense layer as the page sees it.

    `shape` is the output without the batch axis ([H, W, C] or [units]); `shown` the channels
    (units) sent. Per spatial dim (rows, cols), for a conv or pooling window:

    * window, stride, dilation, pad: unit i reads units `i * stride - pad .. i * stride - pad +
      (window - 1) * dilation` of its input. None when the layer is not a plain window (an
      adaptive pooling, a dilated input).
    * source: the layer whose maps show that input (-1: the model input; None: not known): the
      layer whose output it is given as it is (a shortcut conv), else (after an activation, a
      norm, a sum) the latest earlier layer whose output has the input's shape. Exact for a chain
      of layers; after a residual sum it is one of the summed layers, so the window is in place.
    * rf_start, rf_jump, rf_size: unit i's receptive field is input rows `rf_start + i * rf_jump
      .. rf_start + i * rf_jump + rf_size - 1` (the window composed back to the input, may reach
      into the padding). Where paths meet, the input can come from any earlier layer of that
      shape, so the field is the union over them (a residual block: the longer path's). None
      when a path has no plain window or the paths' jumps differ.
    """

    name: str
    kind: str  # "conv" | "pool" | "dense"
    module: str  # the module's class name
    shape: tuple[int, ...]
    shown: int
    source: int | None = None
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    dilation: tuple[int, int] | None = None
    pad: tuple[int, int] | None = None
    rf_start: tuple[int, int] | None = None
    rf_jump: tuple[int, int] | None = None
    rf_size: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name.endswith("Conv"):  # as predict.layer_activations chooses its layers
        return "conv"
    if name.endswith("Pool"):
        return "pool"
    return "dense" if isinstance(module, nn.Dense) else None


def _pair(value, default: int = 1) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)


def _geometry(module: nn.Module, in_shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """window/stride/dilation/pad of a plain conv or pooling window, else {}."""
    if isinstance(module, nn.Conv):
        if _pair(module.input_dilation) != (1, 1):
            return {}
        window, stride = _pair(module.kernel_size), _pair(module.strides)
        dilation = _pair(module.kernel_dilation)
    elif isinstance(module, layers_lib.Pool):
        window = _pair(module.window)
        stride = window if module.strides is None else _pair(module.strides)
        dilation = (1, 1)
    else:
        return {}
    if len(window) != 2 or len(in_shape) != 4:
        return {}
    try:  # ceil_mode pooling only adds padding at the high end: the low side is the same
        pairs = layers_lib.padding_pairs(module.padding, in_shape[1:3], window, stride, dilation)
    except CnnJaxError:  # e.g. 'CAUSAL': no window on the page
        return {}
    pad = tuple(int(lo) for lo, _ in pairs)
    return {"window": window, "stride": stride, "dilation": dilation, "pad": pad}


def traced_layers(model: nn.Module, variables, x) -> tuple[jax.Array, list[tuple]]:
    """model.apply(variables, x, train=False) -> (logits, [(module, input, output)]) for each
    convolution, pooling and dense layer in call order (each module once: its first call)."""
    records, active, seen = [], set(), set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(module.path)
        if context.method_name != "__call__" or not _kind(module) or path in active:
            return next_fun(*args, **kwargs)  # a subclass calling its parent: one record
        active.add(path)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(path)
        if path not in seen and args and hasattr(args[0], "shape") and hasattr(out, "shape"):
            seen.add(path)
            records.append((module, args[0], out))
        return out

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x, train=False)
    return logits, records


Field = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # start, jump, size per dim


def _field_through(geometry: dict, field: Field) -> Field:
    """The receptive field of a window layer's units, from its input's (`field`)."""
    start, jump, size = field
    reach = [(k - 1) * d for k, d in zip(geometry["window"], geometry["dilation"])]
    return (
        tuple(a - p * j for a, p, j in zip(start, geometry["pad"], jump)),
        tuple(s * j for s, j in zip(geometry["stride"], jump)),
        tuple(r * j + n for r, j, n in zip(reach, jump, size)),
    )


def _union(fields: list[Field | None]) -> Field | None:
    """The smallest field covering all of `fields` (None unless they all have the same jump)."""
    if not fields or any(f is None for f in fields) or len({f[1] for f in fields}) != 1:
        return None
    first = tuple(min(f[0][d] for f in fields) for d in range(2))
    last = tuple(max(f[0][d] + f[2][d] for f in fields) for d in range(2))
    return first, fields[0][1], tuple(b - a for a, b in zip(first, last))


def _describe(records, x, max_channels: int) -> list[Layer]:
    """The `Layer`s of `traced_layers(model, variables, x)`'s records, read while tracing."""
    result: list[Layer] = []
    outputs: list = []  # each layer's traced output, for finding the layers' inputs
    fields: list[Field | None] = []  # each layer's receptive field
    pixel: Field = ((0, 0), (1, 1), (1, 1))  # an input pixel's
    for module, inputs, out in records:
        kind = _kind(module)
        in_shape, out_shape = tuple(inputs.shape), tuple(out.shape)
        if (kind == "dense") != (len(out_shape) == 2) or (kind != "dense" and len(out_shape) != 4):
            continue  # a dense layer over a feature map, a 1-D conv: not drawn
        geometry, field, source = {}, None, None
        if kind != "dense":
            # Given another layer's output as it is (a shortcut conv), that layer exactly; after
            # an activation, a norm or a sum, any earlier layer of the input's shape may feed it.
            same = [i for i, o in enumerate(outputs) if o is inputs]
            candidates = same[-1:] or [
                i for i, o in enumerate(outputs) if tuple(o.shape) == in_shape
            ]
            if inputs is x or (not candidates and in_shape == tuple(x.shape)):
                candidates = []
                source = -1
            else:
                source = candidates[-1] if candidates else None
            geometry = _geometry(module, in_shape)
            if geometry and source is not None:
                inputs_fields = [fields[i] for i in candidates] if candidates else [pixel]
                union = _union(inputs_fields)
                field = None if union is None else _field_through(geometry, union)
        shown = out_shape[-1] if kind == "dense" else min(out_shape[-1], max_channels)
        rf = dict(zip(("rf_start", "rf_jump", "rf_size"), field)) if field else {}
        result.append(
            Layer(
                name="/".join(module.path), kind=kind, module=type(module).__name__,
                shape=out_shape[1:], shown=shown, source=source, **geometry, **rf,
            )
        )  # fmt: skip
        outputs.append(out)
        fields.append(field)
    return result


def _b64(array) -> str:
    """float32 (or uint8) array -> base64 of its little-endian bytes, row-major."""
    a = np.asarray(array)
    a = a.astype("<f4") if a.dtype != np.uint8 else a
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


class Explorer:
    """A trained model ready for the page: `meta()` describes it, `predict(body, content_type)`
    runs one request. The forward pass is compiled once, in the constructor."""

    def __init__(self, model, variables, config, *, max_channels: int = MAX_CHANNELS, name=""):
        spec = predict.model_input(config)
        self.config, self.name = config, name
        self.native_shape: tuple[int, int, int] = tuple(spec["native_shape"])
        self.class_names: list[str] = spec["class_names"]
        self.background = predict.training_background(config)

        def forward(variables, images_u8):
            x = predict.preprocess_for_model(config, images_u8)
            logits, records = traced_layers(model, variables, x)
            return x, logits, records

        described: list[Layer] = []

        def describe(variables, images_u8):  # shapes are static: read them while tracing
            x, _, records = forward(variables, images_u8)
            described.extend(_describe(records, x, max_channels))
            return x

        blank = jnp.zeros((1, *self.native_shape), jnp.uint8)
        self.input_shape = tuple(jax.eval_shape(describe, variables, blank).shape[1:])
        self.layers = described
        wanted = {layer.name: layer for layer in self.layers}

        def outputs(variables, images_u8):
            x, logits, records = forward(variables, images_u8)
            maps = []
            for module, _, out in records:
                layer = wanted.get("/".join(module.path))
                if layer is not None:
                    maps.append(out[0, ..., : layer.shown].astype(jnp.float32))
            probs = jax.nn.softmax(logits[0].astype(jnp.float32))
            return x[0].astype(jnp.float32), maps, probs

        self._variables = variables
        self._outputs = jax.jit(outputs)
        start = time.perf_counter()
        jax.block_until_ready(self._outputs(variables, blank))
        self.compile_seconds = time.perf_counter() - start

    @classmethod
    def from_workdir(cls, workdir: str | Path, checkpoint: str | int = "latest", **kw):
        from cnn_jax.train import load

        model, variables, config = load(workdir, checkpoint)
        return cls(model, variables, config, name=str(workdir), **kw)

    def meta(self) -> dict[str, Any]:
        """What the page draws: shapes, class names, layers and their geometry."""
        return {
            "name": self.name,
            "experiment": self.config.experiment,
            "model": self.config.model.name,
            "native_shape": list(self.native_shape),
            "input_shape": list(self.input_shape),
            "class_names": self.class_names,
            "background": self.background,
            "raw_content_type": RAW_CONTENT_TYPE,
            "layers": [layer.to_json() for layer in self.layers],
        }

    def decode(self, body: bytes, content_type: str = "") -> tuple[np.ndarray, bool]:
        """A request body -> (uint8 [H, W, C] at the native shape, whether it was inverted).

        `application/octet-stream`: exactly H*W*C uint8 pixels, row-major, used as they are.
        Anything else: an image file (PNG, JPEG, BMP, GIF, WEBP) converted and resized as
        `predict.read_image` does, and inverted when its background is the opposite of the
        training images' (`predict.opposite_polarity`, as `cnn-jax predict` does by default).
        Raises DataError (ImageTooLarge for too many pixels) with a message for the page.
        """
        h, w, c = self.native_shape
        if content_type.split(";")[0].strip().lower() == RAW_CONTENT_TYPE:
            if len(body) != h * w * c:
                raise DataError(
                    f"raw pixels: expected {h * w * c} bytes ({h}x{w}x{c} uint8, row-major), "
                    f"got {len(body)}"
                )
            return np.frombuffer(body, np.uint8).reshape(h, w, c).copy(), False
        image = decode_image(body, (h, w, c), content_type)
        flip = predict.opposite_polarity(image, self.background)
        return (255 - image if flip else image), flip

    def run(self, image_u8: np.ndarray) -> dict[str, Any]:
        """uint8 [H, W, C] -> numpy model input, maps (one per `self.layers`) and probabilities."""
        x, maps, probs = jax.device_get(self._outputs(self._variables, image_u8[None]))
        return {"input": x, "maps": maps, "probs": probs}

    def predict(self, body: bytes, content_type: str = "") -> dict[str, Any]:
        """One request: the JSON-ready response with timings in milliseconds."""
        t0 = time.perf_counter()
        image, inverted = self.decode(body, content_type)
        t1 = time.perf_counter()
        out = self.run(image)
        t2 = time.perf_counter()
        probs = out["probs"]
        best = int(np.argmax(probs))
        response = {
            "predicted": best,
            "class_name": self.class_names[best] if best < len(self.class_names) else str(best),
            "probs": [float(p) for p in probs],
            "inverted": inverted,
            "image": _b64(image),
            "input": _b64(out["input"]),
            "maps": [_b64(m) for m in out["maps"]],
        }
        t3 = time.perf_counter()
        response["ms"] = {
            "decode": 1e3 * (t1 - t0), "model": 1e3 * (t2 - t1), "encode": 1e3 * (t3 - t2)
        }  # fmt: skip
        return response


def decode_image(body: bytes, shape: tuple[int, int, int], content_type: str = "") -> np.ndarray:
    """Image file bytes -> uint8 [H, W, C] of `shape`: grayscale when C == 1, else RGB, resized
    bilinearly, 16-bit greyscale scaled to 8 bits (as `predict.read_image` reads files)."""
    from PIL import Image, UnidentifiedImageError

    from cnn_jax.data.images import to_mode

    h, w, c = shape
    what = f"the request body ({len(body)} bytes, Content-Type {content_type or 'none'!r})"
    if not body:
        raise DataError(f"{what} is empty; send a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body), formats=IMAGE_FORMATS) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ImageTooLarge(
                        f"the image is {im.width}x{im.height} pixels; at most "
                        f"{MAX_IMAGE_PIXELS:,} pixels are decoded"
                    )
                im = to_mode(im, "L" if c == 1 else "RGB", "the image")
                im = im.resize((w, h), Image.Resampling.BILINEAR)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"the image is too large to decode safely: {e}") from None
    except ImageTooLarge:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{what} is not a PNG, JPEG, BMP, GIF or WEBP image") from None
    except (OSError, ValueError, EOFError) as e:  # truncated or corrupt image data
        raise DataError(f"{what} could not be decoded as an image: {e}") from None
    return np.asarray(im, dtype=np.uint8).reshape(h, w, c)
