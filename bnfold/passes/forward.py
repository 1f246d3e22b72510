"""Forward folds: when no backward fold is possible, the BN folds into *every* node that reads it.

Planning walks the readers of the BN's output (:func:`plan_forward`). Each reader is, by op type:

- ``Shape``/``Size``: skipped (they read only the shape, which the fold does not change);
- a per-channel op that commutes with y = s · x + t (:data:`THROUGH`), walked through:
  ``MaxPool``/``GlobalMaxPool`` when every scale is > 0, ``AveragePool`` unless it counts padded
  zeros, ``GlobalAveragePool``, ``Identity``, inference ``Dropout``;
- ``Transpose``, no-op ``Cast`` and ``Identity`` (:mod:`.layout`): walked through, the channel axis
  follows the permutation (a lowered BN in NHWC starts on axis 3); pools and Conv/Gemm need it on
  axis 1, a MatMul on the last axis;
- ``Flatten`` (axis 1) or a ``Reshape`` to [N, C·D] (:data:`RESHAPERS`; the shape a constant, or
  computed from ``Shape`` of the input, :mod:`.shape_vectors`): walked through, and the per-channel
  map becomes per-feature: each channel repeated over its block of D features (channels on axis 1),
  or the channels repeated D times (channels last, Keras's H, W, C flatten order);
- a node to fold into (:data:`~.forward_targets.TARGETS`: Conv, Gemm, MatMul), planned and checked;
- anything else, a value read in a subgraph, or a walked-through output that is a graph output: no
  forward fold (the BN is kept, with the backward reason unless that one is merely structural).

Nothing changes until every path is checked; then every plan is applied and the BN is removed.
The formulas (and why each through-op commutes) are in :mod:`bnfold.numerics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal, SkipReason
from bnfold.report import BNDecision

from .common import MAX_COMPUTED_ELEMENTS, attr, dims_str, node_label, op_name, str_attr
from .constants import const
from .context import FoldContext
from .forward_targets import TARGETS, NoTarget, Plan, Vec
from .layout import axis_after, is_layout, is_noop_cast, transpose_perm
from .rewiring import remove_nodes
from .shape_vectors import Dim, shape_vector
from .shapes import shape_of

__all__ = ["NoTarget", "fold_forward"]


def fold_forward(
    ctx: FoldContext, bn: ir.Node, s: np.ndarray, t: np.ndarray, scope: str
) -> BNDecision:
    """Fold ``bn`` into every reader of its output, or refuse (:class:`NoTarget` when none can)."""
    y, x = bn.outputs[0], bn.inputs[0]
    if y.is_graph_output():
        raise NoTarget("its output is a graph output")
    if not y.uses():
        raise NoTarget("its output is unused")
    # features=False: a Conv consumer implies rank ≥ 3, Flatten/Reshape read the shape themselves,
    # and a MatMul consumer checks the rank (so shape inference runs only when it is needed).
    vec = Vec(s, t, features=False, channels=s.shape[0])
    plans: list[Plan] = []
    plan_forward(ctx, y, vec, bn.graph, plans, [])
    if not ctx.allow_slower_folds:
        check_cost(ctx, x, plans)
    details = [plan.apply() for plan in plans]
    y.replace_all_uses_with(x)
    remove_nodes(ctx, [bn], keep=x)
    ctx.modified = True
    return BNDecision(
        name=node_label(bn),
        folded=True,
        direction="forward",
        target=", ".join(node_label(p.node) for p in plans),
        target_op=", ".join(sorted({p.node.op_type for p in plans})),
        detail="; ".join(details),
        graph=scope,
    )


#: The cost rule (measured; README "Never slower"): a forward fold that must add border-correction
#: ``Add`` nodes is kept unless those Adds touch at most this fraction of the elements the removed BN
#: touches. At ONNX Runtime's default level the BN after an activation is one cheap elementwise
#: kernel, while the correction Add is a full [1, Cout, H', W'] tensor that is not fused into the
#: Conv and sits between the Conv and whatever ORT would have fused with it.
MAX_ADDED_FRACTION = 0.0


def check_cost(ctx: FoldContext, x: ir.Value, plans: list[Plan]) -> None:
    """Refuse (``slower_fold``) a fold whose correction Adds cost more than the BN it removes."""
    added = sum(p.added_elements for p in plans)
    if added == 0:
        return
    dims = shape_of(ctx, x)
    known = dims is not None and all(d is not None for d in dims[1:])
    bn_elements = int(np.prod(dims[1:], dtype=np.int64)) if known else None
    if bn_elements is not None and added <= MAX_ADDED_FRACTION * bn_elements:
        return
    adds = [p for p in plans if p.added_elements]
    where = ", ".join(f"Conv {node_label(p.node)}" for p in adds)
    raise Refusal(
        SkipReason.SLOWER_FOLD,
        f"kept for cost: folding needs a border-correction Add of {added} elements per sample "
        f"after {where}, against the BN's {bn_elements if bn_elements is not None else 'unknown'} "
        "(measured slower at ONNX Runtime level 'all'); --allow-slower-folds folds it",
    )


def plan_forward(
    ctx: FoldContext,
    value: ir.Value,
    vec: Vec,
    graph: ir.Graph,
    plans: list[Plan],
    path: list[ir.Node],
) -> None:
    """Check every reader of ``value`` (recursively through commuting ops); add one plan per node to
    fold into. Refuses when any path cannot take the fold."""
    via = f" (via {' → '.join(f'{n.op_type} {node_label(n)}' for n in path)})" if path else ""
    for use in list(value.uses()):
        node, idx = use.node, use.idx
        op = op_name(node)
        what = f"{op} {node_label(node)}"
        if node.graph is not graph:
            raise NoTarget(f"{value.name} is read inside a subgraph, by {what}{via}")
        if op in ("Shape", "Size"):
            continue
        layout = idx == 0 and is_layout(ctx, node)
        if idx == 0 and (op in THROUGH or op in RESHAPERS or layout):
            if layout:
                nxt = _through_layout(node, vec, f"{what}{via}")
            elif op in THROUGH:
                _check_extra_outputs(node)
                if not vec.features and vec.axis != 1:
                    raise Refusal(
                        SkipReason.UNSUPPORTED_LAYOUT,
                        f"{what}{via} works on axis 1; the BN channel axis is {vec.axis} there",
                    )
                THROUGH[op](ctx, node, vec)
                nxt = vec
            else:
                nxt = _per_feature(vec, RESHAPERS[op](ctx, node, value, vec))
            out = node.outputs[0]
            if out.is_graph_output():
                raise NoTarget(f"the output of {what}{via} is a graph output")
            plan_forward(ctx, out, nxt, graph, plans, path + [node])
            continue
        target = TARGETS.get(op) if idx == 0 else None
        if target is None or (op == "Conv" and vec.features):
            raise NoTarget(f"its output feeds {what}{via}")
        plans.append(target(ctx, node, value, vec, via))


def _through_layout(node: ir.Node, vec: Vec, where: str) -> Vec:
    """The map after a Transpose (the channel axis moves) or a no-op Cast/Identity (unchanged)."""
    if node.op_type != "Transpose":
        return vec
    if vec.features:
        raise NoTarget(f"its flattened features feed {where}")
    perm = transpose_perm(node, vec.rank)
    axis = axis_after(node, vec.axis, vec.rank)
    if perm is None or axis is None:
        raise NoTarget(f"the channel axis {vec.axis} cannot be followed through {where}")
    return replace(vec, axis=axis, rank=len(perm))


def _per_feature(vec: Vec, block: int) -> Vec:
    """The map after a Flatten/Reshape that turns each channel into ``block`` features: blocks of
    ``block`` consecutive features per channel (channels on axis 1), or the channels repeated
    ``block`` times (channels last, as in an NHWC flatten: feature k is channel k mod C)."""
    if vec.axis == 1:
        s, t = numerics.repeat_blocks(vec.s, block), numerics.repeat_blocks(vec.t, block)
    else:
        s, t = np.tile(vec.s, block), np.tile(vec.t, block)
    return Vec(
        s,
        t,
        features=True,
        channels=vec.channels,
        block=vec.block * block,
        interleaved=vec.axis != 1,
    )


# ---------------------------------------------------------------------- through ops
def _check_extra_outputs(node: ir.Node) -> None:
    extra = [o for o in node.outputs[1:] if o is not None and (o.uses() or o.is_graph_output())]
    if extra:
        raise NoTarget(
            f"{node.op_type} {node_label(node)}'s second output ({extra[0].name}) is used"
        )


def _through_max(ctx: FoldContext, node: ir.Node, vec: Vec) -> None:
    """max commutes with s · x + t only where s > 0."""
    bad = np.flatnonzero(vec.s <= 0)
    if bad.size:
        raise Refusal(
            SkipReason.NON_POSITIVE_SCALE,
            f"through {node.op_type} {node_label(node)}: the BN scale is ≤ 0 on {bad.size} of "
            f"{vec.s.size} channels (channel {int(bad[0])}: {vec.s[bad[0]]:.3g}); "
            "max does not commute with it",
        )


def _through_average(ctx: FoldContext, node: ir.Node, vec: Vec) -> None:
    """An average commutes unless padded zeros are counted (the shift would move them)."""
    counted = int(attr(node, "count_include_pad", 0))
    auto_pad = str_attr(node, "auto_pad", "NOTSET")
    pads = list(attr(node, "pads", []) or [])
    padded = (
        auto_pad in ("SAME_UPPER", "SAME_LOWER") or any(pads) or int(attr(node, "ceil_mode", 0))
    )
    if counted and padded:
        raise Refusal(
            SkipReason.PADDED_CONSUMER,
            f"through {node.op_type} {node_label(node)}: count_include_pad=1 averages padded "
            "zeros, which the BN's shift would move",
        )


def _through_identity(ctx: FoldContext, node: ir.Node, vec: Vec) -> None:
    """GlobalAveragePool and Identity always commute."""


def _through_dropout(ctx: FoldContext, node: ir.Node, vec: Vec) -> None:
    """Dropout is the identity in inference mode only."""
    label = f"{node.op_type} {node_label(node)}"
    if ctx.opset < 7 and not attr(node, "is_test", 0):
        raise NoTarget(f"{label} runs in training mode (is_test=0)")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        try:
            mode = const(ctx, node.inputs[2], what="Dropout training_mode", weight=False).load()
        except Refusal:
            raise NoTarget(f"{label}'s training_mode is not a constant") from None
        if np.any(mode):
            raise NoTarget(f"{label} runs in training mode")


#: Per-channel ops a forward fold passes through, and the check each needs.
THROUGH: dict[str, Callable[[FoldContext, ir.Node, Vec], None]] = {
    "MaxPool": _through_max,
    "GlobalMaxPool": _through_max,
    "AveragePool": _through_average,
    "GlobalAveragePool": _through_identity,
    "Identity": _through_identity,
    "Dropout": _through_dropout,
}


# ---------------------------------------------------------------------- Flatten / Reshape
def flatten_block(ctx: FoldContext, node: ir.Node, value: ir.Value, vec: Vec) -> int:
    """How many flattened features each channel of ``value`` becomes through a Flatten/Reshape
    to [N, C·D] (D = the product of the spatial dims); refuses when that is not what it does."""
    label = f"{node.op_type} {node_label(node)}"
    if vec.features:
        raise NoTarget(f"its flattened features feed {label} again")
    dims = in_dims = shape_of(ctx, value)
    if dims is not None and vec.axis not in (1, len(dims) - 1):
        raise NoTarget(f"{label} flattens a value whose channel axis is {vec.axis}")
    if dims is not None and vec.axis != 1:  # channels last: move them to axis 1 for the count
        dims = [dims[0], dims[-1], *dims[1:-1]]
    block = _spatial_block(value, dims, vec.s.shape[0], label)
    features = vec.s.shape[0] * block
    if node.op_type == "Flatten":
        axis = int(attr(node, "axis", 1))
        if axis < 0:
            axis += len(dims)
        if axis != 1:
            raise NoTarget(f"{label} flattens from axis {axis}, not from the channel axis 1")
        return block
    # Reshape: the output must be [N, C·D].
    out = _reshape_target(ctx, node, in_dims)
    if out is None:
        out_dims = shape_of(ctx, node.outputs[0])
        if out_dims is None or len(out_dims) != 2 or out_dims[1] is None:
            raise Refusal(SkipReason.UNKNOWN_SHAPE, f"the output shape of {label} is unknown")
        out = out_dims
    if len(out) != 2 or out[1] != features:
        raise NoTarget(
            f"{label} reshapes {dims_str(dims)} to {dims_str(out)}, not to [N, {features}]"
        )
    return block


def _spatial_block(
    value: ir.Value, dims: list[int | None] | None, channels: int, label: str
) -> int:
    """D, the static number of positions per channel of ``value`` ([N, C, d...])."""
    if dims is None or len(dims) < 2:
        raise Refusal(
            SkipReason.UNKNOWN_SHAPE, f"the shape of {value.name} before {label} is unknown"
        )
    if dims[1] is not None and dims[1] != channels:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH, f"{value.name} has {dims[1]} channels, the BN {channels}"
        )
    if any(d is None for d in dims[2:]):
        raise Refusal(
            SkipReason.UNKNOWN_SHAPE,
            f"the spatial size {dims_str(dims)} of {value.name} before {label} is not static",
        )
    if any(d is not None and d < 1 for d in dims[2:]):
        raise Refusal(
            SkipReason.SHAPE_MISMATCH, f"{value.name} declares the shape {dims_str(dims)}"
        )
    block = int(np.prod(dims[2:], dtype=np.int64)) if len(dims) > 2 else 1
    if block < 1 or channels * block > MAX_COMPUTED_ELEMENTS:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"{value.name} declares the shape {dims_str(dims)}, {block} features per channel",
        )
    return block


def _reshape_target(
    ctx: FoldContext, node: ir.Node, dims: list[int | None]
) -> list[int | None] | None:
    """The output dims of a Reshape whose shape is a constant, or a vector computed from
    ``Shape`` of its own input and constants (:mod:`.shape_vectors`), else None. A -1 is resolved
    when every other output dim is known, or for [N, -1] where N is the input's own dim 0."""
    entries = shape_vector(ctx, node.inputs[1] if len(node.inputs) > 1 else None)
    if entries is None:
        return None
    same = _same_tensors(ctx, node.inputs[0])
    allowzero = int(attr(node, "allowzero", 0))
    out: list[int | None] = []
    keeps_batch = False
    for i, d in enumerate(entries):
        if isinstance(d, Dim):
            if d.value in same and d.axis < len(dims):
                out.append(dims[d.axis])
                keeps_batch |= i == 0 and d.axis == 0
            else:
                known = shape_of(ctx, d.value)
                out.append(known[d.axis] if known and d.axis < len(known) else None)
        elif d == 0 and not allowzero:
            out.append(dims[i] if i < len(dims) else None)
            keeps_batch |= i == 0
        else:
            out.append(d)
    if -1 in out and out.count(-1) == 1:
        i = out.index(-1)
        rest = out[:i] + out[i + 1 :]
        total = np.prod(dims) if all(d is not None for d in dims) else None
        if total is not None and all(d is not None for d in rest) and np.prod(rest) > 0:
            out[i] = int(total // np.prod(rest))
        elif len(out) == 2 and i == 1 and keeps_batch and all(d is not None for d in dims[1:]):
            out[i] = int(np.prod(dims[1:], dtype=np.int64))  # [N, -1]: keep N, flatten the rest
        else:
            out[i] = None
    return out


def _same_tensors(ctx: FoldContext, value: ir.Value | None) -> list[ir.Value]:
    """``value`` and the values it equals through no-op Casts/Identity above it."""
    same: list[ir.Value] = []
    while value is not None and len(same) < 64:
        same.append(value)
        p = value.producer()
        value = p.inputs[0] if p is not None and is_noop_cast(ctx, p) else None
    return same


#: Ops that flatten the channels into features, and how many features each channel becomes.
RESHAPERS: dict[str, Callable[[FoldContext, ir.Node, ir.Value, Vec], int]] = {
    "Flatten": flatten_block,
    "Reshape": flatten_block,
}
