"""Keras-style model summaries: per layer its output shape, parameter count and receptive field,
and the totals.

Shapes come from an abstract trace (`jax.eval_shape` / `jax.make_jaxpr`), so summarising VGG-19
allocates nothing. Layers are recorded by a Flax method interceptor around every submodule's
`__call__`, in call order (a parent before its children). Receptive fields (size, jump, start per
layer) come from `cnn_jax.receptive_field`, read from the same trace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.receptive_field import LayerReceptiveField, receptive_fields_and_shapes


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One called submodule: its '/'-joined path, class, output shape and parameters (with children)."""

    path: str
    module: str
    output_shape: Any  # tuple of ints, or a pytree of them for modules returning several arrays
    params: int
    depth: int  # 1 for a direct child of the model
    receptive_field: LayerReceptiveField | None = None  # when asked for


def count_params(tree: Any) -> int:
    """Total number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s.

    Pass `variables['params']` to count trainable parameters only.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _subtree(variables: Mapping[str, Any], collection: str, path: Sequence[str]) -> Any:
    node = variables.get(collection, {})
    for name in path:
        if not isinstance(node, Mapping) or name not in node:
            return {}
        node = node[name]
    return node


def summary_rows(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    train: bool = False,
    depth: int | None = None,
    dtype: Any = jnp.float32,
    receptive_field: bool = False,
) -> tuple[list[SummaryRow], dict[str, Any]]:
    """Trace `model` on `[batch_size, *input_shape]` inputs without allocating; return rows and totals.

    input_shape: (H, W, C) for image models. `depth` keeps rows at most that deep (None: all).
    `receptive_field=True` fills each row's `receptive_field` (`receptive_field.receptive_fields`).
    Totals: 'input_shape', 'output_shape', 'params' (trainable), 'non_trainable' (e.g. BatchNorm
    statistics), 'param_bytes'. Raises the model's own errors (e.g. `ShapeError`) for bad inputs.
    """
    shape = (batch_size, *input_shape)
    if receptive_field:
        fields, (output, variables) = receptive_fields_and_shapes(
            model, input_shape, batch_size=batch_size, train=train, dtype=dtype
        )
        calls = [(tuple(f.path.split("/")), f.module, f.output_shape, f) for f in fields]
    else:
        calls, output, variables = _trace(model, shape, train, dtype)
    rows = [
        SummaryRow(
            path="/".join(path),
            module=module,
            output_shape=out,
            params=count_params(_subtree(variables, "params", path)),
            depth=len(path),
            receptive_field=field,
        )
        for path, module, out, field in calls
        if depth is None or len(path) <= depth
    ]
    non_trainable = {k: v for k, v in variables.items() if k != "params"}
    totals = {
        "input_shape": shape,
        "output_shape": jax.tree.map(lambda a: tuple(a.shape), output),
        "params": count_params(variables.get("params", {})),
        "non_trainable": count_params(non_trainable),
        "param_bytes": sum(
            math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(variables)
        ),
    }
    return rows, totals


def _trace(model: nn.Module, shape: tuple[int, ...], train: bool, dtype: Any):
    """(calls, output, variables): [path, class name, output shape, None] per submodule call in
    call order, and the shapes `model.init_with_output` returns, from `jax.eval_shape`."""
    calls: list[list[Any]] = []  # [path, class name, output shape, None] in call order
    active: list[nn.Module] = []

    def record(next_fun, args, kwargs, context):
        # A subclass __call__ that calls super().__call__ (layers.Conv) is intercepted twice: keep
        # only the outer call. The root model itself (path ()) is the totals line.
        module = context.module
        if context.method_name != "__call__" or any(module is m for m in active):
            return next_fun(*args, **kwargs)
        entry = [tuple(module.path), type(module).__name__, None, None]
        if entry[0]:
            calls.append(entry)
        active.append(module)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.pop()
        entry[2] = jax.tree.map(lambda a: tuple(a.shape), out)
        return out

    with nn.intercept_methods(record):
        output, variables = jax.eval_shape(
            lambda rngs, x: model.init_with_output(rngs, x, train=train),
            {"params": jax.random.key(0), "dropout": jax.random.key(1)},
            jax.ShapeDtypeStruct(shape, dtype),
        )
    return calls, output, variables


def model_summary(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    depth: int | None = None,
    receptive_field: bool = True,
) -> str:
    """A table like Keras' `model.summary()`: layer path, type, output shape, parameter count and,
    for models on images, each layer's receptive field (`cnn_jax.receptive_field`): its size in
    input pixels, its jump (input pixels between neighbouring units) and its start (the centre of
    unit (0, 0)'s field); "global" where a unit may see the whole input.

    input_shape: (H, W, C). Nested layers are indented under their parent; a parent's count includes
    its children. Nothing is allocated (shapes come from an abstract trace).
    """
    rows, totals = summary_rows(
        model, input_shape, batch_size=batch_size, depth=depth, receptive_field=receptive_field
    )
    # Receptive-field columns only when some layer keeps the input's layout (not for an MLP).
    fields = receptive_field and any(
        row.receptive_field is not None and not row.receptive_field.is_global for row in rows
    )
    table = [("Layer (path)", "Type", "Output shape", "Param #")]
    if fields:
        table[0] += ("RF", "Jump", "Start")
    for row in rows:
        name = "  " * (row.depth - 1) + row.path.rsplit("/", 1)[-1]
        cells = (name, row.module, _format_shape(row.output_shape), f"{row.params:,}")
        if fields:
            cells += _format_field(row.receptive_field)
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i >= 3 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "=" * len(line(table[0]))
    total = totals["params"] + totals["non_trainable"]
    lines = [
        f'Model: "{type(model).__name__}"   input {_format_shape(totals["input_shape"])}',
        rule,
        line(table[0]),
        rule.replace("=", "-"),
        *(line(cells) for cells in table[1:]),
        rule,
        f"Output shape: {_format_shape(totals['output_shape'])}",
        f"Total params: {total:,} ({totals['param_bytes'] / 2**20:.2f} MiB)",
        f"Trainable params: {totals['params']:,}",
        f"Non-trainable params: {totals['non_trainable']:,}",
    ]
    if fields:
        lines.append(
            "RF: input pixels a unit sees (HxW when they differ); Jump: input pixels between "
            "neighbouring units;\nStart: centre of unit (0, 0)'s field, in input pixels; global: a "
            "unit may see the whole input"
        )
    return "\n".join(lines)


def _format_field(field: LayerReceptiveField | None) -> tuple[str, str, str]:
    if field is None or field.is_global:
        return "global", "", ""

    def pair(values: tuple[Any, Any], sep: str) -> str:
        h, w = (f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)
        return h if h == w else f"{h}{sep}{w}"

    return pair(field.size, "x"), pair(field.jump, "x"), pair(field.start, ",")


def _format_shape(shape: Any) -> str:
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return "[" + ", ".join(map(str, shape)) + "]"
    return str(jax.tree.map(_format_shape, shape, is_leaf=lambda s: isinstance(s, tuple)))
