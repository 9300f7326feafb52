"""Analytical receptive fields of every layer of a Flax model.

For each layer, per spatial axis: the *size* of the input window one output unit sees, the *jump*
(effective stride: input pixels between neighbouring units) and the *start* (the centre of unit 0's
window in input pixel coordinates; pixel i has centre i, so unit i's window is centred on
start + i * jump). Through a layer with kernel (or pooling window) k, stride s, dilation d and
low-side padding p:

    k_eff = d * (k - 1) + 1
    size_out  = size_in + (k_eff - 1) * jump_in
    jump_out  = jump_in * s
    start_out = start_in + ((k_eff - 1) / 2 - p) * jump_in

(the receptive-field arithmetic of Araujo et al., Distill 2019). The window ignores the image
border: near the edges part of it lies in the padding.

How: the model's init is traced once with `jax.make_jaxpr` (nothing is computed or allocated) under
a Flax method interceptor that tags each submodule's output, and each window layer's input, in the
traced program. The program is then read in order, carrying a receptive field per array:

  * window layers -- `flax.linen.Conv` and its subclasses (`layers.Conv`, `fast_paths.Conv`),
    `layers.Pool` (and `fast_paths.Pool`), `layers.AdaptiveAvgPool` -- by their fields, whatever
    their lowering; plain `lax` convolutions, reduce-window pooling, pads and slices in user code by
    their parameters;
  * where paths meet (a residual add, an Inception or DenseNet concatenation on channels, any
    elementwise op), by the union of the inputs' windows: GoogLeNet's, ResNet's and DenseNet's
    fields are the largest over their paths;
  * an array that no longer has the input's spatial layout (flattened, globally pooled, transposed,
    reduced) is *global*: its units may see the whole input (size, jump and start are None). So is
    anything this reading does not model (loops, gathers, a union of paths with different jumps):
    global is always a safe answer.

`layers.AdaptiveAvgPool` whose bins are not all alike (its input is not a multiple of its output)
gets the largest bin as its window and the mean spacing of the bin centres as its stride.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp

from cnn_jax.errors import CnnJaxError, ShapeError
from cnn_jax.layers import AdaptiveAvgPool, Pool, padding_pairs

Number = int | float

__all__ = ["LayerReceptiveField", "receptive_fields", "receptive_fields_and_shapes"]


@dataclasses.dataclass(frozen=True)
class LayerReceptiveField:
    """One called submodule's receptive field, per spatial axis (H, W).

    path: '/'-joined module path (as in `models.summary`); module: its class name; output_shape:
    its output's shape (a pytree of them for several outputs). size: input pixels one unit sees;
    jump: input pixels between neighbouring units; start: the centre of unit 0's window. All three
    are None when the layer is global (its units may see the whole input).
    """

    path: str
    module: str
    output_shape: Any
    size: tuple[Number, Number] | None
    jump: tuple[Number, Number] | None
    start: tuple[Number, Number] | None

    @property
    def is_global(self) -> bool:
        return self.size is None

    def window(self, i: int, j: int) -> tuple[tuple[Number, Number], tuple[Number, Number]]:
        """((top, bottom), (left, right)): the first and last input row and column, inclusive, that
        unit (i, j) sees; may reach outside the image (into the padding). Raises `ShapeError` for a
        global layer."""
        if self.size is None or self.jump is None or self.start is None:
            raise ShapeError(f"layer '{self.path}' is global: its units see the whole input")
        bounds = []
        for index, size, jump, start in zip((i, j), self.size, self.jump, self.start):
            centre = Fraction(start) + index * Fraction(jump)
            half = (Fraction(size) - 1) / 2
            bounds.append((_number(centre - half), _number(centre + half)))
        return bounds[0], bounds[1]


def receptive_fields(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    train: bool = False,
    dtype: Any = jnp.float32,
) -> list[LayerReceptiveField]:
    """The receptive field of every submodule call of `model` on `[batch_size, *input_shape]` inputs.

    input_shape: (H, W, C). One record per call, in call order (a parent before its children), the
    same rows as `models.summary.summary_rows`. Nothing is computed: the model is traced abstractly.
    With `train=True`, BatchNorm normalises with the batch's own statistics, so every layer after
    the first BatchNorm is global (each unit then depends on the whole input). Raises the model's
    own errors (e.g. `ShapeError`) for bad inputs.
    """
    records, _ = receptive_fields_and_shapes(
        model, input_shape, batch_size=batch_size, train=train, dtype=dtype
    )
    return records


def receptive_fields_and_shapes(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    train: bool = False,
    dtype: Any = jnp.float32,
) -> tuple[list[LayerReceptiveField], Any]:
    """`receptive_fields` and, from the same trace, what `model.init_with_output` returns as
    `jax.ShapeDtypeStruct`s: `(output, variables)` (`models.summary` needs both)."""
    calls: list[dict[str, Any]] = []
    active: list[nn.Module] = []

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        # A subclass __call__ calling super().__call__ (layers.Conv) is intercepted twice: tag the
        # outer call only. The root model is not a layer of its own.
        if context.method_name != "__call__" or any(module is m for m in active):
            return next_fun(*args, **kwargs)
        if not module.path:
            return next_fun(*args, **kwargs)
        index = len(calls)
        call = {"path": "/".join(module.path), "module": type(module).__name__, "window": None}
        calls.append(call)
        if args and isinstance(args[0], jax.Array):
            call["window"] = _window_of(module, tuple(args[0].shape))
            if call["window"] is not None:
                args = (_MARK.bind(args[0], call=index, side="in"), *args[1:])
        active.append(module)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.pop()
        call["output_shape"] = jax.tree.map(lambda a: tuple(a.shape), out)
        return jax.tree.map(
            lambda a: _MARK.bind(a, call=index, side="out") if isinstance(a, jax.Array) else a, out
        )

    def init(x):
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return model.init_with_output(rngs, x, train=train)

    shape = (batch_size, *input_shape)
    with nn.intercept_methods(intercept):
        closed, shapes = jax.make_jaxpr(init, return_shape=True)(jax.ShapeDtypeStruct(shape, dtype))

    reader = _Reader(calls)
    unit = (Fraction(1), Fraction(1), Fraction(0))  # one pixel, jump 1, centred on itself
    reader.run(closed.jaxpr, [(unit, unit) if len(shape) == 4 else GLOBAL])
    records = []
    for index, call in enumerate(calls):
        field = _union_of(reader.outputs.get(index, []))
        spatial = field is not None and field is not GLOBAL
        records.append(
            LayerReceptiveField(
                path=call["path"],
                module=call["module"],
                output_shape=call.get("output_shape"),
                size=tuple(_number(a[0]) for a in field) if spatial else None,
                jump=tuple(_number(a[1]) for a in field) if spatial else None,
                start=tuple(_number(a[2]) for a in field) if spatial else None,
            )
        )
    return records, shapes


# --------------------------------------------------------------------------------------------------
# The tag in the traced program: an identity primitive that is only ever traced, never run
# --------------------------------------------------------------------------------------------------

_MARK = jex.Primitive("receptive_field_mark")
_MARK.def_impl(lambda x, **_: x)
_MARK.def_abstract_eval(lambda aval, **_: aval)


# --------------------------------------------------------------------------------------------------
# Fields: per spatial axis (size, jump, start) as Fractions; GLOBAL; or None (does not depend on the
# input, e.g. parameters)
# --------------------------------------------------------------------------------------------------

Axis = tuple[Fraction, Fraction, Fraction]
GLOBAL = "global"
# Per spatial axis: (window extent, stride, centre of the first window relative to input unit 0).
Window = tuple[tuple[Any, Any, Fraction], tuple[Any, Any, Fraction]]


def _number(value: Fraction) -> Number:
    return int(value) if value.denominator == 1 else float(value)


def _through(axis: Axis, extent: Any, stride: Any, offset: Fraction) -> Axis:
    size, jump, start = axis
    return size + (extent - 1) * jump, jump * stride, start + offset * jump


def _regular(window: int, stride: int, dilation: int, pad_low: int) -> tuple[int, int, Fraction]:
    extent = dilation * (window - 1) + 1
    return extent, stride, Fraction(extent - 1, 2) - pad_low


def _pairs(value: Any, default: int = 1) -> tuple[int, int]:
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    return tuple(value)


def _window_of(module: nn.Module, in_shape: tuple[int, ...]) -> Window | None:
    """The window a conv or pooling module slides over its [N, H, W, C] input, or None when it is
    not one (or a kind this reading does not model: the traced ops are read instead)."""
    if len(in_shape) != 4:
        return None
    sizes = in_shape[1:3]
    try:
        if isinstance(module, (nn.Conv, nn.ConvLocal)):
            if _pairs(module.input_dilation) != (1, 1):
                return None
            windows, strides = _pairs(module.kernel_size), _pairs(module.strides)
            dilations = _pairs(module.kernel_dilation)
            pads = padding_pairs(module.padding, sizes, windows, strides, dilations)
            return tuple(map(_regular, windows, strides, dilations, (lo for lo, _ in pads)))
        if isinstance(module, Pool):
            windows = _pairs(module.window)
            strides = windows if module.strides is None else _pairs(module.strides)
            # ceil_mode only pads the high side more: the windows and the start stay the same.
            pads = padding_pairs(module.padding, sizes, windows, strides)
            return tuple(_regular(k, s, 1, lo) for k, s, (lo, _) in zip(windows, strides, pads))
        if isinstance(module, AdaptiveAvgPool):
            return tuple(map(_adaptive, sizes, _pairs(module.output_size)))
    except (CnnJaxError, TypeError, ValueError):
        return None
    return None


def _adaptive(n: int, o: int) -> tuple[int, Fraction, Fraction]:
    """PyTorch's adaptive average pooling bins [floor(i*n/o), ceil((i+1)*n/o)) as one window: the
    largest bin, the mean spacing of the bin centres (0 when o > n = 1: every unit sees the same
    pixel), the centre of bin 0."""
    bins = [((i * n) // o, -(-(i + 1) * n // o)) for i in range(o)]
    centres = [Fraction(first + end - 1, 2) for first, end in bins]
    spacing = (centres[-1] - centres[0]) / (o - 1) if o > 1 else Fraction(n)
    return max(end - first for first, end in bins), spacing, centres[0]


def _union_of(fields: list[Any]) -> Any:
    """The union of the windows of unit 0 over `fields` (None entries ignored); GLOBAL when any is
    global or their jumps differ (one window per unit would not describe the union)."""
    fields = [f for f in fields if f is not None]
    if not fields:
        return None
    if len(fields) == 1 or any(f is GLOBAL for f in fields):
        return GLOBAL if any(f is GLOBAL for f in fields) else fields[0]
    union = []
    for axes in zip(*fields):
        jumps = {jump for _, jump, _ in axes}
        if len(jumps) != 1:
            return GLOBAL
        low = min(start - (size - 1) / 2 for size, _, start in axes)
        high = max(start + (size - 1) / 2 for size, _, start in axes)
        union.append((high - low + 1, jumps.pop(), (low + high) / 2))
    return tuple(union)


# --------------------------------------------------------------------------------------------------
# Reading the traced program
# --------------------------------------------------------------------------------------------------

# Primitives that move values across spatial positions without changing the shape.
_MIXING = frozenset(
    {
        "rev", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "fft", "gather",
        "scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter-min",
        "scatter_min", "scatter-max", "scatter_max", "dynamic_slice", "dynamic_update_slice",
        "select_and_scatter_add", "select_and_gather_add", "argsort",
    }
)  # fmt: skip
_REDUCE_WINDOW = frozenset(
    {"reduce_window", "reduce_window_sum", "reduce_window_max", "reduce_window_min"}
)


class _Reader:
    """Reads a jaxpr equation by equation, carrying a field per variable; collects the fields of
    the tagged module outputs in `outputs` (call index -> fields of its output arrays)."""

    def __init__(self, calls: list[dict[str, Any]]):
        self.calls = calls
        self.entered: dict[int, Any] = {}  # call index -> field of a window layer's input
        self.outputs: dict[int, list[Any]] = {}

    def run(self, jaxpr: jex.Jaxpr, fields: list[Any]) -> list[Any]:
        env: dict[Any, Any] = dict(zip(jaxpr.invars, fields))

        def read(v: Any) -> Any:
            return None if isinstance(v, jex.Literal) else env.get(v)

        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn: jex.JaxprEqn, fields: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if eqn.primitive is _MARK:
            return [self.mark(eqn.params["call"], eqn.params["side"], fields[0])]
        if all(f is None for f in fields):
            return [None] * n_out
        subs = list(jex.jaxprs_in_params(eqn.params))
        if len(subs) == 1 and len(subs[0].invars) == len(fields) and len(subs[0].outvars) == n_out:
            return self.run(subs[0], fields)  # jit, custom_jvp/vjp, remat: read the inside
        if subs or name in _MIXING or any(f is GLOBAL for f in fields):
            return [GLOBAL] * n_out
        tracked = [(v, f) for v, f in zip(eqn.invars, fields) if f is not None]
        if name == "conv_general_dilated":
            return [self.conv(eqn, fields)]
        if name in _REDUCE_WINDOW:
            return [self.reduce_window(eqn, v, f) for v, f in tracked[:n_out]] + [GLOBAL] * (
                n_out - len(tracked)
            )
        if name in ("pad", "slice"):
            return [self.shift(eqn, *tracked[0])]
        if name == "transpose" and tuple(eqn.params["permutation"][1:3]) != (1, 2):
            return [GLOBAL] * n_out
        if name == "reshape" and _shape(tracked[0][0])[:3] != _shape(eqn.outvars[0])[:3]:
            return [GLOBAL] * n_out
        if name == "dot_general":
            (contract, _), (batch, _) = eqn.params["dimension_numbers"]
            if (
                eqn.invars[0] is not tracked[0][0]
                or len(tracked) > 1
                or batch
                or tuple(contract) != (3,)
            ):
                return [GLOBAL] * n_out  # only x @ kernel over channels keeps the positions
        # Elementwise and channel-wise ops: each output unit sees the union of the inputs' units at
        # its position, when every tracked input is laid out like the output.
        results = []
        for out in eqn.outvars:
            aligned = all(_aligned(v, out) for v, _ in tracked)
            results.append(_union_of([f for _, f in tracked]) if aligned else GLOBAL)
        return results

    def mark(self, index: int, side: str, field: Any) -> Any:
        window = self.calls[index]["window"]
        if side == "in":
            self.entered[index] = field
            return field
        if window is not None:  # a window layer: its fields decide, not the ops of its lowering
            field = self.entered.get(index)
            if field is not None and field is not GLOBAL:
                field = tuple(_through(axis, *w) for axis, w in zip(field, window))
        self.outputs.setdefault(index, []).append(field)
        return field

    def conv(self, eqn: jex.JaxprEqn, fields: list[Any]) -> Any:
        lhs, rhs = fields[:2]
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        if (
            rhs is not None
            or lhs is None
            or tuple(lhs_spec[2:]) != (1, 2)
            or tuple(out_spec[2:]) != (1, 2)
            or any(d != 1 for d in p["lhs_dilation"])
        ):
            return GLOBAL
        kernel = _shape(eqn.invars[1])
        windows = [kernel[d] for d in rhs_spec[2:]]
        return tuple(
            _through(axis, *_regular(k, s, d, lo))
            for axis, k, s, d, (lo, _) in zip(
                lhs, windows, p["window_strides"], p["rhs_dilation"], p["padding"]
            )
        )

    def reduce_window(self, eqn: jex.JaxprEqn, var: Any, field: Any) -> Any:
        p = eqn.params
        windows, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
        if (
            len(windows) != 4
            or any(d != 1 for d in p["base_dilation"])
            or any(windows[a] != 1 or strides[a] != 1 or tuple(pads[a]) != (0, 0) for a in (0, 3))
        ):
            return GLOBAL
        return tuple(
            _through(
                field[a - 1], *_regular(windows[a], strides[a], p["window_dilation"][a], pads[a][0])
            )
            for a in (1, 2)
        )

    def shift(self, eqn: jex.JaxprEqn, var: Any, field: Any) -> Any:
        """pad (negative: crop) and strided slice: the same windows, renumbered."""
        if len(_shape(var)) != 4:
            return GLOBAL
        axes = []
        for a in (1, 2):
            size, jump, start = field[a - 1]
            if eqn.primitive.name == "pad":
                low, _, interior = eqn.params["padding_config"][a]
                if interior:
                    return GLOBAL
                axes.append((size, jump, start - low * jump))
            else:
                first = eqn.params["start_indices"][a]
                step = (eqn.params["strides"] or (1,) * 4)[a]
                axes.append((size, jump * step, start + first * jump))
        return tuple(axes)


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


def _aligned(var: Any, out: Any) -> bool:
    """Whether `var` and `out` are both [N, H, W, C] maps with the same H and W."""
    a, b = _shape(var), _shape(out)
    return len(a) == 4 and len(b) == 4 and a[1:3] == b[1:3]
