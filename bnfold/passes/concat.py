"""Backward fold through a channel ``Concat`` of Convs (timm's MixedConv2d: mixnet, mixed kernels).

``y = BN(Concat(conv_0(x_0), …, conv_k(x_k), axis=1))``: channel slice ``[o_i, o_i + C_i)`` of the BN
acts on ``conv_i``'s output only, so the BN splits into k + 1 per-channel affines, each folded into
its Conv exactly as a plain Conv → BN (:func:`~bnfold.passes.backward.prepare_conv`); the Concat then
carries the BN's output. Every slice is checked before any weight changes, so a refused slice leaves
the graph as it was.

Only a Concat whose every input is the output of a ``Conv``/``ConvTranspose`` that feeds nothing but
this Concat folds (with ``duplicate_shared`` a shared Conv is copied for the Concat). A Concat of
features that are also read elsewhere (DenseNet's dense blocks, DPN) or of non-Conv values keeps its BN.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.reasons import Refusal, SkipReason

from .common import STD, attr, node_label, op_name
from .context import FoldContext
from .rewiring import duplicate
from .shapes import rank_of

_CONVS = ("Conv", "ConvTranspose")


def check_concat(ctx: FoldContext, concat: ir.Node) -> None:
    """Refuse (``unsupported_producer``) a Concat that can never take the fold: an input that is not
    a Conv output of this graph. Called before the Concat's own output is checked for other users."""
    del ctx
    for i, v in enumerate(concat.inputs):
        p = v.producer() if v is not None else None
        if (
            p is None
            or p.op_type not in _CONVS
            or p.domain not in STD
            or p.graph is not concat.graph
        ):
            what = "a graph input or constant" if p is None else f"{op_name(p)} {node_label(p)}"
            raise Refusal(
                SkipReason.UNSUPPORTED_PRODUCER,
                f"input comes from Concat {node_label(concat)}, whose input {i} comes from {what} "
                "(only a Concat of Conv outputs folds)",
            )


def fold_concat(
    ctx: FoldContext, concat: ir.Node, s: np.ndarray, t: np.ndarray
) -> tuple[ir.Node, str, ir.Value]:
    """Split (s, t) by the Concat's channel slices and fold each slice into its Conv."""
    from .backward import conv_channels, prepare_conv  # backward imports this module

    check_concat(ctx, concat)
    _check_axis(ctx, concat)
    if len({id(v) for v in concat.inputs}) != len(concat.inputs):
        raise Refusal(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"Concat {node_label(concat)} reads the same Conv output more than once",
        )
    convs = [v.producer() for v in concat.inputs]
    sizes = [conv_channels(ctx, c) for c in convs]
    if sum(sizes) != s.shape[0]:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"BN has {s.shape[0]} channels, the Convs into Concat {node_label(concat)} "
            f"produce {' + '.join(map(str, sizes))}",
        )
    copied = [_private(ctx, concat, i) for i in range(len(convs))]
    convs = [v.producer() for v in concat.inputs]
    steps = []
    offset = 0
    for conv, size in zip(convs, sizes, strict=True):
        sl = slice(offset, offset + size)
        steps.append(prepare_conv(ctx, conv, s[sl], t[sl])[0])
        offset += size
    for install in steps:
        install()
    names = ", ".join(
        f"{c.op_type} {node_label(c)} [{n}]" for c, n in zip(convs, sizes, strict=True)
    )
    how = f"split by the Concat's channel slices into {len(convs)} Convs ({names})"
    if any(copied):
        how += "; shared Convs were copied (--duplicate-shared)"
    return concat, how, concat.outputs[0]


def _check_axis(ctx: FoldContext, concat: ir.Node) -> None:
    axis = int(attr(concat, "axis", 1))
    if axis < 0:
        r = rank_of(ctx, concat.outputs[0])
        axis = axis + r if r is not None else axis
    if axis != 1:
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"Concat {node_label(concat)} joins axis {attr(concat, 'axis', 1)}, not the channels",
        )


def _private(ctx: FoldContext, concat: ir.Node, index: int) -> bool:
    """Make input ``index`` of the Concat a Conv output only the Concat reads (copying the Conv with
    ``duplicate_shared``); whether it was copied."""
    v = concat.inputs[index]
    if len(v.uses()) == 1 and not v.is_graph_output():
        return False
    conv = v.producer()
    if not ctx.duplicate_shared:
        users = sorted({node_label(u.node) for u in v.uses() if u.node is not concat})
        where = "a graph output" if v.is_graph_output() else "also used by " + ", ".join(users[:3])
        raise Refusal(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"input comes from Concat {node_label(concat)}, whose input {index} "
            f"({conv.op_type} {node_label(conv)} output {v.name}) is {where}",
        )
    duplicate(ctx, conv, concat, index)
    return True
