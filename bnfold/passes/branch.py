"""Identity-branch BNs (RepVGG / MobileOne): ``y = … + conv(x) + BN(x)`` folds into the Conv.

A BN on the identity branch of a block whose other branches are Convs of the same ``x``, all summed
by ``Add`` nodes, is ``s · x + t``. A sibling ``Conv`` of ``x`` with stride 1, dilation 1, odd kernel
``k`` padded by ``k // 2`` on every side and as many output as input channels reads ``x[c]`` at its
centre tap exactly where it writes output ``c`` (input channel ``c`` is ``c mod (C/g)`` of its own
group), so

    W'[c, c mod (C/g), k//2, …] = W[c, c mod (C/g), k//2, …] + s[c],   b'[c] = b[c] + t[c]

gives ``conv'(x) = conv(x) + s · x + t`` (RepVGG's re-parameterisation), and the BN and its ``Add``
disappear. This runs after every other BN of the graph was decided (the siblings' own BNs are folded
into their Convs first) and only for BNs that were kept for want of a producer or consumer.

The summands are the leaves of the ``Add`` tree that holds the BN's output: ``Add`` nodes whose
output feeds one other ``Add`` of the tree only. The Conv's output must feed that tree only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal, SkipReason
from bnfold.report import BNDecision

from .common import FLOAT_DTYPES, STD, attr, bias_name, node_label, str_attr
from .constants import weight
from .context import FoldContext
from .rewiring import remove_nodes, set_input, take_over_output
from .weights import channel_absmax, eager, lazy_fold


def _is_add(node: ir.Node | None, graph: ir.Graph) -> bool:
    return (
        node is not None
        and node.op_type == "Add"
        and node.domain in STD
        and node.graph is graph
        and len(node.inputs) == 2
    )


def _single_add_user(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 1 or not _is_add(uses[0].node, graph):
        return None
    return uses[0].node


def _leaves(root: ir.Node, graph: ir.Graph) -> list[ir.Value]:
    """The summands of the Add tree under ``root``."""
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if _is_add(p, graph) and _single_add_user(v, graph) is node:
                stack.append(p)
            elif v is not None:
                out.append(v)
    return out


def _centre_conv(ctx: FoldContext, conv: ir.Node, channels: int) -> str | None:
    """Why ``conv`` cannot take the identity at its centre tap, or None when it can."""
    w = weight(ctx, conv.inputs[1] if len(conv.inputs) > 1 else None, "Conv weight")
    group = int(attr(conv, "group", 1))
    kernel = list(w.shape[2:])
    if w.shape[0] != channels or w.shape[1] * group != channels or not kernel:
        return (
            f"weight {list(w.shape)} (group={group}) does not map {channels} channels to themselves"
        )
    if any(k % 2 == 0 for k in kernel):
        return f"kernel {kernel} has no centre tap"
    ones = [1] * len(kernel)
    strides, dilations = attr(conv, "strides", ones), attr(conv, "dilations", ones)
    if list(strides) != ones or list(dilations) != ones:
        return f"strides {list(strides)}, dilations {list(dilations)}"
    auto_pad = str_attr(conv, "auto_pad", "NOTSET")
    half = [k // 2 for k in kernel]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return None
    pads = list(attr(conv, "pads", [0] * 2 * len(kernel)))
    if auto_pad not in ("NOTSET", "") or pads != half + half:
        return f"padding {auto_pad} {pads} is not {half + half} (same size, centred)"
    return None


def fold_identity_branch(
    ctx: FoldContext, bn: ir.Node, s: np.ndarray, t: np.ndarray, scope: str
) -> BNDecision:
    """Fold ``bn`` (on an identity branch) into a sibling Conv's centre tap, or refuse."""
    graph, x, y = bn.graph, bn.inputs[0], bn.outputs[0]
    add = _single_add_user(y, graph)
    if add is None or x is None:
        raise Refusal(SkipReason.UNSUPPORTED_PRODUCER, "its output is not only a summand of an Add")
    root = add
    while (nxt := _single_add_user(root.outputs[0], graph)) is not None:
        root = nxt
    why: list[str] = []
    for leaf in _leaves(root, graph):
        conv = leaf.producer()
        if (
            conv is None
            or conv.op_type != "Conv"
            or conv.domain not in STD
            or conv.inputs[0] is not x
        ):
            continue
        if conv.graph is not graph or leaf.is_graph_output() or len(leaf.uses()) != 1:
            why.append(f"Conv {node_label(conv)} output is also read elsewhere")
            continue
        problem = _centre_conv(ctx, conv, s.shape[0])
        if problem is None:
            how = _fold_into(ctx, conv, s, t)
            other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
            out = add.outputs[0]
            take_over_output(ctx, out, other, "_identity_removed")
            out.replace_all_uses_with(other, replace_graph_outputs=True)
            remove_nodes(ctx, [add, bn], keep=x)
            ctx.modified = True
            return BNDecision(
                name=node_label(bn),
                folded=True,
                direction="branch",
                target=node_label(conv),
                target_op="Conv",
                detail=f"identity branch summed with Conv {node_label(conv)}: {how}; "
                f"Add {node_label(add)} removed",
                graph=scope,
            )
        why.append(f"Conv {node_label(conv)}: {problem}")
    raise Refusal(
        SkipReason.UNSUPPORTED_PRODUCER,
        "identity branch: "
        + ("; ".join(why[:3]) if why else "no Conv of the same input is summed with it"),
    )


def _fold_into(ctx: FoldContext, conv: ir.Node, s: np.ndarray, t: np.ndarray) -> str:
    w = weight(ctx, conv.inputs[1], "Conv weight")
    cpg = w.shape[1]
    centre = tuple(k // 2 for k in w.shape[2:])
    rows = np.arange(s.shape[0])
    cols = rows % cpg

    def formula(a: np.ndarray) -> np.ndarray:
        out = np.array(a, dtype=np.float64, copy=True)
        out[(rows, cols, *centre)] += s
        return out

    def bound() -> np.ndarray:
        return channel_absmax(w.load, 0, w.shape[0]) + np.abs(s)

    install = lazy_fold(ctx, conv, 1, w, formula, bound, "Conv weight")
    bias_v = conv.inputs[2] if len(conv.inputs) > 2 else None
    b = weight(ctx, bias_v, "Conv bias") if bias_v is not None else None
    if b is not None and tuple(b.shape) != (s.shape[0],):
        raise Refusal(SkipReason.SHAPE_MISMATCH, f"Conv bias has shape {list(b.shape)}")
    bias64 = (b.load64() if b is not None else np.zeros(s.shape[0])) + t
    dtype = b.dtype if b is not None else w.dtype
    bias_arr = numerics.round_to(bias64, FLOAT_DTYPES[dtype], "Conv bias")
    install()
    set_input(ctx, conv, 2, eager(ctx, bias_arr, dtype, bias64, bias_name(bias_v, conv, "conv")))
    return "BN scale added at the centre tap, shift to the bias"
