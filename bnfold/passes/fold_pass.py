"""The pass itself: walk every graph, decide every BN, return the decisions.

It only arbitrates; each way of folding lives in its own module (see the package docstring).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from bnfold.reasons import Refusal, SkipReason
from bnfold.report import BNDecision

from .affine import STRUCTURAL, kept_reason, try_affine
from .backward import fold_backward
from .bnparams import bn_affine
from .branch import fold_identity_branch
from .common import AFFINE_OPS, STD, is_bn, node_label
from .context import FoldContext, walk_graphs
from .decomposed import try_decomposed
from .forward import fold_forward
from .lowering import lower
from .rewiring import remove_dead, restore_names
from .sharing import share_identical

logger = logging.getLogger(__name__)


@dataclass
class FoldPassResult(ir.passes.PassResult):
    """The pass's result: the model, whether it changed, and one decision per BatchNormalization
    (and per decomposed BN that was folded), in graph order (main graph, its subgraphs, functions)."""

    decisions: list[BNDecision] = field(default_factory=list)


class BatchNormFoldPass(ir.passes.InPlacePass):
    """Fold inference-mode BatchNormalization into neighbouring linear nodes.

    Every graph is handled alike: the main graph, the bodies of If/Loop/Scan (at any depth) and
    model-local functions. Values a subgraph reads from an enclosing scope are constants when they
    are constants there; new constants go into the graph that uses them (see :mod:`.rewiring`).
    Per BN, in this order:

    1. Backward (:mod:`.backward`): into the ``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul``
       (optionally followed by a bias ``Add``) that produces its input. With ``duplicate_shared``,
       a producer whose output also feeds other nodes is copied and the BN folds into the copy.
    2. Forward (:mod:`.forward`), when no backward fold is possible: into *every* node that reads its
       output (Conv, Gemm, MatMul), directly or through per-channel ops that commute with it
       (MaxPool, AveragePool, Identity, Dropout, …) and a Flatten/Reshape to [N, C·D].
    3. Otherwise it is kept with the most telling :class:`~bnfold.reasons.SkipReason`; with
       ``lower_remaining`` a kept inference BN is rewritten to ``Mul`` + ``Add`` (:mod:`.lowering`).

    4. A kept BN on the identity branch of a RepVGG/MobileOne block (``conv(x) + BN(x)``) folds into
       a sibling Conv's centre tap once every other BN is decided (:mod:`.branch`).

    Decomposed BNs (:mod:`.decomposed`): a chain of per-channel ``Mul``/``Add``/``Sub``/``Div`` right
    after a Conv/ConvTranspose/Gemm/MatMul folds into it (direction ``"decomposed"``; ``kind``
    ``"affine"`` when it is no BN, e.g. a layer scale). Any other chain that is a lowered BN
    (:mod:`.affine`: per-channel scale and shift, e.g. after an activation, in NHWC layout) is
    decided like a BatchNormalization node: backward through Transpose/Cast/bias Add, forward, or
    kept with its reason.

    Constants (:mod:`.constants`) may be initializers, ``Constant``/``ConstantOfShape`` or computed
    from constants. In IR ≥ 4 an initializer that is also a graph input may be overridden by the
    caller, so BNs that depend on one are kept.

    The result is a :class:`FoldPassResult` whose ``decisions`` say, per BN, what it was folded into
    or why it was kept. The instance holds its options only (and, for compatibility, ``decisions``:
    a copy of the last result's, plain data); a run's state lives in a
    :class:`~bnfold.passes.context.FoldContext`, so a pass can be reused and shared.
    """

    def __init__(
        self,
        *,
        lower_remaining: bool = False,
        duplicate_shared: bool = False,
        allow_slower_folds: bool = False,
        defer_range_check: bool = False,
        known_overflow: dict[tuple[str, str, str], str] | None = None,
    ) -> None:
        super().__init__()
        self.lower_remaining = lower_remaining
        self.duplicate_shared = duplicate_shared
        self.allow_slower_folds = allow_slower_folds
        #: For a writer that can fold again: see :mod:`bnfold.passes.weights`.
        self.defer_range_check = defer_range_check
        self.known_overflow = dict(known_overflow or {})
        #: The last run's decisions (compatibility: prefer ``FoldPassResult.decisions``).
        self.decisions: list[BNDecision] = []

    def call(self, model: ir.Model) -> FoldPassResult:
        ctx = FoldContext.create(
            model,
            lower_remaining=self.lower_remaining,
            duplicate_shared=self.duplicate_shared,
            allow_slower_folds=self.allow_slower_folds,
            defer_range_check=self.defer_range_check,
            known_overflow=self.known_overflow,
        )
        _process_tree(ctx, model.graph)
        for fn in model.functions.values():
            ctx.opset = ctx.function_opset(fn)
            _process_tree(ctx, fn.graph)
        ctx.opset = ctx.model_opset
        remove_dead(ctx)
        restore_names(ctx)
        share_identical(ctx)
        self.decisions = list(ctx.decisions)
        return FoldPassResult(model, modified=ctx.modified, decisions=ctx.decisions)


def _process_tree(ctx: FoldContext, root: ir.Graph) -> None:
    """Process ``root``, then every subgraph under it (folds never add or remove a subgraph)."""
    for graph, _ in list(walk_graphs(root)):
        _process(ctx, graph)


def _process(ctx: FoldContext, graph: ir.Graph) -> None:
    """Decide every BN of ``graph`` and fold its decomposed BNs; then lower the kept BNs."""
    scope = ctx.scope(graph)
    kept: list[tuple[int, ir.Node, tuple[np.ndarray, np.ndarray]]] = []
    for node in list(graph):
        if node.graph is not graph:
            continue  # removed by an earlier fold
        if is_bn(node):
            decision, affine = _decide(ctx, node, scope)
            ctx.current_bn = None
            ctx.decisions.append(decision)
            logger.debug("%s: %s %s", decision.name, decision.status, decision.detail)
            if affine is not None:
                kept.append((len(ctx.decisions) - 1, node, affine))
        elif node.op_type in AFFINE_OPS and node.domain in STD:
            decomposed = try_decomposed(ctx, node, scope) or try_affine(ctx, node, scope)
            if decomposed is not None:
                ctx.decisions.append(decomposed)
    for index, bn, (s, t) in kept:  # identity branches, once their sibling Convs are folded
        if bn.graph is graph and ctx.decisions[index].reason in STRUCTURAL:
            try:
                ctx.decisions[index] = fold_identity_branch(ctx, bn, s, t, scope)
            except Refusal as refusal:
                if refusal.detail.startswith("identity branch"):
                    kept_d = ctx.decisions[index]
                    detail = f"{kept_d.detail}; {refusal.detail}"
                    ctx.decisions[index] = dataclasses.replace(kept_d, detail=detail)
    for index, bn, (s, t) in kept:
        if bn.graph is graph and ctx.lower_remaining:
            ctx.decisions[index] = lower(ctx, bn, s, t, ctx.decisions[index])


def _decide(
    ctx: FoldContext, bn: ir.Node, scope: str
) -> tuple[BNDecision, tuple[np.ndarray, np.ndarray] | None]:
    """Fold ``bn`` backward, else forward; else keep it with the most telling reason.

    Returns the decision and, for a kept BN whose affine map is known, (s, t) for lowering.
    """
    ctx.current_bn = (scope, node_label(bn))
    try:
        s, t = bn_affine(ctx, bn)
    except Refusal as refusal:
        return _kept(bn, refusal.reason, refusal.detail, scope), None
    try:
        return fold_backward(ctx, bn, s, t, scope), None
    except Refusal as refusal:
        back = refusal
    try:
        return fold_forward(ctx, bn, s, t, scope), None
    except Refusal as refusal:
        fwd = refusal
    reason, detail = kept_reason(back, fwd)
    return _kept(bn, reason, detail, scope), (s, t)


def _kept(node: ir.Node, reason: SkipReason, detail: str, graph: str) -> BNDecision:
    return BNDecision(
        name=node_label(node), folded=False, reason=reason, detail=detail, graph=graph
    )
