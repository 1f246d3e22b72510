"""The forward-fold and decomposed-BN formulas, property-tested against direct float64 computations.

The identity behind every forward fold: ``L_W'(x) + b' (+ correction) == L_W(s·x + t) + b`` for the
linear node L, checked with a direct N-D convolution in numpy (padding, strides, dilations, groups).
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import numerics

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def conv_nd(x: np.ndarray, w: np.ndarray, group: int, pads, strides, dilations) -> np.ndarray:
    """Direct Conv of x [C, d...] with W [Cout, C/g, k...], zero padding, float64."""
    n = x.ndim - 1
    padded = np.pad(x, [(0, 0)] + [(pads[d], pads[n + d]) for d in range(n)])
    kernel = w.shape[2:]
    out_shape = [
        (padded.shape[1 + d] - ((kernel[d] - 1) * dilations[d] + 1)) // strides[d] + 1
        for d in range(n)
    ]
    cout, cin_g = w.shape[:2]
    cout_g = cout // group
    y = np.zeros([cout] + out_shape)
    for o in range(cout):
        gi = o // cout_g
        xs = padded[gi * cin_g : (gi + 1) * cin_g]
        for pos in itertools.product(*(range(s) for s in out_shape)):
            acc = 0.0
            for k in itertools.product(*(range(s) for s in kernel)):
                idx = tuple(pos[d] * strides[d] + k[d] * dilations[d] for d in range(n))
                acc += float(np.dot(w[(o, slice(None)) + k], xs[(slice(None),) + idx]))
            y[(o,) + pos] = acc
    return y


@st.composite
def conv_cases(draw):
    n = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2]))
    cin = group * draw(st.integers(1, 2))
    cout = group * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    dilations = [draw(st.integers(1, 2)) for _ in range(n)]
    # At least the dilated kernel's extent, so the Conv output is never empty (an empty output is
    # refused by the fold, correctly, and is not the identity under test).
    spatial = [
        draw(st.integers((k - 1) * dil + 1, 7)) for k, dil in zip(kernel, dilations, strict=True)
    ]
    pads = [draw(st.integers(0, kernel[d % n] - 1)) for d in range(2 * n)]
    strides = [draw(st.integers(1, 2)) for _ in range(n)]
    seed = draw(st.integers(0, 2**16))
    return n, group, cin, cout, kernel, spatial, pads, strides, dilations, seed


@PROPERTY
@given(conv_cases())
def test_conv_forward_fold_identity(case):
    n, group, cin, cout, kernel, spatial, pads, strides, dilations, seed = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal([cout, cin // group] + kernel)
    x = rng.standard_normal([cin] + spatial)
    s, t = rng.uniform(-2, 2, cin), rng.standard_normal(cin)
    shape = (-1,) + (1,) * n
    want = conv_nd(s.reshape(shape) * x + t.reshape(shape), w, group, pads, strides, dilations)

    w2 = numerics.fold_conv_input(w, s, group)
    delta = numerics.conv_input_shift(w, t, group)
    kmap = numerics.conv_shift_map(w, t, group, tuple(spatial), pads, strides, dilations)
    got = conv_nd(x, w2, group, pads, strides, dilations) + kmap
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    if not any(pads):
        np.testing.assert_allclose(
            kmap, np.broadcast_to(delta.reshape(shape), kmap.shape), rtol=1e-12, atol=1e-12
        )
    # The interior (where the whole kernel lies inside the input) is exactly δ.
    inner = conv_nd(
        np.ones([cin] + spatial) * t.reshape(shape), w, group, [0] * 2 * n, [1] * n, [1] * n
    )
    if inner.size:
        np.testing.assert_allclose(
            inner, np.broadcast_to(delta.reshape(shape), inner.shape), rtol=1e-10, atol=1e-10
        )


def test_conv_pads_same():
    # in 7, kernel 3, stride 2: out 4, total pad 2 → (1, 1); in 6: out 3, total 1 → upper (0, 1), lower (1, 0)
    assert numerics.conv_pads("SAME_UPPER", None, (7,), (3,), [2], [1]) == [1, 1]
    assert numerics.conv_pads("SAME_UPPER", None, (6,), (3,), [2], [1]) == [0, 1]
    assert numerics.conv_pads("SAME_LOWER", None, (6,), (3,), [2], [1]) == [1, 0]
    assert numerics.conv_pads("SAME_UPPER", None, None, (3,), [2], [1]) is None
    assert numerics.conv_pads("VALID", [1, 1], None, (3,), [1], [1]) == [0, 0]
    assert numerics.conv_pads("NOTSET", [], None, (3, 3), [1, 1], [1, 1]) == [0, 0, 0, 0]


@PROPERTY
@given(
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.booleans(), st.integers(0, 2**16)
)
def test_gemm_forward_fold_identity(c, block, n, trans_b, seed):
    rng = np.random.default_rng(seed)
    k = c * block
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    x = rng.standard_normal((3, c, block))
    s, t = rng.uniform(-2, 2, c), rng.standard_normal(c)
    bk = b.T if trans_b else b
    want = (s[None, :, None] * x + t[None, :, None]).reshape(3, k) @ bk
    sk, tk = numerics.repeat_blocks(s, block), numerics.repeat_blocks(t, block)
    b2 = numerics.fold_gemm_input(b, sk, trans_b=trans_b)
    got = x.reshape(3, k) @ (b2.T if trans_b else b2) + numerics.gemm_input_shift(
        b, tk, trans_b=trans_b
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@PROPERTY
@given(
    st.lists(st.sampled_from(["Mul", "Add", "Sub", "Sub_first", "Div"]), min_size=1, max_size=5),
    st.integers(0, 2**16),
)
def test_affine_steps_compose(ops, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(4)
    s, t = np.ones(4), np.zeros(4)
    y = x.copy()
    for op in ops:
        c = rng.uniform(0.5, 2.0, 4) * rng.choice([-1, 1], 4)
        first = op == "Sub_first"
        name = "Sub" if first else op
        s, t = numerics.affine_step(s, t, name, c, const_first=first)
        y = {"Mul": y * c, "Add": y + c, "Sub": y - c, "Sub_first": c - y, "Div": y / c}[op]
    np.testing.assert_allclose(s * x + t, y, rtol=1e-12, atol=1e-12)
