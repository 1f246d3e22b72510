"""Lowering (``lower_remaining``): a kept inference BN becomes ``Mul`` + ``Add``.

Only BNs that were kept for a reason other than their own parameters are lowered: they run in
inference mode and their (s, t) is known. The BN stays "kept" in the report, with direction
``"lowered"``. It is not lowered (and the detail says why) when its input's rank is unknown, its
dtype is not a float type, or s or t does not fit that dtype.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal
from bnfold.report import BNDecision

from .common import FLOAT_DTYPES
from .context import FoldContext
from .rewiring import bypass, const_input
from .shapes import dtype_of, rank_of
from .weights import eager


def lower(
    ctx: FoldContext, bn: ir.Node, s: np.ndarray, t: np.ndarray, decision: BNDecision
) -> BNDecision:
    """Rewrite a kept inference ``bn`` as Mul + Add; the updated decision."""
    x, y = bn.inputs[0], bn.outputs[0]
    out_rank = rank_of(ctx, x) or rank_of(ctx, y)
    dtype = dtype_of(ctx, x) or dtype_of(ctx, y)
    why = None
    if out_rank is None or out_rank < 2:
        why = "the rank of its input is unknown"
    elif dtype not in FLOAT_DTYPES:
        why = f"its input dtype {dtype} is not a float type"
    if why is None:
        shape = (s.shape[0],) + (1,) * (out_rank - 2)
        try:
            s_arr = numerics.round_to(s, FLOAT_DTYPES[dtype], "BN scale").reshape(shape)
            t_arr = numerics.round_to(t, FLOAT_DTYPES[dtype], "BN shift").reshape(shape)
        except Refusal as refusal:
            why = refusal.detail
    if why is not None:
        return dataclasses.replace(decision, detail=f"{decision.detail}; not lowered: {why}")
    base = bn.name or "bn"
    mul_out = ir.Value(
        name=ctx.fresh(f"{y.name or base}_scaled"), type=ir.TensorType(dtype), shape=x.shape
    )
    add_out = ir.Value(
        name=ctx.fresh(f"{y.name or base}_lowered"),
        type=y.type or ir.TensorType(dtype),
        shape=y.shape,
    )
    mul = ir.Node("", "Mul", inputs=[x, None], outputs=[mul_out], name=ctx.fresh(f"{base}_mul"))
    add = ir.Node(
        "", "Add", inputs=[mul_out, None], outputs=[add_out], name=ctx.fresh(f"{base}_add")
    )
    bn.graph.insert_before(bn, [mul, add])
    scale = eager(ctx, s_arr, dtype, s.reshape(shape), f"{base}_scale")
    mul.replace_input_with(1, const_input(ctx, scale, mul))
    shift = eager(ctx, t_arr, dtype, t.reshape(shape), f"{base}_shift")
    add.replace_input_with(1, const_input(ctx, shift, add))
    bypass(ctx, bn, add_out)
    ctx.modified = True
    return dataclasses.replace(
        decision, direction="lowered", detail=f"{decision.detail}; lowered to Mul + Add"
    )
