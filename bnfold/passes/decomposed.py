"""Decomposed BNs: a chain of per-channel ``Mul``/``Add``/``Sub``/``Div`` right after a producer.

Exporters sometimes lower a BN to arithmetic with constants. A chain matches when

- it starts at a ``Mul``/``Add``/``Sub``/``Div`` that reads the single-use output of a ``Conv``,
  ``ConvTranspose``, ``Gemm`` or ``MatMul`` in the same graph;
- each step applies a per-channel constant: it broadcasts along the channel axis (axis 1) only, after
  right-alignment (or the legacy ``broadcast``/``axis`` rules below opset 7), and is finite;
- it contains at least one ``Mul`` or ``Div`` (a lone bias ``Add`` is not a BN);
- no-op ``Cast``s between two steps are part of it (Keras 3's torch export wraps every op in one).

:func:`chain_kind` says whether the chain is a BN (``"batchnorm"``: scale and shift, per channel) or
another affine (``"affine"``, e.g. a layer scale: reported apart, not counted as a BatchNorm). Chains
anywhere else are :mod:`.affine`'s.

The steps compose into one (s, t) in float64 (:func:`bnfold.numerics.affine_step`), which folds
backward like a BN (:mod:`.backward`); the chain is removed and reported as one decision with
direction ``"decomposed"``. A chain that does not match, or whose fold is refused, is left alone and
not reported.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal, SkipReason
from bnfold.report import BNDecision

from .backward import HANDLERS
from .common import AFFINE_OPS, PRODUCERS, STD, attr, node_label, rank
from .constants import weight
from .context import FoldContext
from .layout import is_noop_cast
from .rewiring import remove_nodes, take_over_output
from .shapes import rank_of

logger = logging.getLogger(__name__)

_MAX_CHAIN = 64


def try_decomposed(ctx: FoldContext, first: ir.Node, scope: str) -> BNDecision | None:
    """Fold the chain that starts at ``first`` into its producer; None when it does not match."""
    graph = first.graph
    producer, data = _single_use_producer(first)
    if producer is None or not _has_scale_op(first, graph):
        return None
    try:
        out_rank, channels = _producer_layout(ctx, producer)
    except Refusal:
        return None
    chain, steps, (s, t) = compose(ctx, first, data, out_rank, channels)
    if not any(n.op_type in ("Mul", "Div") for n in chain):
        return None  # a lone bias Add is not a BN (and Conv/Gemm already have one)
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        return None
    try:
        target, how, new_out = HANDLERS[producer.op_type](ctx, producer, s, t)
    except Refusal as refusal:
        logger.debug(
            "decomposed BN %s not folded: %s", [node_label(n) for n in chain], refusal.detail
        )
        return None
    name = chain_label(chain)  # before an output is renamed
    last = chain[-1].outputs[0]
    take_over_output(ctx, last, new_out, "_bn_removed")
    last.replace_all_uses_with(new_out, replace_graph_outputs=True)
    remove_nodes(ctx, chain, keep=new_out)
    ctx.modified = True
    return BNDecision(
        name=name,
        folded=True,
        kind=chain_kind(chain, s),
        source="lowered",
        direction="decomposed",
        target=node_label(target),
        target_op=target.op_type,
        detail=f"{' → '.join(steps)} folded: {how}",
        graph=scope,
    )


def chain_label(chain: list[ir.Node]) -> str:
    """The decision's name: the chain's arithmetic nodes joined by " + " (no-op Casts left out)."""
    return " + ".join(node_label(n) for n in chain if n.op_type in AFFINE_OPS)


def chain_kind(chain: list[ir.Node], s: np.ndarray) -> str:
    """``"batchnorm"`` when the chain has the structure of a lowered BatchNorm, else ``"affine"``.

    A lowered BN scales *and* shifts per channel: the chain has a ``Mul``/``Div`` and an
    ``Add``/``Sub``, over more than one channel (TF writes ``batchnorm/mul_1`` + ``batchnorm/add_1``,
    Keras 3's torch backend ``Sub(mean)`` → ``Mul(scale)`` → ``Add(beta)``). A TF node name with a
    ``batchnorm/`` scope says so too. Anything else (a layer-scale ``Mul``, ``x · 0.5 + 0.5``) is
    an ``"affine"``: reported as what it is, and not counted among the BatchNorms.
    """
    ops = {n.op_type for n in chain}
    if any("batchnorm/" in (n.name or "").lower() for n in chain) and ops & {"Mul", "Div"}:
        return "batchnorm"
    scales = ops & {"Mul", "Div"}
    shifts = ops & {"Add", "Sub"}
    return "batchnorm" if scales and shifts and s.shape[0] > 1 else "affine"


def _single_use_producer(first: ir.Node) -> tuple[ir.Node | None, ir.Value | None]:
    """The Conv/ConvTranspose/Gemm/MatMul whose single-use output ``first`` reads, and that output."""
    for v in first.inputs[:2]:
        p = v.producer() if v is not None else None
        if (
            p is not None
            and p.graph is first.graph
            and p.domain in STD
            and p.op_type in PRODUCERS
            and len(v.uses()) == 1
            and not v.is_graph_output()
        ):
            return p, v
    return None, None


def compose(
    ctx: FoldContext, node: ir.Node, value: ir.Value, out_rank: int, channels: int, axis: int = 1
) -> tuple[list[ir.Node], list[str], tuple[np.ndarray, np.ndarray]]:
    """Walk the chain from ``node`` while each step is per-channel along ``axis``; (chain, step
    texts, (s, t)). No-op ``Cast``s between two steps belong to the chain (they are removed with
    it); one after the last step does not."""
    s, t = np.ones(channels), np.zeros(channels)
    chain: list[ir.Node] = []
    steps: list[str] = []
    while True:
        step = affine_operand(ctx, node, value, out_rank, channels, axis)
        if step is None:
            break
        c, const_first, shape = step
        try:
            s, t = numerics.affine_step(s, t, node.op_type, c, const_first=const_first)
        except Refusal:
            break
        chain.append(node)
        steps.append(f"{node.op_type}({'c, y' if const_first else 'y, c'}: c{list(shape)})")
        casts, nxt = next_step(ctx, node)
        if nxt is None:
            break
        chain.extend(casts)
        node, value = nxt, nxt_input(casts, node)
    return chain, steps, (s, t)


def nxt_input(casts: list[ir.Node], node: ir.Node) -> ir.Value:
    """The value the next step reads: the last no-op Cast's output, else ``node``'s output."""
    return casts[-1].outputs[0] if casts else node.outputs[0]


def next_step(ctx: FoldContext, node: ir.Node) -> tuple[list[ir.Node], ir.Node | None]:
    """(no-op Casts in between, the next Mul/Add/Sub/Div) when ``node``'s output flows, through
    single-use no-op Casts only, into exactly one such op in the same graph; ([], None) otherwise."""
    casts: list[ir.Node] = []
    cur = node
    for _ in range(_MAX_CHAIN):
        out = cur.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1:
            return [], None
        nxt = uses[0].node
        if nxt.graph is not node.graph or nxt.domain not in STD:
            return [], None
        if nxt.op_type in AFFINE_OPS:
            return casts, nxt
        if not (nxt.op_type == "Cast" and uses[0].idx == 0 and is_noop_cast(ctx, nxt)):
            return [], None
        casts.append(nxt)
        cur = nxt
    return [], None


def _has_scale_op(first: ir.Node, graph: ir.Graph) -> bool:
    """Whether the single-use run of Mul/Add/Sub/Div from ``first`` contains a Mul or Div (a
    cheap structural test before any constant is read)."""
    node = first
    for _ in range(_MAX_CHAIN):
        if node.op_type in ("Mul", "Div"):
            return True
        out = node.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1:
            return False
        node = uses[0].node
        if node.graph is not graph or node.domain not in STD or node.op_type not in AFFINE_OPS:
            return False
    return False


def _producer_layout(ctx: FoldContext, node: ir.Node) -> tuple[int, int]:
    """(rank of the output, channel count along axis 1) of a Conv/ConvTranspose/Gemm/MatMul."""
    op = node.op_type
    w = weight(ctx, node.inputs[1] if len(node.inputs) > 1 else None, f"{op} weight")
    if op in ("Conv", "ConvTranspose"):
        if len(w.shape) < 3:
            raise Refusal(SkipReason.SHAPE_MISMATCH, f"{op} weight has rank {len(w.shape)}")
        group = int(attr(node, "group", 1))
        return len(w.shape), (w.shape[1] * group if op == "ConvTranspose" else w.shape[0])
    if len(w.shape) != 2:
        raise Refusal(SkipReason.UNSUPPORTED_LAYOUT, f"{op} weight has shape {list(w.shape)}")
    if op == "Gemm":
        return 2, (w.shape[0] if attr(node, "transB", 0) else w.shape[1])
    out_rank = rank(node.outputs[0]) or rank(node.inputs[0]) or rank_of(ctx, node.outputs[0])
    if out_rank != 2:
        raise Refusal(SkipReason.UNSUPPORTED_LAYOUT, f"MatMul output rank {out_rank}")
    return 2, w.shape[1]


def affine_operand(
    ctx: FoldContext, node: ir.Node, data: ir.Value, out_rank: int, channels: int, axis: int = 1
) -> tuple[np.ndarray, bool, tuple[int, ...]] | None:
    """(per-channel constant as [C], constant-is-first, its shape) when ``node`` applies a
    per-channel constant to ``data``; None otherwise. The constant must broadcast along the channel
    ``axis`` only: size 1 on every other axis after right-alignment, and no more axes than the
    data."""
    if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1] or data not in node.inputs:
        return None
    i = list(node.inputs).index(data)
    try:
        c = weight(ctx, node.inputs[1 - i], f"{node.op_type} constant")
    except Refusal:
        return None
    shape = tuple(c.shape)
    aligned = _aligned_shape(ctx, node, shape, out_rank, data_first=i == 0)
    if aligned is None:
        return None
    for a, d in enumerate(aligned):
        if d != 1 and not (a == axis and d == channels):
            return None
    arr = c.load64().reshape(-1)
    vec = np.full(channels, arr[0]) if arr.size == 1 else arr
    if not np.all(np.isfinite(vec)):
        return None
    return vec, i == 1, shape


def _aligned_shape(
    ctx: FoldContext, node: ir.Node, shape: tuple[int, ...], out_rank: int, *, data_first: bool
) -> tuple[int, ...] | None:
    """The constant's shape aligned to the data's rank as the op broadcasts it, or None."""
    if len(shape) > out_rank:
        return None
    aligned = (1,) * (out_rank - len(shape)) + shape  # numpy-style broadcasting (opset ≥ 7)
    if ctx.opset >= 7:
        return aligned
    # Legacy broadcasting: none without broadcast=1; with it, B aligns at ``axis`` (default:
    # its trailing dims). Only the constant may be broadcast, so it must be the second input.
    if not int(attr(node, "broadcast", 0)) or not data_first:
        return None
    axis = attr(node, "axis", None)
    if axis is not None:
        axis = int(axis) + (out_rank if int(axis) < 0 else 0)
        if axis < 0 or axis + len(shape) > out_rank:
            return None
        aligned = (1,) * axis + shape + (1,) * (out_rank - axis - len(shape))
    return aligned
