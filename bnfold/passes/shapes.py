"""Static shapes and dtypes of values, for the folds that need them.

A value's own (declared) shape and dtype come first. Where they are missing or partly symbolic, ONNX
shape inference fills the gaps: it runs at most once per run, on demand (most folds never need it),
and leaves the model exactly as it was (shapes, types, input and initializer order are restored);
what it found is cached in the run's :class:`~bnfold.passes.context.FoldContext`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from .context import FoldContext, Inferred

logger = logging.getLogger(__name__)


def shape_of(ctx: FoldContext, value: ir.Value | None) -> list[int | None] | None:
    """Static dims of ``value`` (None where unknown): its own shape, completed by shape inference."""
    if value is None:
        return None
    dims = None if value.shape is None else [d if isinstance(d, int) else None for d in value.shape]
    if dims is None or None in dims:
        entry = inferred(ctx).shapes.get(id(value))
        found = entry[1] if entry is not None and entry[0] is value else None
        if found is not None:
            more = [d if isinstance(d, int) else None for d in found]
            if dims is None:
                dims = more
            elif len(more) == len(dims):
                dims = [a if a is not None else b for a, b in zip(dims, more, strict=True)]
    return dims


def dtype_of(ctx: FoldContext, value: ir.Value | None) -> ir.DataType | None:
    """The element type of ``value``: declared, or from shape inference."""
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    entry = inferred(ctx).dtypes.get(id(value))
    return entry[1] if entry is not None and entry[0] is value else None


def rank_of(ctx: FoldContext, value: ir.Value | None) -> int | None:
    if value is not None and value.shape is not None:
        return len(value.shape)
    dims = shape_of(ctx, value)
    return None if dims is None else len(dims)


def inferred(ctx: FoldContext) -> Inferred:
    """The shape-inference results of this run (inference runs on the first call)."""
    if ctx.inferred is None:
        ctx.inferred = _infer(ctx.model)
    return ctx.inferred


def _infer(model: ir.Model) -> Inferred:
    values: list[ir.Value] = []
    for graph in model.graphs():
        values.extend(graph.inputs)
        values.extend(graph.initializers.values())
        for node in graph:
            values.extend(o for o in node.outputs if o is not None)
    saved = [(v, v.shape, v.type) for v in values]
    main = model.graph
    inputs = list(main.inputs)
    order = list(main.initializers.keys())
    result = Inferred()
    try:
        from onnx_ir.passes.common import ShapeInferencePass

        # Best effort: onnx_ir logs a failed inference with a traceback; keep that off stderr.
        quiet = logging.getLogger("onnx_ir.passes.common.shape_inference")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        finally:
            quiet.setLevel(level)
        result.shapes = {id(v): (v, v.shape) for v in values if v.shape is not None}
        result.dtypes = {id(v): (v, v.dtype) for v in values if v.dtype is not None}
    except Exception as exc:  # noqa: BLE001 - inference is best effort: shapes stay unknown
        logger.debug("shape inference failed: %s", exc)
    finally:
        for v, shape, type_ in saved:
            v.shape = shape
            v.type = type_
        if list(main.inputs) != inputs:
            main.inputs.clear()
            main.inputs.extend(inputs)
        data = main.initializers.data
        if list(data.keys()) != order and set(data.keys()) == set(order):
            items = [(k, data[k]) for k in order]
            data.clear()
            data.update(items)
    return result
