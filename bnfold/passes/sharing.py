"""Folded constants with identical bytes become one initializer, so ONNX Runtime can merge nodes.

ONNX Runtime's ``CommonSubexpressionElimination`` merges two nodes only when their inputs are the
same values; it never compares initializer contents. A graph whose branches compute bit-identical
values (the onnx wheel's light model-zoo graphs, whose weights are ``ConstantOfShape`` fill values:
inception branches with the same input, weights and BN parameters) is run once per distinct branch
before folding, because equal fill nodes are merged. The fold gives every folded weight its own
initializer, which hid that: the folded ``light_inception_v2`` ran 69 Convs where the original ran
60, and was ~6% slower at level ``all`` (``benchmarks/inception_cse.py``).

So after folding, the initializers the fold created in the main graph that are bit-identical (same
dtype, shape and bytes) are replaced by the first of them. This is exact: every reader sees the same
values as before. Only constants below :data:`~bnfold.passes.weights.DEFER_MIN_BYTES` whose range
was checked up front are compared, so the pass never reads a large folded weight (those are
computed once, as they are written).
Overridable initializers (graph inputs in IR ≥ 4) and graph outputs are left alone.
"""

from __future__ import annotations

__all__ = ["share_identical"]

import hashlib
import logging

import numpy as np
import onnx_ir as ir

from bnfold.reasons import Refusal

from . import weights
from .common import FLOAT_DTYPES
from .context import FoldContext

logger = logging.getLogger(__name__)


def share_identical(ctx: FoldContext) -> int:
    """Make the fold's bit-identical small initializers one; returns how many were replaced."""
    graph = ctx.main
    first: dict[tuple, ir.Value] = {}
    shared = 0
    for value in ctx.created:
        key = _key(ctx, graph, value)
        if key is None:
            continue
        kept = first.setdefault(key, value)
        if kept is value:
            continue
        value.replace_all_uses_with(kept)
        if value.is_graph_input():
            graph.inputs.remove(value)
        graph.initializers.pop(value.name, None)
        shared += 1
    ctx.created.clear()
    if shared:
        logger.debug("%d folded constants share an identical initializer", shared)
    return shared


def _key(ctx: FoldContext, graph: ir.Graph, value: ir.Value) -> tuple | None:
    """(dtype, shape, digest) of a small constant the fold created and still uses; else None."""
    tensor = value.const_value
    if (
        tensor is None
        or graph.initializers.get(value.name) is not value
        or not value.uses()
        or value.is_graph_output()
        or (value.is_graph_input() and ctx.ir_version >= 4)
        or tensor.dtype not in FLOAT_DTYPES
    ):
        return None
    shape = tuple(tensor.shape.numpy())
    nbytes = int(np.prod(shape, dtype=np.int64)) * FLOAT_DTYPES[tensor.dtype].itemsize
    if nbytes >= weights.DEFER_MIN_BYTES or getattr(tensor, "range_deferred", False):
        return None  # large, or its range is checked as it is written: not read here
    try:
        data = np.ascontiguousarray(tensor.numpy())
    except (Refusal, weights.DeferredOverflow):
        return None  # an overflow: the writer reports it
    return (tensor.dtype, shape, hashlib.sha256(data.tobytes()).hexdigest())
