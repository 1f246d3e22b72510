"""Backward fold through a ``Reshape``/``Flatten`` that merges leading axes (timm's LeViT
``LinearNorm``: ``Linear → flatten(0, 1) → BatchNorm1d → reshape_as``).

``y = BN(Reshape(X · W [+ b], [M, N]))``: the MatMul's output ``[..., N]`` becomes ``[M, N]``. When the
reshaped tensor is 2-D and keeps the last dimension N, element ``(m, n)`` comes from flat index
``m · N + n`` of the MatMul output, whose last index is ``n``: the BN's channel axis (1) is still the
MatMul's output-feature axis. So the BN folds into the MatMul exactly: the weight's columns are scaled
(``W`` may be computed from constants, e.g. the dynamo exporter's ``Transpose`` of a Linear weight),
and the shift goes into the following bias ``Add`` when there is one, else into a new ``Add`` after
the Reshape.

The MatMul's (and bias Add's) output may also be read by ``Shape`` nodes (TorchScript's
``reshape_as``): they read the shape only, which the fold does not change.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal, SkipReason

from .common import FLOAT_DTYPES, STD, attr, dims_str, is_constish, node_label, op_name
from .constants import const, weight
from .context import FoldContext
from .rewiring import append_add, duplicate, set_input
from .shapes import rank_of, shape_of
from .weights import channel_absmax, eager, lazy_fold


def _source(node: ir.Node) -> tuple[ir.Node | None, ir.Node | None]:
    """(MatMul, bias Add or None) that produce the Reshape's input, or (None, None)."""
    x = node.inputs[0] if node.inputs else None
    p = x.producer() if x is not None else None
    if p is None or p.domain not in STD or p.graph is not node.graph:
        return None, None
    if p.op_type == "MatMul":
        return p, None
    if p.op_type == "Add" and len(p.inputs) == 2:
        for v in p.inputs:
            q = v.producer() if v is not None else None
            if q is not None and q.op_type == "MatMul" and q.domain in STD and q.graph is p.graph:
                return q, p
    return None, None


def check_flattened(ctx: FoldContext, node: ir.Node) -> None:
    """Refuse (``unsupported_producer``) a Reshape/Flatten whose input is not a MatMul (+ bias Add)
    output. Called before the Reshape's output is checked for other users."""
    del ctx
    if _source(node)[0] is None:
        x = node.inputs[0] if node.inputs else None
        p = x.producer() if x is not None else None
        what = "a graph input or constant" if p is None else f"{op_name(p)} {node_label(p)}"
        raise Refusal(
            SkipReason.UNSUPPORTED_PRODUCER,
            f"input comes from {node.op_type} {node_label(node)} of {what}, not of a MatMul",
        )


def fold_flattened(
    ctx: FoldContext, node: ir.Node, s: np.ndarray, t: np.ndarray
) -> tuple[ir.Node, str, ir.Value]:
    """Fold (s, t) through ``node`` (Reshape/Flatten to [M, N]) into the MatMul before it."""
    check_flattened(ctx, node)
    mm, add = _source(node)
    a, b = mm.inputs[0], mm.inputs[1] if len(mm.inputs) > 1 else None
    try:
        w = weight(ctx, b, "MatMul weight")
    except Refusal as refusal:
        if refusal.reason == SkipReason.NON_CONSTANT_WEIGHT and a is not None and is_constish(a):
            raise Refusal(
                SkipReason.UNSUPPORTED_LAYOUT,
                "MatMul's constant is its first input; the BN channel axis is its second's",
            ) from None
        raise
    if len(w.shape) != 2:
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"MatMul weight has shape {list(w.shape)}, expected [K, N]",
        )
    n = w.shape[1]
    _check_merges_leading(ctx, node, n)
    if s.shape[0] != n:
        raise Refusal(SkipReason.SHAPE_MISMATCH, f"BN has {s.shape[0]} channels, MatMul N={n}")
    copied = _private(ctx, mm, add, node)
    mm, add = _source(node)
    install = lazy_fold(
        ctx,
        mm,
        1,
        w,
        lambda arr: numerics.fold_matmul(arr, s),
        lambda: channel_absmax(w.load, 1, n) * np.abs(s),
        "MatMul weight",
    )
    through = f"through {node.op_type} {node_label(node)} (leading axes merged, features last)"
    if add is not None:
        bias_idx = 1 if add.inputs[0].producer() is mm else 0
        bias_v = add.inputs[bias_idx]
        bias = weight(ctx, bias_v, "Add bias")
        if not bias.shape or bias.shape[-1] != n or int(np.prod(bias.shape)) != n:
            raise Refusal(
                SkipReason.UNSUPPORTED_LAYOUT,
                f"Add bias has shape {list(bias.shape)}, expected [{n}] or [1, {n}]",
            )
        b64 = numerics.fold_bias(bias.load64().reshape(n), s, t).reshape(bias.shape)
        b_arr = numerics.round_to(b64, FLOAT_DTYPES[bias.dtype], "Add bias")
        install()
        set_input(ctx, add, bias_idx, eager(ctx, b_arr, bias.dtype, b64, bias_v.name or "bias"))
        how = f"weight columns scaled {through}; following Add bias updated"
        return mm, how + copied, node.outputs[0]
    t_arr = numerics.round_to(t, FLOAT_DTYPES[w.dtype], "MatMul bias")
    install()
    if not np.any(t_arr):
        return mm, f"weight columns scaled {through}; shift is zero" + copied, node.outputs[0]
    add_out = append_add(ctx, node, eager(ctx, t_arr, w.dtype, t, f"{mm.name or 'matmul'}_bias"))
    return mm, f"weight columns scaled {through}; Add of the shift created" + copied, add_out


def _check_merges_leading(ctx: FoldContext, node: ir.Node, n: int) -> None:
    """Refuse unless ``node``'s output is [M, n]: 2-D, with the input's last dimension (n) kept."""
    out = shape_of(ctx, node.outputs[0])
    if out is None or None in out[-1:]:
        out = _computed_out(ctx, node)
    if out is None or len(out) != 2 or out[-1] != n:
        shown = "unknown" if out is None else dims_str(out)
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"{node.op_type} {node_label(node)} output is {shown}; the BN folds through it only when "
            f"it is [M, {n}] (leading axes merged, the MatMul's features last)",
        )


def _computed_out(ctx: FoldContext, node: ir.Node) -> list[int | None] | None:
    """The output dims from the Reshape's constant shape or the Flatten's axis, when static shapes
    are missing."""
    if node.op_type == "Flatten":
        r = rank_of(ctx, node.inputs[0])
        axis = int(attr(node, "axis", 1))
        axis += r if r is not None and axis < 0 else 0
        dims = shape_of(ctx, node.inputs[0])
        if r is None or dims is None or axis != r - 1:
            return None
        return [None, dims[-1]]
    try:
        c = const(ctx, node.inputs[1] if len(node.inputs) > 1 else None, what="shape", weight=False)
        shape = [int(d) for d in np.asarray(c.load()).reshape(-1)]
    except Refusal:
        return None
    if len(shape) != 2 or shape[1] <= 0:
        return None
    return [shape[0] if shape[0] > 0 else None, shape[1]]


def _value_only_users(v: ir.Value, reader: ir.Node) -> list[ir.Node]:
    """Nodes other than ``reader`` (and ``Shape`` nodes, which read the shape only) that read ``v``."""
    return [
        u.node
        for u in v.uses()
        if u.node is not reader and not (u.node.op_type == "Shape" and u.node.domain in STD)
    ]


def _private(ctx: FoldContext, mm: ir.Node, add: ir.Node | None, node: ir.Node) -> str:
    """Make the MatMul (and bias Add) feed only ``node`` (Shape readers aside); copies them with
    ``duplicate_shared``. Returns what was copied, for the decision's detail."""
    copied = ""
    if add is not None:
        copied += _own(ctx, add, node, node)
        add = node.inputs[0].producer()
    return copied + _own(ctx, mm, add if add is not None else node, node)


def _own(ctx: FoldContext, producer: ir.Node, reader: ir.Node, node: ir.Node) -> str:
    out = producer.outputs[0]
    others = _value_only_users(out, reader)
    if not others and not out.is_graph_output():
        return ""
    where = "a graph output" if out.is_graph_output() else "also used by "
    where += ", ".join(sorted({node_label(o) for o in others})[:3])
    if not ctx.duplicate_shared:
        raise Refusal(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"{producer.op_type} output {out.name} (before {node.op_type} {node_label(node)}) "
            f"is {where}",
        )
    duplicate(ctx, producer, reader, next(i for i, v in enumerate(reader.inputs) if v is out))
    return f"; folded into a copy of {producer.op_type} {node_label(producer)} (--duplicate-shared)"
