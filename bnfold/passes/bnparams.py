"""Reading a BatchNormalization: is it an inference BN with constant parameters, and its (s, t).

A BN is refused (kept) when it

- has fewer than 5 inputs (``invalid_params``);
- runs in training mode: ``training_mode=1`` (opset ≥ 14), ``is_test=0`` (opset < 7), or statistics
  outputs declared below opset 14, which ONNX Runtime runs in training mode (``training_mode``);
- has statistics outputs that something reads (``stats_outputs_used``);
- has a parameter that is not a float constant (see :mod:`.constants`) or is not per-channel
  (``spatial=0`` per-element parameters pass only when equal within each channel);
- is float16/bfloat16 with a mean large against its spread (``precision_loss``).

Otherwise y = s · x + t with s = γ / √(σ² + ε), t = β − μ · s, computed in float64 by
:func:`bnfold.numerics.bn_scale_shift`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal, SkipReason

from .common import FLOAT_DTYPES, attr
from .constants import const
from .context import FoldContext
from .shapes import dtype_of

_PARAM_NAMES = ("scale", "B", "mean", "var")


def bn_affine(ctx: FoldContext, bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of an inference ``bn`` as float64 [C] vectors; a Refusal says why there are none."""
    _check_mode(ctx, bn)
    epsilon = float(attr(bn, "epsilon", np.float32(1e-5)))  # a FLOAT attribute: 1e-5 in float32
    params = []
    first_param_dtype = None
    for name, value in zip(_PARAM_NAMES, bn.inputs[1:5], strict=True):
        c = const(ctx, value, what=f"BN {name}", weight=False)
        first_param_dtype = first_param_dtype or c.dtype
        if c.dtype not in FLOAT_DTYPES:
            raise Refusal(SkipReason.UNSUPPORTED_DTYPE, f"BN {name} has dtype {c.dtype}")
        params.append(c.load64())
    channels = params[0].shape[0] if params[0].ndim else 1
    # spatial=0 (opset < 9) has per-element parameters; per_channel accepts them only when exact.
    vecs = [numerics.per_channel(p, channels, n) for p, n in zip(params, _PARAM_NAMES, strict=True)]
    s, t = numerics.bn_scale_shift(*vecs, epsilon)
    _check_precision(ctx, bn, vecs[2], vecs[3], epsilon, first_param_dtype)
    return s, t


def _check_mode(ctx: FoldContext, bn: ir.Node) -> None:
    """Refuse a BN that runs in training mode or whose statistics outputs are read."""
    if len(bn.inputs) < 5 or any(v is None for v in bn.inputs[:5]):
        raise Refusal(SkipReason.INVALID_PARAMS, "BatchNormalization needs 5 inputs")
    if ctx.opset >= 14 and attr(bn, "training_mode", 0):
        raise Refusal(SkipReason.TRAINING_MODE, "training_mode=1")
    if ctx.opset < 7 and not attr(bn, "is_test", 0):
        raise Refusal(
            SkipReason.TRAINING_MODE, "is_test=0 (opset < 7), so it runs in training mode"
        )
    extra = [o for o in bn.outputs[1:] if o is not None and o.name]
    used = [o for o in extra if o.uses() or o.is_graph_output()]
    if used:
        raise Refusal(
            SkipReason.STATS_OUTPUTS_USED,
            "statistics outputs used: " + ", ".join(o.name for o in used),
        )
    if extra and ctx.opset < 14:
        # ONNX Runtime runs a pre-14 BN that declares statistics outputs in training mode.
        raise Refusal(
            SkipReason.TRAINING_MODE,
            f"declares {len(extra)} statistics output(s), so it runs in training mode",
        )


def _check_precision(
    ctx: FoldContext,
    bn: ir.Node,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
    param_dtype: ir.DataType | None,
) -> None:
    """Keep a float16/bfloat16 BN whose mean is large against its spread: folding moves the
    cancellation x − μ into rounded weights and loses about log2(|μ|/σ) bits (the differential
    fuzz found garbage outputs from |μ|/σ ≈ 28 on; verification with N(0, 1) inputs, which lack
    that offset, does not see it)."""
    dtype = dtype_of(ctx, bn.inputs[0]) or param_dtype
    if dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return
    ratio = numerics.mean_to_spread(mean, var, epsilon)
    limit = numerics.HALF_PRECISION_MEAN_LIMIT
    if ratio.size and float(np.max(ratio)) > limit:
        c = int(np.argmax(ratio))
        raise Refusal(
            SkipReason.PRECISION_LOSS,
            f"{dtype.name.lower()} BN with |mean|/std = {float(ratio[c]):.3g} at channel {c} "
            f"(limit {limit:g}): folding would lose about {np.log2(float(ratio[c])):.0f} bits",
        )
