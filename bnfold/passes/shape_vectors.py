"""Computed ``Reshape`` shapes: a shape vector built from ``Shape`` of a tensor and constants.

Exporters with a dynamic batch build a flatten's target shape at run time, e.g. Keras 3's torch
backend ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])`` = [N, -1], or tf2onnx's
``Cast(Concat(Slice(Cast(Gather(Shape(x), [0, 2, 3, 1]))), [K]))`` = [N, K]. The constant
evaluator cannot compute them (N is not static); this one evaluates such a vector symbolically:
each entry is an ``int`` or a :class:`Dim` ("dim ``axis`` of ``value``"), through ``Shape``
(start/end), ``Gather`` (axis 0, constant indices), ``Slice`` (constant, axis 0),
``Concat`` (axis 0), ``Unsqueeze``/``Squeeze``/``Reshape`` of a 1-D or scalar vector, integer
``Cast`` and ``Identity``; anything else gives up (None). Nothing here changes a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold.reasons import Refusal

from .common import INT_DTYPES, STD, attr
from .constants import const
from .context import FoldContext
from .shapes import shape_of

_MAX_DEPTH = 32


@dataclass(frozen=True)
class Dim:
    """Dimension ``axis`` of ``value`` (read at run time by a ``Shape`` node)."""

    value: ir.Value
    axis: int


Entry = int | Dim


def shape_vector(ctx: FoldContext, value: ir.Value | None, depth: int = 0) -> list[Entry] | None:
    """The entries of the 1-D integer vector ``value``, or None when they cannot be told."""
    if value is None or depth > _MAX_DEPTH:
        return None
    try:
        c = const(ctx, value, what="shape", weight=False)
    except Refusal:
        c = None
    if c is not None:
        if c.dtype not in INT_DTYPES or len(c.shape) > 1:
            return None
        return [int(v) for v in np.asarray(c.load()).reshape(-1)]
    node = value.producer()
    if node is None or node.domain not in STD:
        return None
    op = node.op_type
    first = node.inputs[0] if node.inputs else None
    if op == "Shape":
        return _shape(ctx, node)
    if op in ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape"):
        if op == "Cast" and int(attr(node, "to", 0)) not in {int(d) for d in INT_DTYPES}:
            return None
        return shape_vector(ctx, first, depth + 1)  # 1-D / scalar vectors: same entries
    if op == "Concat":
        if int(attr(node, "axis", 0)) not in (0, -1):
            return None
        out: list[Entry] = []
        for v in node.inputs:
            part = shape_vector(ctx, v, depth + 1)
            if part is None:
                return None
            out.extend(part)
        return out
    if op == "Gather":
        return _gather(ctx, node, depth)
    if op == "Slice":
        return _slice(ctx, node, depth)
    return None


def _shape(ctx: FoldContext, node: ir.Node) -> list[Entry] | None:
    x = node.inputs[0]
    dims = shape_of(ctx, x)
    if x is None or dims is None:
        return None
    start = int(attr(node, "start", 0))
    end = attr(node, "end", None)
    axes = list(range(len(dims)))[slice(start, None if end is None else int(end))]
    return [dims[a] if dims[a] is not None else Dim(x, a) for a in axes]


def _ints(ctx: FoldContext, value: ir.Value | None) -> list[int] | None:
    try:
        c = const(ctx, value, what="index", weight=False)
    except Refusal:
        return None
    if c.dtype not in INT_DTYPES:
        return None
    return [int(v) for v in np.asarray(c.load()).reshape(-1)]


def _gather(ctx: FoldContext, node: ir.Node, depth: int) -> list[Entry] | None:
    if int(attr(node, "axis", 0)) != 0 or len(node.inputs) != 2:
        return None
    data = shape_vector(ctx, node.inputs[0], depth + 1)
    idx = _ints(ctx, node.inputs[1])
    if data is None or idx is None or any(not -len(data) <= i < len(data) for i in idx):
        return None
    return [data[i] for i in idx]


def _slice(ctx: FoldContext, node: ir.Node, depth: int) -> list[Entry] | None:
    data = shape_vector(ctx, node.inputs[0], depth + 1)
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = _ints(ctx, ins[1]), _ints(ctx, ins[2])
    axes = _ints(ctx, ins[3]) if ins[3] is not None else [0]
    steps = _ints(ctx, ins[4]) if ins[4] is not None else [1]
    if data is None or not starts or not ends or axes not in ([0], [-1]) or steps != [1]:
        return None
    return data[slice(starts[0], ends[0])]
