"""Lowered BatchNorms anywhere, and the channel axis through layout nodes (issue 13, Keras half).

Each graph below is a small, hand-written copy of what a Keras/TensorFlow exporter writes (see
tests/data/keras for the real files): a BN lowered to ``Mul``+``Add`` or ``Sub``→``Mul``→``Add``
after an activation, in NCHW or NHWC layout, with ``Transpose`` nodes, no-op ``Cast``s and computed
flatten shapes. Every fold is checked three ways (structure, ONNX Runtime at ORT_DISABLE_ALL,
``onnx.checker``) by :func:`foldchecks.assert_folded`; the lowered BN is reported as a BatchNorm
(``source="lowered"``, counted in ``totals``).
"""

from __future__ import annotations

import numpy as np
import pytest
from foldchecks import assert_folded, fold_checked, ops
from helpers import model_from_text, randn

from bnfold.reasons import SkipReason

H17 = '<ir_version: 8, opset_import: ["" : 17]>'


def scale(c: int, seed: int, shape, *, positive: bool = True) -> np.ndarray:
    v = np.random.default_rng(seed).uniform(0.5, 2.0, c)
    if not positive:
        v[0] = -v[0]
    return v.astype(np.float32).reshape(shape)


def shift(c: int, seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, c).astype(np.float32).reshape(shape)


def lowered(result) -> list:
    return [d for d in result.decisions if d.source == "lowered"]


# ============================================================== NCHW: Relu → Mul/Add → MaxPool → Conv
@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 1, 1, 1]], ids=["valid", "same"])
def test_relu_mul_add_maxpool_conv_folds_forward(pads):
    model = model_from_text(
        f"""{H17}
        g (float[2,3,10,10] X) => (float[2,5,{4 - 2 + 2 * pads[0]},{4 - 2 + 2 * pads[0]}] Y) {{
            c1 = Conv (X, W1, b1)
            r = Relu (c1)
            m = Mul (r, s)
            a = Add (m, t)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
            Y = Conv <pads = {pads}, kernel_shape = [3, 3]> (p, W2, b2)
        }}""",
        {
            "W1": randn(4, 3, 3, 3, seed=1),
            "b1": randn(4, seed=2),
            "s": scale(4, 3, (1, 4, 1, 1)),
            "t": shift(4, 4, (1, 4, 1, 1)),
            "W2": randn(5, 4, 3, 3, seed=5),
            "b2": randn(5, seed=6),
        },
    )
    model.graph.node[2].name = "bn1/batchnorm/mul_1"  # TF's names (the text syntax has no "/")
    model.graph.node[3].name = "bn1/batchnorm/add_1"

    # A border correction (padded Conv) is a fold kept for cost by default (issue 17); forced here.
    result = assert_folded(model, "forward", allow_slower_folds=bool(pads[0]))

    (d,) = result.decisions
    assert d.source == "lowered" and d.kind == "batchnorm" and d.target_op == "Conv"
    assert d.name == "bn1/batchnorm/mul_1 + bn1/batchnorm/add_1"
    assert "Mul" not in ops(result.model) and "MaxPool" in ops(result.model)
    border = "border correction" in d.detail
    assert border == bool(pads[0]), d.detail
    assert ops(result.model).count("Add") == (1 if pads[0] else 0)
    report = result.report.to_dict()
    assert report["totals"] == {"batchnorms": 1, "folded": 1, "kept": 0}


def test_negative_scale_through_maxpool_is_kept_with_its_reason():
    model = model_from_text(
        f"""{H17}
        g (float[2,3,10,10] X) => (float[2,5,2,2] Y) {{
            c1 = Conv (X, W1, b1)
            r = Relu (c1)
            m = Mul (r, s)
            a = Add (m, t)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
            Y = Conv (p, W2, b2)
        }}""",
        {
            "W1": randn(4, 3, 3, 3, seed=1),
            "b1": randn(4, seed=2),
            "s": scale(4, 3, (1, 4, 1, 1), positive=False),
            "t": shift(4, 4, (1, 4, 1, 1)),
            "W2": randn(5, 4, 3, 3, seed=5),
            "b2": randn(5, seed=6),
        },
    )

    result = fold_checked(model)

    (d,) = result.decisions
    assert not d.folded and d.source == "lowered" and d.kind == "batchnorm"
    assert d.reason == SkipReason.NON_POSITIVE_SCALE, d.detail
    assert ops(result.model) == ops(model)
    assert result.report.to_dict()["totals"] == {"batchnorms": 1, "folded": 0, "kept": 1}


# ============================================================== Sub → Mul → Add (Keras 3, torch backend)
def test_sub_mul_add_after_relu_folds_forward_into_matmul_and_its_bias():
    model = model_from_text(
        f"""{H17}
        g (float[3,6] X) => (float[3,5] Y) {{
            h = MatMul (X, W1)
            hb = Add (h, b1)
            r = Relu (hb)
            c = Sub (r, mean)
            m = Mul (c, s)
            a = Add (m, beta)
            y0 = MatMul (a, W2)
            Y = Add (y0, b2)
        }}""",
        {
            "W1": randn(6, 4, seed=1),
            "b1": randn(4, seed=2),
            "mean": shift(4, 3, (1, 4)),
            "s": scale(4, 4, (1, 4)),
            "beta": shift(4, 5, (1, 4)),
            "W2": randn(4, 5, seed=6),
            "b2": randn(5, seed=7),
        },
    )

    result = assert_folded(model, "forward")

    assert ops(result.model) == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    (d,) = result.decisions
    assert (
        d.name == "<Sub → c> + <Mul → m> + <Add → a>" and "following Add bias updated" in d.detail
    )


def test_scalar_mul_add_is_not_a_batchnorm():
    # x · 0.5 + 0.5 after an activation (a hard sigmoid's arithmetic): no per-channel structure
    model = model_from_text(
        f"""{H17}
        g (float[3,6] X) => (float[3,4] Y) {{
            r = Relu (X)
            m = Mul (r, half)
            a = Add (m, half)
            Y = MatMul (a, W)
        }}""",
        {"half": np.array([0.5], np.float32), "W": randn(6, 4, seed=1)},
    )

    result = fold_checked(model)

    assert result.decisions == [] and ops(result.model) == ops(model)


def test_layer_scale_mul_after_conv_is_an_affine_not_a_batchnorm():
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W, b)
            Y = Mul (c, gamma)
        }}""",
        {"W": randn(4, 3, 3, 3, seed=1), "b": randn(4, seed=2), "gamma": scale(4, 3, (4, 1, 1))},
    )

    result = fold_checked(model)

    (d,) = result.decisions
    assert d.folded and d.kind == "affine" and d.target_op == "Conv"
    report = result.report.to_dict()
    assert report["totals"] == {"batchnorms": 0, "folded": 0, "kept": 0}
    assert report["batchnorms"] == [] and [a["kind"] for a in report["affines"]] == ["affine"]


# ============================================================== NHWC with Transposes
NHWC_CONV_BN = f"""{H17}
g (float[2,6,6,3] X) => (float[2,6,6,4] Y) {{
    xt = Transpose <perm = [0, 3, 1, 2]> (X)
    c = Conv <pads = [1, 1, 1, 1]> (xt, W)
    ct = Transpose <perm = [0, 2, 3, 1]> (c)
    {{cast1}}
    cb = Add (cc, bias)
    {{cast2}}
    d = Sub (cd, mean)
    m = Mul (d, s)
    Y = Add (m, beta)
}}"""


@pytest.mark.parametrize("casts", [False, True], ids=["plain", "no-op-casts"])
def test_nhwc_conv_bias_sub_mul_add_folds_backward_through_transpose(casts):
    text = NHWC_CONV_BN.replace(
        "{cast1}", "cc = Cast <to = 1> (ct)" if casts else "cc = Identity (ct)"
    ).replace("{cast2}", "cd = Cast <to = 1> (cb)" if casts else "cd = Identity (cb)")
    model = model_from_text(
        text,
        {
            "W": randn(4, 3, 3, 3, seed=1),
            "bias": shift(4, 2, (1, 1, 1, 4)),
            "mean": shift(4, 3, (1, 1, 1, 4)),
            "s": scale(4, 4, (1, 1, 1, 4)),
            "beta": shift(4, 5, (1, 1, 1, 4)),
        },
    )

    result = assert_folded(model, "backward")

    (d,) = result.decisions
    assert d.target_op == "Conv" and d.source == "lowered"
    # the Keras bias Add is absorbed: walked through (Identity), or part of the chain (Cast)
    assert ("bias Add absorbed" in d.detail) == (not casts), d.detail
    assert ops(result.model)[:3] == ["Transpose", "Conv", "Transpose"]
    assert not {"Sub", "Mul", "Add"} & set(ops(result.model)), ops(result.model)
    assert "channel axis 3 of 4" in d.detail


def test_rounding_cast_is_not_passed():
    # a Cast to float16 rounds: it is not a no-op, so the chain stops there and nothing folds
    text = NHWC_CONV_BN.replace("{cast1}", "cc = Identity (ct)").replace(
        "{cast2}", "h = Cast <to = 10> (cb)\n cd = Cast <to = 1> (h)"
    )
    model = model_from_text(
        text,
        {
            "W": randn(4, 3, 3, 3, seed=1),
            "bias": shift(4, 2, (1, 1, 1, 4)),
            "mean": shift(4, 3, (1, 1, 1, 4)),
            "s": scale(4, 4, (1, 1, 1, 4)),
            "beta": shift(4, 5, (1, 1, 1, 4)),
        },
    )

    result = fold_checked(model)

    (d,) = result.decisions
    assert not d.folded and d.reason == SkipReason.UNSUPPORTED_PRODUCER, d.detail
    assert "Cast" in d.detail and ops(result.model) == ops(model)


def test_a_lowered_bn_whose_fold_needs_a_border_correction_is_kept_for_cost():
    """The cost rule (issue 17) applies to lowered BNs as to BatchNormalization nodes."""
    model = model_from_text(
        f"""{H17}
        g (float[2,3,10,10] X) => (float[2,5,4,4] Y) {{
            c1 = Conv (X, W1, b1)
            r = Relu (c1)
            m = Mul (r, s)
            a = Add (m, t)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
            Y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (p, W2, b2)
        }}""",
        {
            "W1": randn(4, 3, 3, 3, seed=1),
            "b1": randn(4, seed=2),
            "s": scale(4, 3, (1, 4, 1, 1)),
            "t": shift(4, 4, (1, 4, 1, 1)),
            "W2": randn(5, 4, 3, 3, seed=5),
            "b2": randn(5, seed=6),
        },
    )
    model.graph.node[2].name = "bn1/batchnorm/mul_1"
    model.graph.node[3].name = "bn1/batchnorm/add_1"
    result = fold_checked(model)
    (d,) = result.decisions
    assert not d.folded and d.reason == SkipReason.SLOWER_FOLD, d.detail
    assert "border-correction Add" in d.detail and ops(result.model) == ops(model)


def test_nhwc_bn_folds_forward_through_transpose_and_maxpool_into_conv():
    model = model_from_text(
        f"""{H17}
        g (float[2,8,8,4] X) => (float[2,5,4,4] Y) {{
            r = Relu (X)
            d = Sub (r, mean)
            m = Mul (d, s)
            a = Add (m, beta)
            at = Transpose <perm = [0, 3, 1, 2]> (a)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (at)
            Y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (p, W)
        }}""",
        {
            "mean": shift(4, 3, (1, 1, 1, 4)),
            "s": scale(4, 4, (1, 1, 1, 4)),
            "beta": shift(4, 5, (1, 1, 1, 4)),
            "W": randn(5, 4, 3, 3, seed=6),
        },
    )

    result = assert_folded(model, "forward", allow_slower_folds=True)

    (d,) = result.decisions
    assert d.target_op == "Conv" and "bias created" in d.detail and "border correction" in d.detail
    assert ops(result.model) == ["Relu", "Transpose", "MaxPool", "Conv", "Add"]


# ============================================================== Keras flatten order: Transpose → Reshape → MatMul
SHAPES = {
    "constant": "shp = Constant <value = int64[2] {-1, 72}> ()",
    # Keras 3 torch backend: [N, -1] from the input's own batch dim
    "computed": (
        "sh = Shape (pt)\n i0 = Constant <value = int64 {0}> ()\n n = Gather (sh, i0)\n"
        " ax = Constant <value = int64[1] {0}> ()\n nu = Unsqueeze (n, ax)\n"
        " m1 = Constant <value = int64[1] {-1}> ()\n shp = Concat <axis = 0> (nu, m1)"
    ),
    # tf2onnx/Keras 3: Shape → Gather(perm) → Cast(int32) → Slice → Concat(·, [K]) → Cast(int64)
    "tf_computed": (
        "sh = Shape (p)\n perm = Constant <value = int64[4] {0, 2, 3, 1}> ()\n"
        " g = Gather (sh, perm)\n g32 = Cast <to = 6> (g)\n"
        " z = Constant <value = int32[1] {0}> ()\n o = Constant <value = int32[1] {1}> ()\n"
        " n = Slice (g32, z, o, z)\n k = Constant <value = int32[1] {72}> ()\n"
        " s32 = Concat <axis = 0> (n, k)\n shp = Cast <to = 7> (s32)"
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_flatten_in_hwc_order_folds_forward_into_matmul_rows(shape):
    model = model_from_text(
        f"""{H17}
        g (float[N,8,6,6] X) => (float[N,5] Y) {{
            r = Relu (X)
            m = Mul (r, s)
            a = Add (m, t)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
            pt = Transpose <perm = [0, 2, 3, 1]> (p)
            {SHAPES[shape]}
            f = Reshape (pt, shp)
            y0 = MatMul (f, W)
            Y = Add (y0, b)
        }}""",
        {
            "s": scale(8, 3, (1, 8, 1, 1)),
            "t": shift(8, 4, (1, 8, 1, 1)),
            "W": randn(72, 5, seed=5),
            "b": randn(5, seed=6),
        },
    )

    result = assert_folded(model, "forward")

    (d,) = result.decisions
    assert d.target_op == "MatMul" and "interleaved" in d.detail, d.detail
    assert "Mul" not in ops(result.model)


def test_flatten_in_chw_order_would_be_wrong_with_the_hwc_vector():
    # the same graph without the Transpose flattens C, H, W: blocks, not interleaved channels
    model = model_from_text(
        f"""{H17}
        g (float[2,8,6,6] X) => (float[2,5] Y) {{
            r = Relu (X)
            m = Mul (r, s)
            a = Add (m, t)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
            shp = Constant <value = int64[2] {{-1, 72}}> ()
            f = Reshape (p, shp)
            Y = MatMul (f, W)
        }}""",
        {"s": scale(8, 3, (1, 8, 1, 1)), "t": shift(8, 4, (1, 8, 1, 1)), "W": randn(72, 5, seed=5)},
    )

    result = assert_folded(model, "forward")

    (d,) = result.decisions
    assert "blocks of 9" in d.detail, d.detail


# ============================================================== BatchNormalization nodes through layout
def test_batchnorm_node_after_nhwc_transpose_and_cast_folds_backward():
    # Conv (NCHW) → Transpose to NHWC → Cast → Transpose back → BatchNormalization (axis 1)
    model = model_from_text(
        f"""{H17}
        g (float[2,3,6,6] X) => (float[2,4,6,6] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            t1 = Transpose <perm = [0, 2, 3, 1]> (c)
            k = Cast <to = 1> (t1)
            t2 = Transpose <perm = [0, 3, 1, 2]> (k)
            Y = BatchNormalization <epsilon = 0.001> (t2, gamma, beta, mean, var)
        }}""",
        {
            "W": randn(4, 3, 3, 3, seed=1),
            "gamma": scale(4, 2, (4,)),
            "beta": shift(4, 3, (4,)),
            "mean": shift(4, 4, (4,)),
            "var": scale(4, 5, (4,)),
        },
    )

    result = assert_folded(model, "backward")

    (d,) = result.decisions
    assert d.source == "node" and d.target_op == "Conv" and d.detail.startswith("through ")
    assert ops(result.model) == ["Conv", "Transpose", "Cast", "Transpose"]


def test_batchnorm_node_after_a_transpose_that_moves_the_channels_is_kept():
    # Conv output [N, C, H, W] → Transpose(0, 2, 1, 3): the BN's axis 1 is the Conv's H axis
    model = model_from_text(
        f"""{H17}
        g (float[2,3,4,4] X) => (float[2,4,4,4] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            t1 = Transpose <perm = [0, 2, 1, 3]> (c)
            Y = BatchNormalization (t1, gamma, beta, mean, var)
        }}""",
        {
            "W": randn(4, 3, 3, 3, seed=1),
            "gamma": scale(4, 2, (4,)),
            "beta": shift(4, 3, (4,)),
            "mean": shift(4, 4, (4,)),
            "var": scale(4, 5, (4,)),
        },
    )

    result = fold_checked(model)

    (d,) = result.decisions
    assert not d.folded and d.reason == SkipReason.UNSUPPORTED_LAYOUT, d.detail


def test_mul_add_that_broadcasts_one_channel_to_many_is_not_a_batchnorm():
    # [N, 1, H, W] · [1, C, 1, 1] + [1, C, 1, 1] makes C channels out of one: removing it would
    # change the shape the Conv reads, so it is no per-channel map and is left alone
    model = model_from_text(
        f"""{H17}
        g (float[2,1,6,6] X) => (float[2,5,4,4] Y) {{
            r = Relu (X)
            m = Mul (r, s)
            a = Add (m, t)
            Y = Conv (a, W)
        }}""",
        {"s": scale(4, 3, (1, 4, 1, 1)), "t": shift(4, 4, (1, 4, 1, 1)), "W": randn(5, 4, 3, 3)},
    )

    result = fold_checked(model)

    assert result.decisions == [] and ops(result.model) == ops(model)


NORM_AFFINES = {
    # a decomposed LayerNorm over the last axis, then its γ, β
    "layernorm": """
        mu = ReduceMean <axes = [-1]> (X)
        d = Sub (X, mu)
        sq = Mul (d, d)
        var = ReduceMean <axes = [-1]> (sq)
        ve = Add (var, eps)
        sd = Sqrt (ve)
        n = Div (d, sd)
    """,
    # torch's GroupNorm export: Reshape → InstanceNormalization → Reshape, then γ, β
    "groupnorm": """
        shp = Constant <value = int64[3] {2, 2, -1}> ()
        r = Reshape (X, shp)
        n0 = InstanceNormalization (r, ones, zeros)
        back = Constant <value = int64[3] {2, 6, 4}> ()
        n = Reshape (n0, back)
    """,
}


@pytest.mark.parametrize("norm", list(NORM_AFFINES))
def test_a_norm_layers_affine_is_not_a_batchnorm(norm):
    const = {
        "eps": np.array([1e-5], np.float32),
        "ones": np.ones(2, np.float32),
        "zeros": np.zeros(2, np.float32),
    }
    axis_shape = (1, 1, 4) if norm == "layernorm" else (1, 6, 1)
    model = model_from_text(
        f"""{H17}
        g (float[2,6,4] X) => (float[2,6,5] Y) {{
            {NORM_AFFINES[norm]}
            m = Mul (n, gamma)
            a = Add (m, beta)
            Y = MatMul (a, W)
        }}""",
        {
            **{k: v for k, v in const.items() if k in NORM_AFFINES[norm]},
            "gamma": scale(axis_shape[1] * axis_shape[2], 3, axis_shape),
            "beta": shift(axis_shape[1] * axis_shape[2], 4, axis_shape),
            "W": randn(4, 5, seed=5),
        },
    )

    result = fold_checked(model)

    assert result.decisions == [] and ops(result.model) == ops(model)


def test_scale_after_a_kept_batchnorm_node_is_not_counted_again():
    # Caffe2's BatchNorm + Scale (the light DenseNet-121): Concat → BN → Mul → Add → Relu. The BN
    # node is kept (a Concat is no producer); its Scale is part of the same layer, not a second BN.
    model = model_from_text(
        f"""{H17}
        g (float[2,2,5,5] X, float[2,2,5,5] Z) => (float[2,4,5,5] Y) {{
            c = Concat <axis = 1> (X, Z)
            b = BatchNormalization (c, gamma, beta, mean, var)
            m = Mul (b, s)
            a = Add (m, t)
            Y = Relu (a)
        }}""",
        {
            "gamma": scale(4, 2, (4,)),
            "beta": shift(4, 3, (4,)),
            "mean": shift(4, 4, (4,)),
            "var": scale(4, 5, (4,)),
            "s": scale(4, 6, (4, 1, 1)),
            "t": shift(4, 7, (4, 1, 1)),
        },
    )

    result = fold_checked(model)

    (d,) = result.decisions
    assert d.source == "node" and d.reason == SkipReason.UNSUPPORTED_PRODUCER
