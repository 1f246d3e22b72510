"""Backward folds: the BN folds into the node that produces its input (preferred).

Cases, one function each (:data:`HANDLERS`):

1. ``Conv`` (1-D/2-D/3-D, any groups, with or without bias; a missing bias is created): the weight
   is scaled along its output channels (axis 0), the bias becomes s · b + t.
2. ``ConvTranspose`` (any rank, groups > 1, Cin ≠ Cout, with or without bias): the weight
   [Cin, Cout/g, k...] is scaled along axis 1, per group.
3. ``Gemm`` with constant B (and C, when present): transA/transB, alpha, beta, C of shape [N],
   [1, N] or [M, N]; beta becomes 1 and C absorbs it.
4. ``MatMul`` with a constant [K, N] weight and a 2-D input: the weight's columns are scaled and an
   ``Add`` of the shift is created (none when the shift is zero).
5. ``MatMul`` followed by ``Add`` of a constant bias of shape [N] or [1, N]: the bias absorbs the shift.
6. ``Reshape``/``Flatten`` of a MatMul (+ bias Add) to [M, N], features last (:mod:`.flattened`).
7. ``Concat`` of Convs on the channel axis: the BN split by channel slices (:mod:`.concat`).

An ``Add`` that is no MatMul's bias (a residual sum), a Concat of non-Conv values and a Reshape of
anything but a MatMul are refused as ``unsupported_producer`` before their outputs' other readers
are looked at (:data:`PRECHECKS`): the producer could not take the fold even if it fed the BN only.

Between the producer and a BN node there may be ``Transpose``/no-op ``Cast``/``Identity`` nodes
(:mod:`.layout`) that bring the producer's channel axis back to axis 1; each must feed the next only.
The producer's output must feed the BN only; with ``duplicate_shared`` a shared producer is copied
and the BN folds into the copy (the other users keep the original). A fold refused midway is undone.
The formulas are in :mod:`bnfold.numerics`; every weight is range-checked, then folded lazily.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal, SkipReason
from bnfold.report import BNDecision

from .common import FLOAT_DTYPES, STD, attr, bias_name, is_constish, node_label, op_name, rank
from .concat import check_concat, fold_concat
from .constants import Const, const, weight
from .context import FoldContext
from .flattened import check_flattened, fold_flattened
from .layout import axis_before, is_layout
from .rewiring import append_add, bypass, duplicate, set_input
from .shapes import rank_of
from .weights import Install, channel_absmax, conv_transpose_absmax, eager, lazy_fold

#: (folded node, what was done, the value that now carries the BN's output)
Folded = tuple[ir.Node, str, ir.Value]
Handler = Callable[[FoldContext, ir.Node, np.ndarray, np.ndarray], Folded]


def fold_backward(
    ctx: FoldContext, bn: ir.Node, s: np.ndarray, t: np.ndarray, scope: str
) -> BNDecision:
    """Fold ``bn`` (y = s · x + t) into the producer of its input, or refuse with the reason."""
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    if producer is None:
        raise Refusal(
            SkipReason.NO_PRODUCER, f"input {x.name if x else '?'} is not produced by a node"
        )
    op = op_name(producer)
    if producer.graph is not bn.graph:
        raise Refusal(
            SkipReason.IN_SUBGRAPH,
            f"its producer {op} {node_label(producer)} is outside {scope}, in an enclosing graph",
        )
    passed: list[ir.Node] = []
    if is_layout(ctx, producer):
        producer, passed = _through_layout(ctx, bn, producer)
        op = op_name(producer)
    handler = HANDLERS.get(op)
    if handler is None or (passed and op == "Add"):
        raise Refusal(
            SkipReason.UNSUPPORTED_PRODUCER, f"input comes from {op} {node_label(producer)}"
        )
    if op in PRECHECKS:  # a producer that can never take the fold says so before any sharing
        PRECHECKS[op](ctx, producer)
    ctx.undo.clear()
    try:
        producer, copied = (producer, "") if passed else _private_producer(ctx, bn, producer)
        target, how, new_out = handler(ctx, producer, s, t)
    except Refusal:
        for undo in reversed(ctx.undo):
            undo()
        raise
    finally:
        ctx.undo.clear()
    via = ", ".join(f"{n.op_type} {node_label(n)}" for n in passed)
    bypass(ctx, bn, bn.inputs[0] if passed else new_out)
    ctx.modified = True
    return BNDecision(
        name=node_label(bn),
        folded=True,
        direction="backward",
        target=node_label(target),
        target_op=target.op_type,
        detail=(f"through {via}: " if via else "") + how + copied,
        graph=scope,
    )


def _through_layout(ctx: FoldContext, bn: ir.Node, first: ir.Node) -> tuple[ir.Node, list[ir.Node]]:
    """The producer above a run of layout nodes (Transpose, no-op Cast/Identity; :mod:`.layout`)
    that brings its output channels (axis 1) to the BN's channel axis 1, with the nodes passed.
    Every value on the way must feed the next node only (the fold changes what it carries)."""
    value, axis, node = bn.inputs[0], 1, first
    rank = rank_of(ctx, value)
    passed: list[ir.Node] = []
    while is_layout(ctx, node):
        if value.is_graph_output() or len(value.uses()) != 1:
            raise Refusal(
                SkipReason.PRODUCER_OUTPUT_SHARED,
                f"{node.op_type} output {value.name} is also used elsewhere",
            )
        new_axis = axis_before(node, axis, rank)
        if new_axis is None:
            raise Refusal(
                SkipReason.UNSUPPORTED_LAYOUT, f"cannot follow axis {axis} through {node.op_type}"
            )
        passed.append(node)
        value, axis = node.inputs[0], new_axis
        nxt = value.producer()
        if nxt is None or nxt.graph is not bn.graph:
            raise Refusal(SkipReason.NO_PRODUCER, f"{value.name} is not produced by a node here")
        node = nxt
    if value.is_graph_output() or len(value.uses()) != 1:
        raise Refusal(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"{node.op_type} output {value.name} is also used elsewhere",
        )
    if axis != 1 and node.op_type in HANDLERS:
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"the BN channels are axis {axis} of {node.op_type} {node_label(node)}'s output",
        )
    return node, passed


def _private_producer(ctx: FoldContext, bn: ir.Node, producer: ir.Node) -> tuple[ir.Node, str]:
    """The producer, or (``duplicate_shared``) a copy of it when its output is also read elsewhere."""
    x = bn.inputs[0]
    if not x.is_graph_output() and len(x.uses()) == 1:
        return producer, ""
    users = sorted({node_label(u.node) for u in x.uses() if u.node is not bn})
    where = ("a graph output" if x.is_graph_output() else "") + (
        (" and " if x.is_graph_output() and users else "")
        + ("also used by " + ", ".join(users[:3]) if users else "")
    )
    if not ctx.duplicate_shared:
        raise Refusal(
            SkipReason.PRODUCER_OUTPUT_SHARED, f"{producer.op_type} output {x.name} is {where}"
        )
    copy = duplicate(ctx, producer, bn, 0)
    return copy, (
        f"; folded into a copy of {producer.op_type} {node_label(producer)}, "
        f"whose output is {where} (--duplicate-shared)"
    )


def fold_conv(ctx: FoldContext, node: ir.Node, s: np.ndarray, t: np.ndarray) -> Folded:
    """Conv and ConvTranspose: scale the weight along the output channels; fold the bias."""
    install, how = prepare_conv(ctx, node, s, t)
    install()
    return node, how, node.outputs[0]


def conv_channels(ctx: FoldContext, node: ir.Node) -> int:
    """The number of output channels of a Conv/ConvTranspose, read from its constant weight."""
    w = weight(ctx, node.inputs[1] if len(node.inputs) > 1 else None, f"{node.op_type} weight")
    if len(w.shape) < 3:
        raise Refusal(SkipReason.SHAPE_MISMATCH, f"{node.op_type} weight has rank {len(w.shape)}")
    if node.op_type != "ConvTranspose":
        return w.shape[0]
    group = int(attr(node, "group", 1))
    if group < 1 or w.shape[0] % group:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH, f"weight {list(w.shape)} does not fit group={group}"
        )
    return w.shape[1] * group


def prepare_conv(
    ctx: FoldContext, node: ir.Node, s: np.ndarray, t: np.ndarray
) -> tuple[Install, str]:
    """Check the fold of (s, t) into a Conv/ConvTranspose (refusing changes nothing); return the
    step that installs the folded weight and bias, and what it does."""
    is_t = node.op_type == "ConvTranspose"
    w = weight(ctx, node.inputs[1] if len(node.inputs) > 1 else None, f"{node.op_type} weight")
    if len(w.shape) < 3:
        raise Refusal(SkipReason.SHAPE_MISMATCH, f"{node.op_type} weight has rank {len(w.shape)}")
    group = int(attr(node, "group", 1))
    if is_t:
        if group < 1 or w.shape[0] % group:
            raise Refusal(
                SkipReason.SHAPE_MISMATCH, f"weight {list(w.shape)} does not fit group={group}"
            )
        cout = w.shape[1] * group
        axis_desc = f"output channels (axis 1 of [Cin, Cout/g, k...], group={group})"
    else:
        cout = w.shape[0]
        axis_desc = "axis 0"
    if s.shape[0] != cout:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"BN has {s.shape[0]} channels, {node.op_type} produces {cout}",
        )
    bias_v = node.inputs[2] if len(node.inputs) > 2 else None
    b = weight(ctx, bias_v, f"{node.op_type} bias") if bias_v is not None else None
    if b is not None and tuple(b.shape) != (cout,):
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"{node.op_type} bias has shape {list(b.shape)}, expected [{cout}]",
        )
    # Exact overflow check before committing: max|W'[o]| = max|W[o]| · |s[o]|.
    absmax = (
        (lambda: conv_transpose_absmax(w, group))
        if is_t
        else (lambda: channel_absmax(w.load, 0, cout))
    )
    rows = None
    if is_t:
        formula = lambda a: numerics.fold_conv_transpose(a, s, group)  # noqa: E731
    else:
        formula = lambda a: numerics.fold_conv(a, s)  # noqa: E731
        rows = lambda a, sl: numerics.fold_conv(a, s[sl])  # noqa: E731 - output rows
    install = lazy_fold(
        ctx, node, 1, w, formula, lambda: absmax() * np.abs(s), f"{node.op_type} weight", rows
    )
    bias64 = numerics.fold_bias(b.load64() if b is not None else None, s, t)
    bias_dtype = b.dtype if b is not None else w.dtype
    bias_arr = numerics.round_to(bias64, FLOAT_DTYPES[bias_dtype], f"{node.op_type} bias")

    def install_all() -> None:
        install()
        new_bias = eager(ctx, bias_arr, bias_dtype, bias64, bias_name(bias_v, node, "conv"))
        set_input(ctx, node, 2, new_bias)

    created = "bias created" if b is None else "bias updated"
    return install_all, f"weight scaled along {axis_desc}; {created}"


def gemm_operands(
    ctx: FoldContext, node: ir.Node, label: str
) -> tuple[bool, float, float, Const, ir.Value | None, Const | None]:
    """(transB, alpha, beta, constant B, C value, constant C or None) of a Gemm, for either fold
    direction; refuses when B or C is not a usable constant."""
    if len(node.inputs) < 2:
        raise Refusal(SkipReason.INVALID_PARAMS, f"{label} needs 2 inputs")
    trans_b = bool(attr(node, "transB", 0))
    alpha = float(attr(node, "alpha", 1.0))
    beta = float(attr(node, "beta", 1.0))
    bw = weight(ctx, node.inputs[1], "Gemm B")
    c_v = node.inputs[2] if len(node.inputs) > 2 else None
    c = weight(ctx, c_v, "Gemm C") if c_v is not None else None
    if len(bw.shape) != 2:
        raise Refusal(SkipReason.SHAPE_MISMATCH, f"Gemm B has shape {list(bw.shape)}")
    return trans_b, alpha, beta, bw, c_v, c


def fold_gemm(ctx: FoldContext, node: ir.Node, s: np.ndarray, t: np.ndarray) -> Folded:
    """Gemm: scale B along N, C becomes s · beta · C + t (created when absent), beta becomes 1."""
    trans_b, alpha, beta, bw, c_v, c = gemm_operands(ctx, node, "Gemm")
    n = bw.shape[0] if trans_b else bw.shape[1]
    if s.shape[0] != n:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH, f"BN has {s.shape[0]} channels, Gemm produces N={n}"
        )
    install = lazy_fold(
        ctx,
        node,
        1,
        bw,
        lambda a: numerics.fold_gemm_b(a, s, trans_b=trans_b),
        lambda: channel_absmax(bw.load, 0 if trans_b else 1, n) * np.abs(s),
        "Gemm B",
        (lambda a, sl: numerics.fold_gemm_b(a, s[sl], trans_b=True)) if trans_b else None,
    )
    c64 = numerics.fold_gemm_c(c.load64() if c else None, s, t, beta=beta)
    c_dtype = c.dtype if c is not None else bw.dtype
    c_arr = numerics.round_to(c64, FLOAT_DTYPES[c_dtype], "Gemm C")
    install()
    set_input(ctx, node, 2, eager(ctx, c_arr, c_dtype, c64, bias_name(c_v, node, "gemm", "_C")))
    how = f"B scaled along N ({'rows, transB=1' if trans_b else 'columns, transB=0'}); "
    how += ("C created" if c is None else "C updated") + (
        f", beta {beta:g} → 1" if beta != 1.0 and c is not None else ""
    )
    if beta != 1.0:
        node.attributes["beta"] = ir.Attr("beta", ir.AttributeType.FLOAT, 1.0)
    if alpha != 1.0:
        how += f"; alpha {alpha:g} kept"
    return node, how, node.outputs[0]


def _matmul_weight(ctx: FoldContext, mm: ir.Node, s: np.ndarray) -> tuple[Const, Install]:
    """The [K, N] constant weight of a MatMul on a 2-D input, range-checked for scaling its columns."""
    if len(mm.inputs) != 2:
        raise Refusal(SkipReason.INVALID_PARAMS, "MatMul needs 2 inputs")
    a, b = mm.inputs
    try:
        w = weight(ctx, b, "MatMul weight")
    except Refusal as refusal:
        if refusal.reason == SkipReason.NON_CONSTANT_WEIGHT and a is not None and is_constish(a):
            raise Refusal(
                SkipReason.UNSUPPORTED_LAYOUT,
                "MatMul's constant is its first input; "
                "the BN channel axis is not its output-feature axis",
            ) from None
        raise
    if len(w.shape) != 2:
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"MatMul weight has shape {list(w.shape)}, expected [K, N]",
        )
    out_rank = rank(mm.outputs[0]) or rank(a) or rank_of(ctx, mm.outputs[0])
    if out_rank is None:
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            "rank of the MatMul output is unknown; the BN channel axis (1) must be its last axis",
        )
    if out_rank != 2:
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"MatMul output has rank {out_rank}; BN normalises axis 1, "
            f"the features are on axis {out_rank - 1}",
        )
    if s.shape[0] != w.shape[1]:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"BN has {s.shape[0]} channels, MatMul produces N={w.shape[1]}",
        )
    install = lazy_fold(
        ctx,
        mm,
        1,
        w,
        lambda arr: numerics.fold_matmul(arr, s),
        lambda: channel_absmax(w.load, 1, w.shape[1]) * np.abs(s),
        "MatMul weight",
    )
    return w, install


def fold_matmul(ctx: FoldContext, mm: ir.Node, s: np.ndarray, t: np.ndarray) -> Folded:
    """MatMul: scale the weight's columns; an Add of the shift follows (none for a zero shift)."""
    w, install = _matmul_weight(ctx, mm, s)
    t_arr = numerics.round_to(t, FLOAT_DTYPES[w.dtype], "MatMul bias")
    install()
    if not np.any(t_arr):
        return mm, "weight columns scaled; shift is zero, no bias added", mm.outputs[0]
    add_out = append_add(ctx, mm, eager(ctx, t_arr, w.dtype, t, f"{mm.name or 'matmul'}_bias"))
    return mm, "weight columns scaled; Add of the shift created", add_out


def fold_matmul_add(ctx: FoldContext, add: ir.Node, s: np.ndarray, t: np.ndarray) -> Folded:
    """MatMul followed by Add of a constant [N] / [1, N] bias: scale the columns, fold the bias."""
    if len(add.inputs) != 2:
        raise Refusal(SkipReason.UNSUPPORTED_PRODUCER, "input comes from Add")
    mm_idx = next((i for i, v in enumerate(add.inputs) if _is_matmul_output(v, add)), None)
    if mm_idx is None:
        raise Refusal(
            SkipReason.UNSUPPORTED_PRODUCER,
            f"input comes from Add {node_label(add)}, not MatMul + Add",
        )
    mm_out = add.inputs[mm_idx]
    mm = mm_out.producer()
    bias_v = add.inputs[1 - mm_idx]
    bias = weight(ctx, bias_v, "Add bias")
    copied = ""
    if len(mm_out.uses()) != 1 or mm_out.is_graph_output():
        if not ctx.duplicate_shared:
            raise Refusal(
                SkipReason.PRODUCER_OUTPUT_SHARED,
                f"MatMul output {mm_out.name} is also used elsewhere",
            )
        mm = duplicate(ctx, mm, add, mm_idx)
        copied = f" (into a copy of MatMul {node_label(mm_out.producer())})"
    w, install = _matmul_weight(ctx, mm, s)
    n = w.shape[1]
    if bias.shape not in ((n,), (1, n)):
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"Add bias has shape {list(bias.shape)}, expected [{n}] or [1, {n}]",
        )
    b64 = numerics.fold_bias(bias.load64(), s, t)
    b_arr = numerics.round_to(b64, FLOAT_DTYPES[bias.dtype], "Add bias")
    install()
    set_input(ctx, add, 1 - mm_idx, eager(ctx, b_arr, bias.dtype, b64, bias_v.name or "bias"))
    return mm, f"weight columns scaled{copied}; following Add bias updated", add.outputs[0]


def _is_matmul_output(v: ir.Value | None, add: ir.Node) -> bool:
    p = v.producer() if v is not None else None
    return p is not None and p.op_type == "MatMul" and p.domain in STD and p.graph is add.graph


def check_add(ctx: FoldContext, add: ir.Node) -> None:
    """An Add folds only as the constant bias Add of a MatMul; a sum of two computed values (a
    residual connection) is no foldable producer, whoever else reads it."""
    for i, v in enumerate(add.inputs):
        if _is_matmul_output(v, add) and len(add.inputs) == 2:
            try:
                const(ctx, add.inputs[1 - i], what="Add bias", weight=True)
                return
            except Refusal as refusal:  # a bias that is a constant, but not a usable one, says so
                if refusal.reason != SkipReason.NON_CONSTANT_WEIGHT:
                    return
    parts = []
    for v in add.inputs:
        p = v.producer() if v is not None else None
        parts.append(op_name(p) if p is not None else "a graph input or constant")
    raise Refusal(
        SkipReason.UNSUPPORTED_PRODUCER,
        f"input comes from Add {node_label(add)} of {' and '.join(parts)}: "
        "an Add is a foldable producer only as the constant bias of a MatMul",
    )


#: The backward fold for each producer op (an Add is tried as the bias of a MatMul; a Concat of
#: Convs is split by channels; a Reshape/Flatten merging leading axes is folded through).
HANDLERS: dict[str, Handler] = {
    "Conv": fold_conv,
    "ConvTranspose": fold_conv,
    "Gemm": fold_gemm,
    "MatMul": fold_matmul,
    "Add": fold_matmul_add,
    "Concat": fold_concat,
    "Reshape": fold_flattened,
    "Flatten": fold_flattened,
}
#: Checks run before the producer's output is checked for other readers: a producer these refuse
#: can never take the fold, and the reason says so (not "its output is shared").
PRECHECKS: dict[str, Callable[[FoldContext, ir.Node], None]] = {
    "Add": check_add,
    "Concat": check_concat,
    "Reshape": check_flattened,
    "Flatten": check_flattened,
}
