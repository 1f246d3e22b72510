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

Forward folds (the BN folds into the node that *consumes* its output)
--------------------------------------------------------------------
A linear node ``z = L_W(y) + b`` applied to ``y = s · x + t`` (per input channel) is
``L_W(s · x) + L_W(t) + b``: the scale goes into the weight along its *input*-channel axis, and the
shift becomes the constant ``L_W(T)`` (T: the input-shaped tensor whose channel c is t[c]).

Conv            W is [Cout, Cin/g, k...]; input channel ``c = gi · (Cin/g) + j`` of group ``gi`` meets
                W[gi·(Cout/g) : (gi+1)·(Cout/g), j]. So view W as [g, Cout/g, Cin/g, k...] and scale
                axis 2 by s reshaped to [g, 1, Cin/g, 1...]. Without padding (all pads 0, auto_pad
                NOTSET/VALID) every output position sees the whole kernel, so L_W(T) is the per-channel
                constant  δ[o] = Σ_{j,k} W[o, j, k] · t[g(o)·Cin/g + j]  and  b' = b + δ.
                With padding the zeros that Conv pads with are not shifted: at the border L_W(T) sums
                only the kernel taps that land inside the input. With static spatial sizes this is
                computed exactly per output position, ``K[o, p] = Σ_k A[o, k] · Π_d m_d[k_d, p_d]``
                with ``A[o, k] = Σ_j W[o, j, k] · t[g(o)·Cin/g + j]`` and ``m_d[k, p] = 1`` where
                ``p · stride + k · dilation − pad_begin`` lies inside the input. The pass then folds the
                interior value δ into the bias and adds the border correction ``K − δ`` (zero inside)
                with one ``Add``; when t = 0 there is nothing to correct.
Gemm / MatMul   y is [M, K] (or [N, C, d...] flattened to K = C · D features, channel c covering the
                contiguous block c·D … (c+1)·D − 1; s and t are repeated D times). With B' = B (or Bᵀ
                when transB) of shape [K, N]:  α · (s ⊙ x + t) · B' + β · C
                = α · x · (diag(s) · B') + (α · t · B' + β · C). So row k of B' scales by s[k] (B[k, :]
                when transB = 0, B[:, k] when transB = 1) and C' = β · C + α · t · B' with β' = 1.
                MatMul is the same with α = 1 and the bias in a following ``Add`` (created if absent).
                transA = 1 puts the BN channel on Gemm's M axis: not foldable.

Ops a forward fold may pass through (per channel, between the BN and the linear node):

* ``MaxPool`` / ``GlobalMaxPool``: max(s · x + t) = s · max(x) + t only when s > 0 (a negative scale
  turns the max into a min); their padding is −∞, which the affine map keeps at −∞.
* ``AveragePool`` / ``GlobalAveragePool``: an average is affine-equivariant (weights sum to 1) when it
  averages only real elements: no padding, or ``count_include_pad = 0``.
* ``Identity``, inference ``Dropout``: the identity.
* ``Flatten`` (axis 1) and a ``Reshape`` to [N, C·D]: they only rename positions (see above).

Relu, LeakyRelu and other non-linear activations do not commute with an affine map (Relu(s·x+t) is
not s·Relu(x)+t), so a forward fold never passes through them.

Decomposed BNs
--------------
Exporters sometimes lower a BN to ``Mul``/``Add``/``Sub``/``Div`` with constants. Each is a per-channel
affine map when its constant broadcasts along the channel axis only (shape [C, 1, …, 1] or a scalar,
right-aligned to the producer's output rank; a [C] constant on an NCHW tensor broadcasts along W and
is *not* per-channel). They compose in float64:  Mul(c): (s·c, t·c);  Add(c): (s, t + c);
Sub(y, c): (s, t − c);  Sub(c, y): (−s, c − t);  Div(y, c): (s / c, t / c). Div(c, y) is not affine.
The composed (s, t) then folds backward like a BN.

A fold is refused (:class:`~bnfold.reasons.Refusal` with a ``SkipReason``, turned into a kept BN with that reason by the pass) when a BN
parameter is NaN/Inf, when σ² + ε ≤ 0, or when a folded value would overflow the target dtype.
"""

from __future__ import annotations

__all__ = [
    "FoldRefused",
    "Refusal",
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
    "fold_conv_input",
    "conv_input_shift",
    "conv_pads",
    "conv_shift_map",
    "fold_gemm_input",
    "gemm_input_shift",
    "repeat_blocks",
    "mean_to_spread",
    "HALF_PRECISION_MEAN_LIMIT",
    "affine_step",
]

import ml_dtypes
import numpy as np

from .reasons import Refusal, SkipReason

#: The former name of :class:`~bnfold.reasons.Refusal`, kept for callers that import it.
FoldRefused = Refusal


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
        raise Refusal(
            SkipReason.INVALID_PARAMS, f"{name} has shape {list(p.shape)}, expected [{channels}]"
        )
    flat = p.reshape(channels, -1)
    if not np.array_equal(flat, np.broadcast_to(flat[:, :1], flat.shape), equal_nan=True):
        raise Refusal(
            SkipReason.PER_ELEMENT_STATS,
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

    Raises Refusal when a parameter is not finite or σ² + ε ≤ 0.
    """
    g, b, m, v = (_f64(x) for x in (scale, bias, mean, var))
    for name, arr in (("scale", g), ("B", b), ("mean", m), ("var", v)):
        if not np.all(np.isfinite(arr)):
            raise Refusal(SkipReason.INVALID_PARAMS, f"BN {name} contains NaN or Inf")
    if not np.isfinite(epsilon):
        raise Refusal(SkipReason.INVALID_PARAMS, f"epsilon is {epsilon}")
    denom = v + np.float64(epsilon)
    if np.any(denom <= 0):
        bad = int(np.argmin(denom))
        raise Refusal(
            SkipReason.INVALID_PARAMS, f"var + epsilon = {denom[bad]:.3g} ≤ 0 at channel {bad}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite s or t is refused below
        s = g / np.sqrt(denom)
        t = b - m * s
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        raise Refusal(SkipReason.OVERFLOW, "BN scale/shift is not finite in float64")
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
        raise Refusal(
            SkipReason.OVERFLOW,
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
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
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
        raise Refusal(
            SkipReason.SHAPE_MISMATCH, f"weight shape {list(w.shape)} does not fit group={group}"
        )
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
        raise Refusal(SkipReason.SHAPE_MISMATCH, f"Gemm B has rank {bw.ndim}, expected 2")
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
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"Gemm C of shape {list(c64.shape)} does not broadcast to N={s.shape[0]}",
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
        raise Refusal(SkipReason.UNSUPPORTED_LAYOUT, f"MatMul weight has rank {w.ndim}, expected 2")
    _check_channels(s, w.shape[1], "MatMul")
    w *= s[None, :]
    return w


# ------------------------------------------------------------------------------ forward folds
def _conv_groups(w: np.ndarray, group: int, channels: int) -> tuple[int, int]:
    """(Cout/g, Cin/g) of a Conv weight [Cout, Cin/g, k...] whose input has ``channels`` channels."""
    cout, cin_g = w.shape[:2]
    if group < 1 or cout % group:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH, f"Conv weight {list(w.shape)} does not fit group={group}"
        )
    if cin_g * group != channels:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH,
            f"BN has {channels} channels but the Conv reads {cin_g * group}",
        )
    return cout // group, cin_g


def fold_conv_input(weight: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """Conv weight [Cout, Cin/g, k...] scaled along its input channels (per group), float64."""
    w = _f64_copy(weight)
    cout_g, cin_g = _conv_groups(w, group, s.shape[0])
    spatial = w.shape[2:]
    view = w.reshape((group, cout_g, cin_g) + spatial)
    view *= s.reshape((group, 1, cin_g) + (1,) * len(spatial))
    return w


def _tap_sums(weight: np.ndarray, t: np.ndarray, group: int) -> np.ndarray:
    """A[o, k...] = Σ_j W[o, j, k] · t[g(o)·Cin/g + j], float64."""
    w = _f64(weight)
    cout_g, cin_g = _conv_groups(w, group, t.shape[0])
    spatial = w.shape[2:]
    w5 = w.reshape((group, cout_g, cin_g) + spatial)
    a = np.einsum("goj...,gj->go...", w5, t.reshape(group, cin_g))
    return a.reshape((group * cout_g,) + spatial)


def conv_input_shift(weight: np.ndarray, t: np.ndarray, group: int) -> np.ndarray:
    """δ[o] = Σ_{j,k} W[o, j, k] · t[g(o)·Cin/g + j]: what a per-channel input shift adds to every
    output position of an unpadded Conv, float64."""
    a = _tap_sums(weight, t, group)
    return a.reshape(a.shape[0], -1).sum(axis=1)


def conv_pads(
    auto_pad: str,
    pads: list[int] | None,
    in_spatial: tuple[int, ...] | None,
    kernel: tuple[int, ...],
    strides: list[int],
    dilations: list[int],
) -> list[int] | None:
    """The Conv's explicit pads [begin..., end...]; None when they depend on an unknown input size."""
    n = len(kernel)
    if auto_pad in ("", "NOTSET"):
        return list(pads) if pads else [0] * (2 * n)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if in_spatial is None:
        return None
    begin, end = [], []
    for d in range(n):
        out = -(-in_spatial[d] // strides[d])
        total = max((out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - in_spatial[d], 0)
        small = total // 2
        big = total - small
        if auto_pad == "SAME_LOWER":
            begin.append(big)
            end.append(small)
        else:  # SAME_UPPER: the extra pad goes at the end
            begin.append(small)
            end.append(big)
    return begin + end


def conv_shift_map(
    weight: np.ndarray,
    t: np.ndarray,
    group: int,
    in_spatial: tuple[int, ...],
    pads: list[int],
    strides: list[int],
    dilations: list[int],
) -> np.ndarray:
    """K[o, p...]: the output of Conv_W (no bias) on the zero-padded input whose channel c is t[c]
    everywhere inside, float64, shape [Cout, *output spatial]."""
    result = _tap_sums(weight, t, group)
    kernel = weight.shape[2:]
    n = len(kernel)
    for d in range(n):
        k, size, stride, dil = kernel[d], in_spatial[d], strides[d], dilations[d]
        begin, end = pads[d], pads[n + d]
        out = (size + begin + end - ((k - 1) * dil + 1)) // stride + 1
        if out < 1:
            raise Refusal(
                SkipReason.SHAPE_MISMATCH, f"Conv output would be empty along spatial axis {d}"
            )
        pos = np.arange(out)[None, :] * stride + np.arange(k)[:, None] * dil - begin
        mask = ((pos >= 0) & (pos < size)).astype(np.float64)  # [k, out]
        result = np.tensordot(result, mask, axes=([1], [0]))  # kernel axis d out, output axis d in
    return result


def fold_gemm_input(b_weight: np.ndarray, s: np.ndarray, *, trans_b: bool) -> np.ndarray:
    """Gemm B (or a MatMul weight, trans_b=False) scaled along K, float64: rows of B [K, N], or
    columns of B [N, K] when transB."""
    bw = _f64_copy(b_weight)
    if bw.ndim != 2:
        raise Refusal(SkipReason.SHAPE_MISMATCH, f"weight has rank {bw.ndim}, expected 2")
    k = bw.shape[1] if trans_b else bw.shape[0]
    if k != s.shape[0]:
        raise Refusal(
            SkipReason.SHAPE_MISMATCH, f"BN covers {s.shape[0]} features, the weight reads K={k}"
        )
    bw *= s[None, :] if trans_b else s[:, None]
    return bw


def gemm_input_shift(b_weight: np.ndarray, t: np.ndarray, *, trans_b: bool) -> np.ndarray:
    """t · B' in float64 (B' = Bᵀ when transB): what a per-feature input shift adds to each output."""
    bw = _f64(b_weight)
    return bw @ t if trans_b else t @ bw


def repeat_blocks(v: np.ndarray, block: int) -> np.ndarray:
    """Per-channel [C] to per-feature [C · block] for an NC… tensor flattened row-major."""
    return np.repeat(v, block)


def affine_step(
    s: np.ndarray, t: np.ndarray, op: str, c: np.ndarray, *, const_first: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Compose y = s·x + t with one elementwise op against the per-channel constant ``c`` (float64)."""
    c = _f64(c)
    if op == "Mul":
        return s * c, t * c
    if op == "Add":
        return s.copy(), t + c
    if op == "Sub":
        return (-s, c - t) if const_first else (s.copy(), t - c)
    if op == "Div" and not const_first:
        with np.errstate(divide="ignore", invalid="ignore"):
            s2, t2 = s / c, t / c
        if not (np.all(np.isfinite(s2)) and np.all(np.isfinite(t2))):
            raise Refusal(SkipReason.INVALID_PARAMS, "division by a zero or non-finite constant")
        return s2, t2
    raise Refusal(SkipReason.UNSUPPORTED_PRODUCER, f"{op} with the constant first is not affine")


# A float16/bfloat16 BN whose |mean|/std exceeds this is kept: folding it moves the cancellation
# x − μ into rounded weights and biases, losing about log2(|μ|/σ) of the format's 8 or 11 bits.
HALF_PRECISION_MEAN_LIMIT = 16.0


def mean_to_spread(mean: np.ndarray, var: np.ndarray, epsilon: float) -> np.ndarray:
    """Per channel |μ| / √(σ² + ε), in float64 (inf where σ² + ε ≤ 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.sqrt(np.maximum(_f64(var) + np.float64(epsilon), 0.0))
        return np.where(spread > 0, np.abs(_f64(mean)) / spread, np.inf)
