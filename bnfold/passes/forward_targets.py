"""The nodes a forward fold folds into, each planned (checked) before anything changes.

The BN's map y = s · x + t reaches each node on its channel axis (``Vec``; after a Flatten/Reshape,
per feature, each channel repeated over its block of D features). One planner per op (:data:`TARGETS`):

- ``Conv`` (channels only, not after a Flatten): the scale goes into the weight's input channels
  (axis 1, per group), the shift into the bias. Zero padding is exact; with padding (and a non-zero
  shift) the border is compensated by one ``Add`` of a constant correction when the input's spatial
  size is static and the correction has at most :data:`MAX_BORDER_CORRECTION` elements, else the BN
  is kept (``padded_consumer``).
- ``Gemm`` (transA = 0) with constant B: rows (transB = 0) or columns of B, per feature; C absorbs
  alpha · shift · B (created when absent), beta becomes 1.
- ``MatMul`` with a constant [K, N] weight on a 2-D input (or features): rows of the weight; the shift
  goes into a following ``Add`` of a constant bias, else into a new ``Add`` (none for a zero shift).

A planner returns a :class:`Plan` whose ``apply()`` rewrites the node and says what it did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal, SkipReason

from .backward import gemm_operands
from .common import FLOAT_DTYPES, STD, attr, bias_name, dims_str, node_label, str_attr
from .constants import Const, weight
from .context import FoldContext
from .layout import is_noop_cast
from .rewiring import append_add, set_input
from .shapes import rank_of, shape_of
from .weights import eager, lazy_fold

#: Largest border-correction constant a forward fold into a padded Conv may add (elements).
MAX_BORDER_CORRECTION = 1 << 20


class NoTarget(Refusal):
    """A forward fold found no node to fold into (as opposed to one it had to refuse)."""

    def __init__(self, detail: str) -> None:
        super().__init__(SkipReason.UNSUPPORTED_PRODUCER, detail)


@dataclass
class Vec:
    """The per-channel affine map a forward fold carries: y = s · x + t along the channel axis.

    ``features``: the value is [N, K] with the channels (or channel blocks) on its last axis.
    ``axis``: otherwise, the channel axis (1 for a BatchNormalization; a Transpose moves it, see
    :mod:`.layout`); ``rank``: the value's rank where known.
    """

    s: np.ndarray
    t: np.ndarray
    features: bool
    channels: int
    block: int = 1
    #: features from a channels-last flatten: feature k is channel k mod C (not blocks of D)
    interleaved: bool = False
    axis: int = 1
    rank: int | None = None


@dataclass
class Plan:
    """A checked forward fold into one node, applied only once every path of the BN is checked."""

    node: ir.Node
    apply: Callable[[], str]
    #: Elements per sample of the border-correction ``Add`` the fold creates (0: none).
    added_elements: int = 0


def plan_conv(ctx: FoldContext, node: ir.Node, value: ir.Value, vec: Vec, via: str) -> Plan:
    """Conv: scale the weight's input channels, shift into the bias, compensate a padded border."""
    label = f"Conv {node_label(node)}"
    _require_axis1(vec, label, via)
    w = weight(ctx, node.inputs[1] if len(node.inputs) > 1 else None, "Conv weight")
    if len(w.shape) < 3:
        raise Refusal(SkipReason.SHAPE_MISMATCH, f"Conv weight has rank {len(w.shape)}")
    group = int(attr(node, "group", 1))
    cout = w.shape[0]
    if group < 1 or cout % group or w.shape[1] * group != vec.channels:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"BN has {vec.channels} channels; {label} reads "
            f"{w.shape[1] * group} (weight {list(w.shape)}, group={group})",
        )
    bias_v = node.inputs[2] if len(node.inputs) > 2 else None
    b = weight(ctx, bias_v, "Conv bias") if bias_v is not None else None
    if b is not None and tuple(b.shape) != (cout,):
        raise Refusal(
            SkipReason.SHAPE_MISMATCH, f"{label} bias has shape {list(b.shape)}, expected [{cout}]"
        )
    geometry = _ConvGeometry.read(ctx, node, tuple(w.shape[2:]))
    w64 = w.load64()
    w.release()
    s = vec.s
    install = lazy_fold(
        ctx,
        node,
        1,
        w,
        lambda a: numerics.fold_conv_input(a, s, group),
        lambda w64=w64: np.abs(numerics.fold_conv_input(w64, s, group)).reshape(-1),
        "Conv weight",
    )
    delta = numerics.conv_input_shift(w64, vec.t, group)
    correction = _border_correction(geometry, w64, vec, group, delta, f"{label}{via}")
    del w64
    bias64 = (b.load64() if b is not None else 0.0) + delta
    bias_dtype = b.dtype if b is not None else w.dtype
    bias_arr = numerics.round_to(
        np.asarray(bias64, dtype=np.float64), FLOAT_DTYPES[bias_dtype], "Conv bias"
    )
    corr_arr = (
        numerics.round_to(correction, FLOAT_DTYPES[w.dtype], "Conv border correction")
        if correction is not None
        else None
    )

    def apply() -> str:
        install()
        new_bias = eager(ctx, bias_arr, bias_dtype, bias64, bias_name(bias_v, node, "conv"))
        set_input(ctx, node, 2, new_bias)
        how = (
            f"{label}{via}: weight scaled along input channels (axis 1, group={group}); "
            f"bias {'updated' if b is not None else 'created'}"
        )
        if corr_arr is not None:
            name = f"{node.name or 'conv'}_border"
            append_add(ctx, node, eager(ctx, corr_arr, w.dtype, correction, name))
            how += (
                f"; pads {geometry.pads}: border correction Add of {list(corr_arr.shape)} created"
            )
        elif geometry.padded:
            how += "; pads unaffected (the shift is zero where it matters)"
        return how

    return Plan(node, apply, added_elements=corr_arr.size if corr_arr is not None else 0)


@dataclass
class _ConvGeometry:
    """Kernel, strides, dilations and pads of a Conv; the input's spatial size once needed."""

    ctx: FoldContext
    node: ir.Node
    kernel: tuple[int, ...]
    strides: list[int]
    dilations: list[int]
    auto_pad: str
    pads: list[int] | None
    in_spatial: tuple[int, ...] | None = None
    in_dims: list[int | None] | None = None

    @classmethod
    def read(cls, ctx: FoldContext, node: ir.Node, kernel: tuple[int, ...]) -> _ConvGeometry:
        n = len(kernel)
        g = cls(
            ctx,
            node,
            kernel,
            list(attr(node, "strides", None) or [1] * n),
            list(attr(node, "dilations", None) or [1] * n),
            str_attr(node, "auto_pad", "NOTSET"),
            None,
        )
        pads_attr = list(attr(node, "pads", None) or [])
        g.pads = numerics.conv_pads(g.auto_pad, pads_attr, None, kernel, g.strides, g.dilations)
        if g.pads is None:  # SAME_*: the pads depend on the input size
            g.in_spatial = g.spatial()
            g.pads = numerics.conv_pads(
                g.auto_pad, pads_attr, g.in_spatial, kernel, g.strides, g.dilations
            )
        return g

    @property
    def padded(self) -> bool:
        return self.pads is None or any(self.pads)

    def spatial(self) -> tuple[int, ...] | None:
        """The static spatial size of the Conv's input (shape inference on demand), or None."""
        n = len(self.kernel)
        self.in_dims = shape_of(self.ctx, self.node.inputs[0])
        dims = self.in_dims
        if dims is None or len(dims) != n + 2 or any(d is None for d in dims[2:]):
            return None
        return tuple(int(d) for d in dims[2:])


def _border_correction(
    g: _ConvGeometry, w64: np.ndarray, vec: Vec, group: int, delta: np.ndarray, where: str
) -> np.ndarray | None:
    """The constant to add to a padded Conv's output so the border sees the shift as the interior
    does ([1, Cout, out...] float64), None when none is needed; refuses when it cannot be computed."""
    if not g.padded or not np.any(vec.t != 0):
        return None
    if g.in_spatial is None:
        g.in_spatial = g.spatial()
    if g.in_spatial is None or g.pads is None:
        raise Refusal(
            SkipReason.PADDED_CONSUMER,
            f"{where} pads its input ({g.auto_pad if g.pads is None else 'pads=' + str(g.pads)}) "
            f"and the input's spatial size {dims_str(g.in_dims) if g.in_dims else '(unknown)'} "
            "is not static, so the border cannot be compensated",
        )
    n, k, pads = len(g.kernel), g.kernel, g.pads
    out_spatial = [
        (g.in_spatial[d] + pads[d] + pads[n + d] - ((k[d] - 1) * g.dilations[d] + 1))
        // g.strides[d]
        + 1
        for d in range(n)
    ]
    size = w64.shape[0] * int(np.prod(out_spatial, dtype=np.int64))
    if size > MAX_BORDER_CORRECTION:
        raise Refusal(
            SkipReason.PADDED_CONSUMER,
            f"{where} pads its input; compensating the border would add a constant of "
            f"{size} values (limit {MAX_BORDER_CORRECTION})",
        )
    kmap = numerics.conv_shift_map(w64, vec.t, group, g.in_spatial, pads, g.strides, g.dilations)
    correction = (kmap - delta.reshape((-1,) + (1,) * n))[None]
    return correction if np.any(correction) else None


def _blocks_text(vec: Vec, before: str, after: str = "") -> str:
    """How the per-channel map was spread over the flattened features, for the detail text."""
    if vec.block <= 1:
        return ""
    if vec.interleaved:
        return f"{before}channels interleaved, {vec.block} positions × {vec.channels}{after}"
    return f"{before}blocks of {vec.block}{after}"


def _require_axis1(vec: Vec, label: str, via: str) -> None:
    """Conv and Gemm read their channels / features on axis 1."""
    if not vec.features and vec.axis != 1:
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"{label}{via} reads channels on axis 1; the BN channel axis is {vec.axis} there",
        )


def plan_gemm(ctx: FoldContext, node: ir.Node, value: ir.Value, vec: Vec, via: str) -> Plan:
    """Gemm (transA = 0): scale B along K, C absorbs alpha · shift · B, beta becomes 1."""
    label = f"Gemm {node_label(node)}"
    _require_axis1(vec, label, via)
    if int(attr(node, "transA", 0)):
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"{label}{via} has transA=1: the BN channels are its M axis",
        )
    trans_b, alpha, beta, bw, c_v, c = gemm_operands(ctx, node, label)
    k = bw.shape[1] if trans_b else bw.shape[0]
    if k != vec.s.shape[0]:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"{label} reads K={k} features, the BN gives {vec.s.shape[0]}",
        )
    n_out = bw.shape[0] if trans_b else bw.shape[1]
    if c is not None:
        try:
            np.broadcast_shapes(tuple(c.shape), (n_out,))
        except ValueError:
            raise Refusal(
                SkipReason.SHAPE_MISMATCH,
                f"{label} C has shape {list(c.shape)}, which does not broadcast to N={n_out}",
            ) from None
    b64 = bw.load64()
    bw.release()
    s = vec.s
    install = lazy_fold(
        ctx,
        node,
        1,
        bw,
        lambda a: numerics.fold_gemm_input(a, s, trans_b=trans_b),
        lambda b64=b64: np.abs(numerics.fold_gemm_input(b64, s, trans_b=trans_b)).reshape(-1),
        "Gemm B",
    )
    shift = np.float64(alpha) * numerics.gemm_input_shift(b64, vec.t, trans_b=trans_b)
    del b64
    c64 = shift if c is None else np.float64(beta) * c.load64() + shift
    c_dtype = c.dtype if c is not None else bw.dtype
    c_arr = numerics.round_to(c64, FLOAT_DTYPES[c_dtype], "Gemm C")

    def apply() -> str:
        install()
        set_input(ctx, node, 2, eager(ctx, c_arr, c_dtype, c64, bias_name(c_v, node, "gemm", "_C")))
        if beta != 1.0:
            node.attributes["beta"] = ir.Attr("beta", ir.AttributeType.FLOAT, 1.0)
        axis = "columns, transB=1" if trans_b else "rows, transB=0"
        blocks = _blocks_text(vec, ", ")
        return (
            f"{label}{via}: B scaled along K ({axis}{blocks}); "
            f"C {'updated' if c is not None else 'created'}"
        )

    return Plan(node, apply)


def plan_matmul(ctx: FoldContext, node: ir.Node, value: ir.Value, vec: Vec, via: str) -> Plan:
    """MatMul with a constant [K, N] weight: scale its rows; the shift becomes (part of) a bias."""
    label = f"MatMul {node_label(node)}"
    if not vec.features:
        rank = rank_of(ctx, value)
        if rank is None:
            raise Refusal(
                SkipReason.UNKNOWN_SHAPE,
                f"the rank of {value.name}, read by {label}{via}, is unknown",
            )
        if vec.axis != rank - 1 or rank < 2:
            raise Refusal(
                SkipReason.UNSUPPORTED_LAYOUT,
                f"{label}{via} contracts the last axis of a rank-{rank} tensor; "
                f"the BN channel axis is {vec.axis}",
            )
    if len(node.inputs) != 2:
        raise Refusal(SkipReason.INVALID_PARAMS, f"{label} needs 2 inputs")
    w = weight(ctx, node.inputs[1], "MatMul weight")
    if len(w.shape) != 2:
        raise Refusal(
            SkipReason.UNSUPPORTED_LAYOUT,
            f"{label} weight has shape {list(w.shape)}, expected [K, N]",
        )
    if w.shape[0] != vec.s.shape[0]:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"{label} reads K={w.shape[0]} features, the BN gives {vec.s.shape[0]}",
        )
    w64 = w.load64()
    w.release()
    s = vec.s
    install = lazy_fold(
        ctx,
        node,
        1,
        w,
        lambda a: numerics.fold_gemm_input(a, s, trans_b=False),
        lambda w64=w64: np.abs(numerics.fold_gemm_input(w64, s, trans_b=False)).reshape(-1),
        "MatMul weight",
    )
    shift = numerics.gemm_input_shift(w64, vec.t, trans_b=False)
    del w64
    bias_add, bias_idx, bias = _following_bias(ctx, node, shift)
    if bias is not None:
        b64, b_dtype = bias.load64() + shift, bias.dtype
    else:
        b64, b_dtype = shift, w.dtype
    b_arr = numerics.round_to(b64, FLOAT_DTYPES[b_dtype], "MatMul bias")

    def apply() -> str:
        install()
        blocks = _blocks_text(vec, " (", ")")
        how = f"{label}{via}: weight rows scaled{blocks}; "
        if bias_add is not None:
            bias_v = bias_add.inputs[bias_idx]
            new_bias = eager(ctx, b_arr, b_dtype, b64, bias_v.name or "bias")
            set_input(ctx, bias_add, bias_idx, new_bias)
            return how + "following Add bias updated"
        if not np.any(b_arr):
            return how + "shift is zero, no bias added"
        append_add(ctx, node, eager(ctx, b_arr, b_dtype, b64, f"{node.name or 'matmul'}_bias"))
        return how + "Add of the shift created"

    return Plan(node, apply)


def _following_bias(
    ctx: FoldContext, node: ir.Node, shift: np.ndarray
) -> tuple[ir.Node | None, int | None, Const | None]:
    """(Add, index of its bias, the bias) when the MatMul's only reader adds a constant bias that
    the shift can go into; (None, None, None) otherwise."""
    out = node.outputs[0]
    while True:
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            return None, None, None
        user = uses[0].node
        # a no-op Cast between the MatMul and its bias (Keras 3's torch export) changes nothing
        if user.op_type == "Cast" and user.graph is node.graph and is_noop_cast(ctx, user):
            out = user.outputs[0]
            continue
        break
    if not (
        user.op_type == "Add"
        and user.domain in STD
        and len(user.inputs) == 2
        and user.graph is node.graph
        and user.inputs[0] is not user.inputs[1]
    ):
        return None, None, None
    other = 1 - uses[0].idx
    try:
        cand = weight(ctx, user.inputs[other], "Add bias")
        if (
            len(cand.shape) <= 2
            and np.broadcast_shapes(cand.shape, shift.shape) in (tuple(cand.shape), shift.shape)
            and (len(cand.shape) < 2 or cand.shape[0] == 1)
        ):
            return user, other, cand
    except (Refusal, ValueError):
        pass
    return None, None, None


#: The node a forward fold folds into, per op type (read at input 0).
TARGETS: dict[str, Callable[[FoldContext, ir.Node, ir.Value, Vec, str], Plan]] = {
    "Conv": plan_conv,
    "Gemm": plan_gemm,
    "MatMul": plan_matmul,
}
