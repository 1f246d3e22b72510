"""Lowered BatchNorms anywhere: a per-channel ``Mul``/``Sub``/``Add``/``Div`` chain, wherever it is.

Exporters lower a BN to arithmetic on the channel axis of whatever precedes it: TF/tf2onnx write
``Mul(x, s) → Add(t)`` (``batchnorm/mul_1``, ``batchnorm/add_1``), Keras 3's torch backend
``Sub(μ) → Mul(s) → Add(β)``, with ``[C]``, ``[1, C]``, ``[1, C, 1, 1]`` or ``[1, 1, 1, C]``
constants, often after an activation and in NHWC layout. :mod:`.decomposed` folds a chain that reads
a Conv/Gemm/MatMul directly; this module handles every other chain that *is* a BN
(:func:`~.decomposed.chain_kind`: a per-channel scale and shift over more than one channel, or a TF
``batchnorm/`` scope) and whose data was not normalized in the graph (the γ, β of a LayerNorm,
GroupNorm or InstanceNorm are not a BN: :func:`_normalized_in_graph`; a Mul + Add right after a
BatchNormalization node is that layer's Caffe2-style Scale, counted with the node), like a
BatchNormalization node:

1. The chain: from its first op, the run of single-use per-channel steps (no-op ``Cast``s between
   them included), all along one channel axis, found from the constants' shapes aligned to the
   data's rank (shape inference gives the rank where the graph does not).
2. Backward, preferred: up from the chain's input through :mod:`.layout` nodes (``Transpose`` maps
   the channel axis, no-op ``Cast``/``Identity``) and per-channel bias ``Add``s (absorbed:
   s · (z + b) + t = s · z + (s · b + t), the Add is removed) to a Conv/ConvTranspose/Gemm/MatMul
   whose output channels are that axis; every value on the way must feed the next node only.
3. Forward (:mod:`.forward`), exactly as for a BatchNormalization node, with the channel axis
   tracked through Transpose/Cast (MaxPool with s > 0, an NHWC or NCHW flatten into MatMul rows,
   Conv with its border correction).
4. Otherwise it is reported kept, with the reason, and left as it is.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from bnfold.reasons import Refusal, SkipReason
from bnfold.report import BNDecision

from .backward import HANDLERS
from .common import AFFINE_OPS, PRODUCERS, STD, node_label
from .constants import weight
from .context import FoldContext
from .decomposed import affine_operand, chain_kind, chain_label, compose, next_step
from .forward import check_cost, plan_forward
from .forward_targets import NoTarget, Plan, Vec
from .layout import axis_before, is_layout
from .rewiring import remove_nodes, take_over_output
from .shapes import rank_of, shape_of

logger = logging.getLogger(__name__)

#: Reasons that only say "there is no node on that side to fold into".
STRUCTURAL = frozenset(
    {
        SkipReason.NO_PRODUCER,
        SkipReason.UNSUPPORTED_PRODUCER,
        SkipReason.PRODUCER_OUTPUT_SHARED,
        SkipReason.IN_SUBGRAPH,
    }
)


def kept_reason(back: Refusal, fwd: Refusal) -> tuple[SkipReason, str]:
    """The most telling reason (and detail) when neither direction folds: the backward one, unless
    it only says there is no producer and the forward one says more."""
    if isinstance(fwd, NoTarget) or back.reason not in STRUCTURAL:
        return back.reason, f"{back.detail}; forward: {fwd.detail}"
    return fwd.reason, f"forward: {fwd.detail}; backward: {back.detail}"


class _Chain:
    """A matched lowered BN: its nodes, input, output, channel axis and map y = s · x + t."""

    def __init__(self, nodes: list[ir.Node], steps: list[str], x: ir.Value, axis: int, rank: int):
        self.nodes, self.steps, self.x, self.axis, self.rank = nodes, steps, x, axis, rank
        self.y = nodes[-1].outputs[0]

    @property
    def label(self) -> str:
        return chain_label(self.nodes)

    @property
    def text(self) -> str:
        return " → ".join(self.steps) + f" (channel axis {self.axis} of {self.rank})"


def try_affine(ctx: FoldContext, first: ir.Node, scope: str) -> BNDecision | None:
    """Decide the lowered BN that starts at ``first``; None when no BN starts there."""
    if id(first) in ctx.affine_seen:
        return None
    found = _match(ctx, first)
    if found is None:
        return None
    chain, s, t = found
    ctx.affine_seen.update(id(n) for n in chain.nodes)
    try:
        return _fold_back(ctx, chain, s, t, scope)
    except Refusal as refusal:
        back = refusal
    try:
        return _fold_forward(ctx, chain, s, t, scope)
    except Refusal as refusal:
        fwd = refusal
    reason, detail = kept_reason(back, fwd)
    return BNDecision(
        name=chain.label,
        folded=False,
        reason=reason,
        detail=f"{chain.text}: {detail}",
        graph=scope,
        source="lowered",
    )


def _match(ctx: FoldContext, first: ir.Node) -> tuple[_Chain, np.ndarray, np.ndarray] | None:
    """The BN-like chain from ``first`` with (s, t), or None."""
    if first.domain not in STD or first.op_type not in AFFINE_OPS or len(first.inputs) != 2:
        return None
    if not _has_scale_and_shift(ctx, first):
        return None  # cheap structural test before any constant or shape is read
    data = _data_input(ctx, first)
    rank = rank_of(ctx, data) if data is not None else None
    if data is None or rank is None:
        return None
    axis_channels = _channel_axis(ctx, first, rank)
    if axis_channels is None:
        return None
    axis, channels = axis_channels
    dims = shape_of(ctx, data)
    if dims is None or len(dims) != rank or dims[axis] != channels:
        return None  # the constants would broadcast the data up to C channels: no per-channel map
    if _normalized_in_graph(ctx, data):
        return None  # the affine of a LayerNorm/GroupNorm/InstanceNorm: no BatchNorm
    producer = data.producer()
    if producer is not None and producer.op_type == "BatchNormalization":
        return None  # Caffe2's BatchNorm + Scale: one BN layer, already decided as that node
    nodes, steps, (s, t) = compose(ctx, first, data, rank, channels, axis)
    if not nodes or chain_kind(nodes, s) != "batchnorm":
        return None
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        return None
    return _Chain(nodes, steps, data, axis, rank), s, t


#: Ops a normalization's output passes unchanged in value on its way to its affine.
_TRANSPARENT = frozenset({"Reshape", "Cast", "Transpose", "Identity", "Squeeze", "Unsqueeze"})
#: Normalization nodes whose affine an exporter may write as Mul + Add.
_NORMS = frozenset(
    {
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "MeanVarianceNormalization",
        "LpNormalization",
    }
)


def _normalized_in_graph(ctx: FoldContext, data: ir.Value) -> bool:
    """Whether ``data`` was normalized with statistics computed in the graph: a norm node, or a
    Div/Mul by a tensor derived from a Reduce* (a decomposed LayerNorm/GroupNorm). Their per-channel
    Mul + Add is that norm's affine (γ, β), not an inference BatchNorm."""
    p = data.producer()
    for _ in range(8):
        if p is None or p.op_type not in _TRANSPARENT or not p.inputs or p.inputs[0] is None:
            break
        p = p.inputs[0].producer()
    if p is None:
        return False
    if p.op_type in _NORMS:
        return True
    if p.op_type not in ("Div", "Mul") or len(p.inputs) != 2:
        return False
    return any(_from_reduction(v, 8) for v in p.inputs)


def _from_reduction(value: ir.Value | None, depth: int) -> bool:
    """Whether a Reduce* op is among the few nodes that compute ``value``."""
    p = value.producer() if value is not None else None
    if p is None or depth <= 0:
        return False
    if p.op_type.startswith("Reduce"):
        return True
    return any(_from_reduction(v, depth - 1) for v in p.inputs[:2])


def _has_scale_and_shift(ctx: FoldContext, first: ir.Node) -> bool:
    ops = {first.op_type}
    node: ir.Node | None = first
    for _ in range(16):
        _, node = next_step(ctx, node)
        if node is None:
            break
        ops.add(node.op_type)
    return bool(ops & {"Mul", "Div"}) and bool(ops & {"Add", "Sub"})


def _data_input(ctx: FoldContext, node: ir.Node) -> ir.Value | None:
    """The non-constant input of a binary op whose other input is a constant."""
    a, b = node.inputs
    if a is None or b is None or a is b:
        return None
    for data, other in ((a, b), (b, a)):
        try:
            weight(ctx, other, f"{node.op_type} constant")
        except Refusal:
            continue
        try:
            weight(ctx, data, "data")
        except Refusal:
            return data
    return None


def _channel_axis(ctx: FoldContext, first: ir.Node, rank: int) -> tuple[int, int] | None:
    """(axis, channels) from the first step constant that has more than one element, aligned to
    ``rank``; the other steps are checked against it when the chain is composed."""
    node: ir.Node | None = first
    for _ in range(16):
        if node is None:
            return None
        data = _data_input(ctx, node)
        if data is None:
            return None
        const_v = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
        shape = tuple(weight(ctx, const_v, "constant").shape)
        if len(shape) > rank:
            return None
        aligned = (1,) * (rank - len(shape)) + shape
        big = [(i, d) for i, d in enumerate(aligned) if d != 1]
        if len(big) > 1 or (big and big[0][0] == 0):
            return None
        if big:
            return big[0]
        _, node = next_step(ctx, node)
    return None


# ---------------------------------------------------------------------- backward
def _walk_up(
    ctx: FoldContext, chain: _Chain, s: np.ndarray, t: np.ndarray
) -> tuple[ir.Node, list[ir.Node], list[ir.Node], np.ndarray]:
    """(producer, layout nodes passed, bias Adds absorbed, the shift with those biases folded in);
    refuses when the chain's input does not come, privately, from a producer on the same axis."""
    v, axis, rank = chain.x, chain.axis, chain.rank
    graph = chain.nodes[0].graph
    passed: list[ir.Node] = []
    biases: list[ir.Node] = []
    while True:
        if v.is_graph_output() or len(v.uses()) != 1:
            raise Refusal(SkipReason.PRODUCER_OUTPUT_SHARED, f"{v.name} is also used elsewhere")
        p = v.producer()
        if p is None:
            raise Refusal(SkipReason.NO_PRODUCER, f"input {v.name} is not produced by a node")
        what = f"{p.op_type} {node_label(p)}"
        if p.graph is not graph:
            raise Refusal(SkipReason.IN_SUBGRAPH, f"its producer {what} is in an enclosing graph")
        if is_layout(ctx, p):
            new_axis = axis_before(p, axis, rank)
            if new_axis is None:
                raise Refusal(SkipReason.UNSUPPORTED_LAYOUT, f"cannot follow axis through {what}")
            passed.append(p)
            v, axis = p.inputs[0], new_axis
            continue
        if p.op_type == "Add" and p.domain in STD:
            bias = _bias_of(ctx, p, rank, s.shape[0], axis)
            if bias is not None:
                data, b = bias
                t = t + s * b
                biases.append(p)
                v = data
                continue
        if p.domain not in STD or p.op_type not in PRODUCERS:
            raise Refusal(SkipReason.UNSUPPORTED_PRODUCER, f"input comes from {what}")
        if axis != 1:
            raise Refusal(
                SkipReason.UNSUPPORTED_LAYOUT,
                f"the BN channel axis is {axis} of {what}'s output, its channels are axis 1",
            )
        return p, passed, biases, t


def _bias_of(
    ctx: FoldContext, add: ir.Node, rank: int, channels: int, axis: int
) -> tuple[ir.Value, np.ndarray] | None:
    """(data input, per-channel bias as [C]) of an ``Add`` of a per-channel constant, or None."""
    data = _data_input(ctx, add)
    if data is None:
        return None
    step = affine_operand(ctx, add, data, rank, channels, axis)
    return None if step is None else (data, step[0])


def _fold_back(
    ctx: FoldContext, chain: _Chain, s: np.ndarray, t: np.ndarray, scope: str
) -> BNDecision:
    producer, passed, biases, t2 = _walk_up(ctx, chain, s, t)
    name, text, via = chain.label, chain.text, ""  # labels before any output is renamed
    if passed or biases:
        via = " (through " + ", ".join(f"{n.op_type} {node_label(n)}" for n in passed + biases)
        via += "; bias Add absorbed)" if biases else ")"
    target, how, _ = HANDLERS[producer.op_type](ctx, producer, s, t2)
    target_label = node_label(target)
    _remove_chain(ctx, chain.nodes, chain.x)
    for add in biases:  # closest to the chain first: each one's output now reads its data
        _remove_chain(ctx, [add], _data_input(ctx, add))
    ctx.modified = True
    return BNDecision(
        name=name,
        folded=True,
        direction="backward",
        source="lowered",
        target=target_label,
        target_op=target.op_type,
        detail=f"{text} folded{via}: {how}",
        graph=scope,
    )


def _remove_chain(ctx: FoldContext, nodes: list[ir.Node], x: ir.Value) -> None:
    """Remove ``nodes`` (a chain that reads ``x``); their readers read ``x`` instead."""
    y = nodes[-1].outputs[0]
    take_over_output(ctx, y, x, "_bn_removed")
    y.replace_all_uses_with(x, replace_graph_outputs=True)
    remove_nodes(ctx, nodes, keep=x)


# ---------------------------------------------------------------------- forward
def _fold_forward(
    ctx: FoldContext, chain: _Chain, s: np.ndarray, t: np.ndarray, scope: str
) -> BNDecision:
    y = chain.y
    if y.is_graph_output():
        raise NoTarget("its output is a graph output")
    vec = Vec(s, t, features=False, channels=s.shape[0], axis=chain.axis, rank=chain.rank)
    plans: list[Plan] = []
    plan_forward(ctx, y, vec, chain.nodes[0].graph, plans, [])
    if not plans:
        raise NoTarget("its output feeds no node to fold into")
    if not ctx.allow_slower_folds:  # the same cost rule as for BatchNormalization nodes
        check_cost(ctx, chain.x, plans)
    name = chain.label
    details = [plan.apply() for plan in plans]
    _remove_chain(ctx, chain.nodes, chain.x)
    ctx.modified = True
    return BNDecision(
        name=name,
        folded=True,
        direction="forward",
        source="lowered",
        target=", ".join(node_label(p.node) for p in plans),
        target_op=", ".join(sorted({p.node.op_type for p in plans})),
        detail=f"{chain.text} folded: " + "; ".join(details),
        graph=scope,
    )
