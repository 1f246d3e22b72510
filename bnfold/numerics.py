"""The fold formulas, written down once. Pure numpy, float64 inside, one rounding at the end.

Inference-mode BatchNormalization is a per-channel affine map::

    BN(x)[c] = γ[c] · (x[c] − μ[c]) / √(σ²[c] + ε) + β[c]
             = s[c] · x[c] + t[c]        with  s = γ / √(σ² + ε),  t = β − μ · s

so a BN that follows a linear node ``y = f_W(x) + b`` (whose output channel ``c`` depends only on the
weights of that channel) folds into it as ``W' = W · s`` (along the output-channel axis) and
``b' = b · s + t``. Per target:

Conv            W is [Cout, Cin/g, k...]; the output channel axis of W is 0, for any group count.
                W'[o] = W[o] · s[o];  b'[o] = b[o] · s[o] + t[o]   (b = 0 when the Conv has none).
ConvTranspose   W is [Cin, Cout/g, k...]; output channel ``o = gi · (Cout/g) + j`` of group ``gi`` uses
                W[gi·Cin/g : (gi+1)·Cin/g, j]. So view W as [g, Cin/g, Cout/g, k...] and scale
                axis 2 by s reshaped to [g, 1, Cout/g, 1...];  b' = b · s + t.
Gemm            Y = α · A' · B' + β · C  (A' = Aᵀ if transA, B' = Bᵀ if transB), Y is [M, N] and the BN
                channel axis is N. B' columns scale: B'[:, n] · s[n], i.e. B[:, n] when transB = 0,
                B[n, :] when transB = 1. α is kept; the bias becomes C' = (β · C) · s + t with β' = 1
                (C' has the broadcast shape of C and [N]; a missing C is C = 0).
MatMul          Y = X · W with constant W [K, N] and 2-D X, so Y is [M, N] and the channel axis is N:
                W'[:, n] = W[:, n] · s[n]. A following ``Add(Y, b)`` with a constant b of shape [N] or
                [1, N] becomes b' = b · s + t; without one, an Add of t is created.

All arithmetic happens in float64 and the result is rounded once to the weight's dtype (float16,
bfloat16, float32, float64). Chained folds (Conv → BN → BN) start from the float64 value of the
previous fold, not from its rounded copy, so rounding still happens once.

A fold is refused (:class:`FoldRefused`, turned into a kept BN with that reason by the pass) when a BN
parameter is NaN/Inf, when σ² + ε ≤ 0, or when a folded value would overflow the target dtype.
"""

from __future__ import annotations

__all__ = [
    "FoldRefused",
    "bn_scale_shift",
    "fold_conv",
    "fold_conv_transpose",
    "fold_gemm",
    "fold_gemm_b",
    "fold_gemm_c",
    "fold_matmul",
    "fold_bias",
    "round_to",
    "per_channel",
]

import ml_dtypes
import numpy as np


class FoldRefused(ValueError):
    """The fold would not be exact or not representable. ``reason`` is a SkipReason value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def per_channel(param: np.ndarray, channels: int, name: str) -> np.ndarray:
    """Reduce a BN parameter to a [C] float64 vector.

    Accepts shape [C] and the per-element shape [C, d1, ...] of ``spatial=0`` BNs when every channel's
    values are equal (then the per-element BN is exactly a per-channel one). Anything else is refused.
    """
    p = _f64(param)
    if p.ndim == 1 and p.shape[0] == channels:
        return p
    if p.ndim == 0 or p.shape[0] != channels:
        raise FoldRefused("invalid_params", f"{name} has shape {list(p.shape)}, expected [{channels}]")
    flat = p.reshape(channels, -1)
    if not np.array_equal(flat, np.broadcast_to(flat[:, :1], flat.shape), equal_nan=True):
        raise FoldRefused(
            "per_element_stats",
            f"{name} has per-element values of shape {list(p.shape)} that vary within a channel",
        )
    return flat[:, 0].copy()


def bn_scale_shift(
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (s, t) in float64 such that BN(x) = s · x + t per channel.

    Raises FoldRefused when a parameter is not finite or σ² + ε ≤ 0.
    """
    g, b, m, v = (_f64(x) for x in (scale, bias, mean, var))
    for name, arr in (("scale", g), ("B", b), ("mean", m), ("var", v)):
        if not np.all(np.isfinite(arr)):
            raise FoldRefused("invalid_params", f"BN {name} contains NaN or Inf")
    if not np.isfinite(epsilon):
        raise FoldRefused("invalid_params", f"epsilon is {epsilon}")
    denom = v + np.float64(epsilon)
    if np.any(denom <= 0):
        bad = int(np.argmin(denom))
        raise FoldRefused(
            "invalid_params", f"var + epsilon = {denom[bad]:.3g} ≤ 0 at channel {bad}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite s or t is refused below
        s = g / np.sqrt(denom)
        t = b - m * s
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        raise FoldRefused("overflow", "BN scale/shift is not finite in float64")
    return s, t


def round_to(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Round float64 values once to ``dtype``; refuse when they would overflow it."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return values
    finite_max = float(ml_dtypes.finfo(dtype).max)
    # max/min instead of max(abs(.)): no temporary the size of the tensor.
    peak = max(abs(float(np.max(values))), abs(float(np.min(values)))) if values.size else 0.0
    if peak > finite_max:
        raise FoldRefused(
            "overflow",
            f"folded {what} reaches {peak:.3g}, beyond the {dtype} maximum {finite_max:.3g}",
        )
    if dtype == ml_dtypes.bfloat16:
        # float64 -> bfloat16 directly (round-to-nearest-even on the double value); going through
        # float32 would round twice.
        return _f64_to_bf16(values)
    return values.astype(dtype)


def _f64_to_bf16(values: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of float32. Rounding float64 -> float32 first could round twice
    # (double rounding), so round the float64 mantissa to 8 bits directly, then truncate exactly.
    v = np.asarray(values, dtype=np.float64)
    _, exp = np.frexp(v)  # v = mant * 2**exp, 0.5 <= |mant| < 1
    # The bfloat16 quantum: 2**(exp - 8) for normal values (8 significant bits), and the fixed
    # subnormal spacing 2**-133 below 2**-126.
    quantum_exp = np.maximum(exp - 8, -133)
    rounded = np.ldexp(np.round(np.ldexp(v, -quantum_exp)), quantum_exp)  # np.round is half-to-even
    # `rounded` is a bfloat16 value, so both conversions below are exact.
    return rounded.astype(np.float32).astype(ml_dtypes.bfloat16)


def _check_channels(s: np.ndarray, channels: int, target: str) -> None:
    if s.shape[0] != channels:
        raise FoldRefused(
            "shape_mismatch",
            f"BN has {s.shape[0]} channels but the {target} produces {channels}",
        )


def fold_bias(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """b' = b · s + t in float64 (b = 0 when None). ``bias`` broadcasts against [C]."""
    if bias is None:
        return t.copy()
    return _f64(bias) * s + t


def _f64_copy(a: np.ndarray) -> np.ndarray:
    """A float64 array that the caller may modify in place (never a view of ``a``)."""
    return np.array(a, dtype=np.float64, copy=True)


def fold_conv(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Conv weight [Cout, Cin/g, k...] scaled along axis 0, float64."""
    w = _f64_copy(weight)
    _check_channels(s, w.shape[0], "Conv")
    w *= s.reshape((-1,) + (1,) * (w.ndim - 1))  # in place: one float64 copy of the weight at most
    return w


def fold_conv_transpose(weight: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose weight [Cin, Cout/g, k...] scaled along output channels, float64."""
    w = _f64(weight)
    if group < 1 or w.shape[0] % group:
        raise FoldRefused("shape_mismatch", f"weight shape {list(w.shape)} does not fit group={group}")
    cout_g = w.shape[1]
    _check_channels(s, cout_g * group, "ConvTranspose")
    spatial = w.shape[2:]
    w5 = w.reshape((group, w.shape[0] // group, cout_g) + spatial)
    s5 = s.reshape((group, 1, cout_g) + (1,) * len(spatial))
    return (w5 * s5).reshape(w.shape)  # w is a float64 view or copy; the product is the one result


def fold_gemm_b(b_weight: np.ndarray, s: np.ndarray, *, trans_b: bool) -> np.ndarray:
    """Gemm B scaled along N in float64: columns of B [K, N], or rows of B [N, K] when transB."""
    bw = _f64_copy(b_weight)
    if bw.ndim != 2:
        raise FoldRefused("shape_mismatch", f"Gemm B has rank {bw.ndim}, expected 2")
    _check_channels(s, bw.shape[0] if trans_b else bw.shape[1], "Gemm")
    bw *= s[:, None] if trans_b else s[None, :]
    return bw


def fold_gemm_c(c: np.ndarray | None, s: np.ndarray, t: np.ndarray, *, beta: float) -> np.ndarray:
    """Gemm C' = (β · C) · s + t in float64, to be used with β' = 1 (C = 0 when absent)."""
    if c is None:
        return t.copy()
    c64 = _f64(c) * np.float64(beta)
    try:
        np.broadcast_shapes(c64.shape, s.shape)
    except ValueError as exc:
        raise FoldRefused(
            "shape_mismatch", f"Gemm C of shape {list(c64.shape)} does not broadcast to N={s.shape[0]}"
        ) from exc
    return c64 * s + t


def fold_gemm(
    b_weight: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    *,
    trans_b: bool,
    beta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (B', C') for Gemm, in float64; C' is to be used with beta = 1."""
    return fold_gemm_b(b_weight, s, trans_b=trans_b), fold_gemm_c(c, s, t, beta=beta)


def fold_matmul(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """MatMul weight [K, N] scaled along N (columns), float64."""
    w = _f64_copy(weight)
    if w.ndim != 2:
        raise FoldRefused("unsupported_layout", f"MatMul weight has rank {w.ndim}, expected 2")
    _check_channels(s, w.shape[1], "MatMul")
    w *= s[None, :]
    return w
