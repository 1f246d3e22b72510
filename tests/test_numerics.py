"""The fold formulas, property-tested against direct float64 computations.

Conv/ConvTranspose are checked through small numpy reference implementations of the ops at one
output (Conv) or one input (ConvTranspose) pixel: that is exactly where the channel layout (groups,
[Cout, Cin/g, k...] versus [Cin, Cout/g, k...]) matters. The references themselves are checked against
ONNX Runtime once. Gemm and MatMul are checked through the identity ``op(W') + b' = s · (op(W) + b) + t``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from helpers import model_from_text, round_exact, run_ort
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bnfold import numerics
from bnfold.numerics import FoldRefused

BF16 = np.dtype(ml_dtypes.bfloat16)
WEIGHT_DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)]

#: Modest and reproducible: the same examples on every run (and no example database written).
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------------ references
def conv_at_one_pixel(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """Conv whose kernel covers the whole input x [Cin, k...]: y[o] for W [Cout, Cin/g, k...]."""
    cout, cin_g = w.shape[:2]
    cout_g = cout // group
    y = np.empty(cout)
    for o in range(cout):
        gi = o // cout_g
        y[o] = np.sum(w[o] * x[gi * cin_g : (gi + 1) * cin_g])
    return y


def conv_transpose_of_one_pixel(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose of a one-pixel input x [Cin]: y[o, k...] for W [Cin, Cout/g, k...]."""
    cin, cout_g = w.shape[:2]
    cin_g = cin // group
    y = np.zeros((cout_g * group,) + w.shape[2:])
    for gi in range(group):
        for j in range(cout_g):
            for c in range(gi * cin_g, (gi + 1) * cin_g):
                y[gi * cout_g + j] += x[c] * w[c, j]
    return y


def bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    """A [C] vector shaped to scale axis 0 of an array with ``ndim`` dimensions."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


def assert_close64(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float64
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale)


# ------------------------------------------------------------------------------------ strategies
epsilons = st.sampled_from([0.0, 1e-12, 1e-5, 1e-3, 0.1])


@st.composite
def bn_affine(draw, channels: int):
    """(s, t) of a BN with γ of both signs and σ² ∈ [0.05, 4]."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    gamma = rng.uniform(0.2, 3.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta, mean = rng.normal(size=channels), rng.normal(size=channels) * 2
    var = rng.uniform(0.05, 4.0, channels)
    return numerics.bn_scale_shift(gamma, beta, mean, var, draw(epsilons))


def rng_from(draw) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


# ------------------------------------------------------------------------------------ bn_scale_shift
@PROPERTY
@given(st.integers(1, 8), epsilons, st.integers(0, 2**32 - 1))
def test_scale_shift_is_the_bn_definition(channels, eps, seed):
    rng = np.random.default_rng(seed)
    gamma = rng.normal(size=channels)
    beta, mean, var = (
        rng.normal(size=channels),
        rng.normal(size=channels),
        rng.uniform(0.05, 4, channels),
    )
    s, t = numerics.bn_scale_shift(gamma, beta, mean, var, eps)
    x = rng.normal(size=(5, channels)) * 3
    assert_close64(s * x + t, gamma * (x - mean) / np.sqrt(var + eps) + beta)


@PROPERTY
@given(
    st.sampled_from(["scale", "B", "mean", "var"]),
    st.sampled_from([np.nan, np.inf, -np.inf]),
    st.integers(1, 6),
    st.data(),
)
def test_scale_shift_refuses_non_finite_params(name, bad, channels, data):
    params = {
        "scale": np.ones(channels),
        "B": np.zeros(channels),
        "mean": np.zeros(channels),
        "var": np.ones(channels),
    }
    params[name][data.draw(st.integers(0, channels - 1))] = bad
    with pytest.raises(FoldRefused) as info:
        numerics.bn_scale_shift(params["scale"], params["B"], params["mean"], params["var"], 1e-5)
    assert info.value.reason == "invalid_params" and name in info.value.detail


@PROPERTY
@given(epsilons, st.floats(0.0, 10.0), st.integers(2, 6))
def test_scale_shift_refuses_var_plus_eps_not_positive(eps, below, channels):
    var = np.ones(channels)
    var[1] = -eps - below  # var + eps = -below ≤ 0
    with pytest.raises(FoldRefused) as info:
        numerics.bn_scale_shift(np.ones(channels), np.zeros(channels), np.zeros(channels), var, eps)
    assert info.value.reason == "invalid_params" and "channel 1" in info.value.detail


@pytest.mark.parametrize("eps", [math.nan, math.inf])
def test_scale_shift_refuses_non_finite_epsilon(eps):
    with pytest.raises(FoldRefused, match="epsilon") as info:
        numerics.bn_scale_shift(np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), eps)
    assert info.value.reason == "invalid_params"


def test_scale_shift_refuses_a_scale_beyond_float64():
    with pytest.raises(FoldRefused) as info:
        numerics.bn_scale_shift(
            np.array([1e300]), np.zeros(1), np.zeros(1), np.array([1e-300]), 0.0
        )
    assert info.value.reason == "overflow"


# ------------------------------------------------------------------------------------ per_channel
def test_per_channel():
    c = np.array([1.0, 2.0, 3.0])
    assert numerics.per_channel(c, 3, "scale").tolist() == [1.0, 2.0, 3.0]
    per_element = np.broadcast_to(c[:, None, None], (3, 4, 5))
    assert numerics.per_channel(per_element, 3, "scale").tolist() == [1.0, 2.0, 3.0]
    varying = per_element.copy()
    varying[1, 2, 3] = 7.0
    with pytest.raises(FoldRefused) as info:
        numerics.per_channel(varying, 3, "scale")
    assert info.value.reason == "per_element_stats"
    for wrong in (np.ones(4), np.ones((4, 2)), np.float64(1.0)):
        with pytest.raises(FoldRefused) as info:
            numerics.per_channel(wrong, 3, "scale")
        assert info.value.reason == "invalid_params"


# ------------------------------------------------------------------------------------ targets
@PROPERTY
@given(
    rank=st.integers(1, 3),
    group=st.integers(1, 3),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    dtype=st.sampled_from(WEIGHT_DTYPES),
    with_bias=st.booleans(),
    data=st.data(),
)
def test_fold_conv(rank, group, cin_g, cout_g, dtype, with_bias, data):
    rng = rng_from(data.draw)
    kernel = tuple(data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    cout = cout_g * group
    w = rng.normal(size=(cout, cin_g, *kernel)).astype(dtype)
    b = rng.normal(size=cout) if with_bias else None
    s, t = data.draw(bn_affine(cout))
    w_new, b_new = numerics.fold_conv(w, s), numerics.fold_bias(b, s, t)

    assert w_new.shape == w.shape
    x = rng.normal(size=(cin_g * group, *kernel))
    w64 = w.astype(np.float64)
    want = s * (conv_at_one_pixel(x, w64, group) + (0.0 if b is None else b)) + t
    assert_close64(conv_at_one_pixel(x, w_new, group) + b_new, want)


@PROPERTY
@given(
    rank=st.integers(1, 3),
    group=st.integers(1, 3),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    dtype=st.sampled_from(WEIGHT_DTYPES),
    with_bias=st.booleans(),
    data=st.data(),
)
def test_fold_conv_transpose(rank, group, cin_g, cout_g, dtype, with_bias, data):
    rng = rng_from(data.draw)
    kernel = tuple(data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    cout = cout_g * group
    w = rng.normal(size=(cin_g * group, cout_g, *kernel)).astype(dtype)
    b = rng.normal(size=cout) if with_bias else None
    s, t = data.draw(bn_affine(cout))
    w_new, b_new = numerics.fold_conv_transpose(w, s, group), numerics.fold_bias(b, s, t)

    assert w_new.shape == w.shape
    x = rng.normal(size=cin_g * group)
    y = conv_transpose_of_one_pixel(x, w.astype(np.float64), group)
    b64 = np.zeros(cout) if b is None else b
    want = bcast(s, y.ndim) * (y + bcast(b64, y.ndim)) + bcast(t, y.ndim)
    got = conv_transpose_of_one_pixel(x, w_new, group) + bcast(b_new, y.ndim)
    assert_close64(got, want)


@PROPERTY
@given(
    m=st.integers(1, 4),
    k=st.integers(1, 4),
    n=st.integers(1, 5),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.0, -1.5]),
    c_kind=st.sampled_from(["none", "scalar", "[N]", "[1,N]", "[M,N]", "[M,1]"]),
    dtype=st.sampled_from(WEIGHT_DTYPES),
    data=st.data(),
)
def test_fold_gemm(m, k, n, trans_a, trans_b, alpha, beta, c_kind, dtype, data):
    rng = rng_from(data.draw)
    a = rng.normal(size=(k, m) if trans_a else (m, k))
    bw = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    c_shape = {
        "none": None,
        "scalar": (),
        "[N]": (n,),
        "[1,N]": (1, n),
        "[M,N]": (m, n),
        "[M,1]": (m, 1),
    }[c_kind]
    c = None if c_shape is None else rng.normal(size=c_shape)
    s, t = data.draw(bn_affine(n))
    b_new, c_new = numerics.fold_gemm(bw, c, s, t, trans_b=trans_b, beta=beta)

    def gemm(b_mat, c_mat, beta_):
        a_ = a.T if trans_a else a
        b_ = b_mat.T if trans_b else b_mat
        return alpha * (a_ @ b_) + (0.0 if c_mat is None else beta_ * c_mat)

    assert b_new.shape == bw.shape
    assert_close64(gemm(b_new, c_new, 1.0), s * gemm(bw.astype(np.float64), c, beta) + t)


@PROPERTY
@given(
    m=st.integers(1, 4),
    k=st.integers(1, 4),
    n=st.integers(1, 5),
    bias=st.sampled_from([None, "[N]", "[1,N]"]),
    dtype=st.sampled_from(WEIGHT_DTYPES),
    data=st.data(),
)
def test_fold_matmul(m, k, n, bias, dtype, data):
    rng = rng_from(data.draw)
    x = rng.normal(size=(m, k))
    w = rng.normal(size=(k, n)).astype(dtype)
    b = None if bias is None else rng.normal(size=(n,) if bias == "[N]" else (1, n))
    s, t = data.draw(bn_affine(n))
    w_new, b_new = numerics.fold_matmul(w, s), numerics.fold_bias(b, s, t)

    assert w_new.shape == w.shape and b_new.shape == ((n,) if b is None else b.shape)
    assert_close64(
        x @ w_new + b_new, s * (x @ w.astype(np.float64) + (0.0 if b is None else b)) + t
    )


def test_fold_refuses_mismatched_shapes():
    s = np.ones(3)
    cases = [
        (lambda: numerics.fold_conv(np.ones((4, 2, 3)), s), "shape_mismatch"),
        (
            lambda: numerics.fold_conv_transpose(np.ones((4, 1, 3)), s, 2),
            "shape_mismatch",
        ),  # Cout = 2
        (lambda: numerics.fold_conv_transpose(np.ones((3, 1, 3)), s, 2), "shape_mismatch"),  # 3 % 2
        (
            lambda: numerics.fold_gemm(np.ones((2, 4)), None, s, s, trans_b=False, beta=1.0),
            "shape_mismatch",
        ),
        (
            lambda: numerics.fold_gemm(
                np.ones((2, 3)), np.ones((2, 2)), s, s, trans_b=False, beta=1.0
            ),
            "shape_mismatch",
        ),
        (
            lambda: numerics.fold_gemm(np.ones((2, 3, 1)), None, s, s, trans_b=False, beta=1.0),
            "shape_mismatch",
        ),
        (lambda: numerics.fold_matmul(np.ones((2, 4)), s), "shape_mismatch"),
        (lambda: numerics.fold_matmul(np.ones((1, 2, 3)), s), "unsupported_layout"),
    ]
    for call, reason in cases:
        with pytest.raises(FoldRefused) as info:
            call()
        assert info.value.reason == reason and info.value.detail


# The references above are only worth something if they are right: check them against ORT once.
@pytest.mark.parametrize("group, cin_g, cout_g", [(1, 2, 3), (2, 2, 3), (3, 1, 2)])
def test_references_agree_with_onnxruntime(group, cin_g, cout_g):
    rng = np.random.default_rng(0)
    cin, cout = cin_g * group, cout_g * group
    w_conv = rng.normal(size=(cout, cin_g, 2, 3)).astype(np.float32)
    w_convt = rng.normal(size=(cin, cout_g, 2, 3)).astype(np.float32)
    model = model_from_text(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,{cin},2,3] X, float[1,{cin},1,1] P) => (float[1,{cout},1,1] Y, float[1,{cout},2,3] Z) {{
            Y = Conv <group = {group}> (X, Wc)
            Z = ConvTranspose <group = {group}> (P, Wt)
        }}""",
        {"Wc": w_conv, "Wt": w_convt},
    )
    x = rng.normal(size=(1, cin, 2, 3)).astype(np.float32)
    p = rng.normal(size=(1, cin, 1, 1)).astype(np.float32)
    y, z = run_ort(model, {"X": x, "P": p})
    np.testing.assert_allclose(
        y[0, :, 0, 0],
        conv_at_one_pixel(x[0], w_conv.astype(np.float64), group),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        z[0],
        conv_transpose_of_one_pixel(p[0, :, 0, 0], w_convt.astype(np.float64), group),
        rtol=1e-5,
        atol=1e-5,
    )


# ------------------------------------------------------------------------------------ round_to
ROUND_DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32)]


@st.composite
def near_ties(draw, dtype):
    """float64 values at, or within a hair of, the midpoint of two neighbouring ``dtype`` values:
    where rounding twice (float64 → float32 → dtype) goes wrong. Subnormals included."""
    dtype = np.dtype(dtype)
    uint = {2: np.uint16, 4: np.uint32}[dtype.itemsize]
    max_bits = int(np.array(ml_dtypes.finfo(dtype).max, dtype).view(uint))
    bits = draw(st.integers(0, max_bits - 1))
    lo = float(np.array(bits, uint).view(dtype))
    hi = float(np.array(bits + 1, uint).view(dtype))
    mid = (lo + hi) / 2  # exact in float64
    nudge = (
        draw(st.sampled_from([0.0, 1.0, -1.0])) * abs(hi - lo) * 2.0 ** -draw(st.integers(20, 45))
    )
    return draw(st.sampled_from([1.0, -1.0])) * (mid + nudge)


@st.composite
def representable(draw, dtype):
    """float64 values within the finite range of ``dtype``: random, near ties, or tiny."""
    limit = float(ml_dtypes.finfo(dtype).max)
    return draw(
        st.one_of(
            st.floats(-limit, limit, allow_nan=False, allow_subnormal=True),
            near_ties(dtype),
            st.floats(-1e-36, 1e-36),
        )
    )


def _assert_correctly_rounded(x: np.ndarray, dtype: np.dtype) -> None:
    got = numerics.round_to(x, dtype, "w")
    assert got.dtype == dtype
    uint = {2: np.uint16, 4: np.uint32}[dtype.itemsize]
    np.testing.assert_array_equal(
        got.view(uint), round_exact(x, dtype).view(uint), err_msg=repr(x.tolist())
    )


@pytest.mark.parametrize("dtype", ROUND_DTYPES, ids=str)
@PROPERTY
@given(data=st.data())
def test_round_to_is_correctly_rounded(dtype, data):
    x = np.array(
        data.draw(st.lists(representable(dtype), min_size=1, max_size=8)), dtype=np.float64
    )
    assume(np.all(np.abs(x) <= float(ml_dtypes.finfo(dtype).max)))
    _assert_correctly_rounded(x, dtype)


def test_round_to_bfloat16_rounds_once():
    # Just above / below the midpoint of 1 and 1 + 2⁻⁷: via float32 both land on the tie and round
    # to 1 (even); the correctly rounded results differ.
    x = np.array([1.0 + 2.0**-8 + 2.0**-30, 1.0 + 2.0**-8 - 2.0**-30, -(1.0 + 2.0**-8 + 2.0**-30)])
    got = numerics.round_to(x, BF16, "w").astype(np.float64)
    assert got.tolist() == [1.0 + 2.0**-7, 1.0, -(1.0 + 2.0**-7)]
    _assert_correctly_rounded(x, BF16)


@pytest.mark.parametrize("dtype", ROUND_DTYPES, ids=str)
@PROPERTY
@given(
    factor=st.floats(1.0 + 2.0**-20, 1e6),
    sign=st.sampled_from([1.0, -1.0]),
    position=st.integers(0, 3),
)
def test_round_to_refuses_overflow(dtype, factor, sign, position):
    limit = float(ml_dtypes.finfo(dtype).max)
    x = np.array([0.5, -1.0, 2.0, 0.0])
    x[position] = sign * limit * factor
    with pytest.raises(FoldRefused) as info:
        numerics.round_to(x, dtype, "Conv weight")
    assert info.value.reason == "overflow" and "Conv weight" in info.value.detail


@pytest.mark.parametrize("dtype", ROUND_DTYPES, ids=str)
def test_round_to_keeps_the_largest_finite_value(dtype):
    limit = float(ml_dtypes.finfo(dtype).max)
    got = numerics.round_to(np.array([limit, -limit]), dtype, "w")
    assert got.astype(np.float64).tolist() == [limit, -limit]


def test_round_to_float64_is_the_identity():
    x = np.array([1e308, -1e-320, 0.1])
    assert numerics.round_to(x, np.float64, "w") is x
