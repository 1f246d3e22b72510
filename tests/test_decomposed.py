"""Decomposed and computed BNs: Mul/Add/Sub/Div chains with per-channel constants after a
Conv/Gemm/MatMul fold into it; BN parameters and weights computed from constants are resolved.

A Mul/Add that is not per-channel along the producer's channel axis is never folded, and is never
reported (only real BatchNormalization nodes appear as kept).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from foldchecks import assert_folded, assert_not_folded, fold_checked, ops
from helpers import bn_params, const_values, lit, model_from_text, randn

H17 = '<ir_version: 8, opset_import: ["" : 17]>'


def per_channel(c: int, seed: int, shape=None, positive: bool = False) -> np.ndarray:
    v = np.random.default_rng(seed).uniform(0.5, 1.5, c) * (
        1 if positive else np.random.default_rng(seed + 1).choice([-1, 1], c)
    )
    return v.astype(np.float32).reshape(shape or (c, 1, 1))


# ======================================================================================== folds
def test_conv_mul_add():
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W, b)
            [scale_mul] m = Mul (c, s)
            [shift_add] Y = Add (m, t)
        }}""",
        {
            "W": randn(4, 3, 3, 3, seed=1),
            "b": randn(4, seed=2),
            "s": per_channel(4, 3),
            "t": per_channel(4, 4),
        },
    )

    result = assert_folded(model, "decomposed")

    assert ops(result.model) == ["Conv"] and result.model.graph.node[0].output == ["Y"]
    (d,) = result.decisions
    assert d.name == "scale_mul + shift_add" and d.target_op == "Conv"
    assert "Mul" in d.detail and "Add" in d.detail


def test_exporter_lowered_bn_with_computed_sqrt():
    # (x − mean) / sqrt(var + eps) · gamma + beta, the four constants [C, 1, 1], sqrt computed in-graph.
    p = {k: v.reshape(4, 1, 1) for k, v in bn_params(4).items()}
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = Conv (X, W)
            eps = Constant <value = float {{1e-5}}> ()
            ve = Add (var, eps)
            sd = Sqrt (ve)
            centred = Sub (c, mean)
            normed = Div (centred, sd)
            scaled = Mul (normed, scale)
            Y = Add (scaled, B)
        }}""",
        {"W": randn(4, 3, 1, 1, seed=1), **p},
    )

    result = assert_folded(model, "decomposed")

    assert ops(result.model) == ["Conv"], "the chain and the constants that computed it are gone"
    assert len(result.model.graph.initializer) == 2


@pytest.mark.parametrize(
    "chain",
    [
        "m = Mul (s, c)\n Y = Add (t, m)",
        "m = Mul (c, s)\n Y = Sub (m, t)",
        "m = Sub (t, c)\n Y = Mul (m, s)",
        "m = Div (c, s)\n Y = Add (m, t)",
        "Y = Mul (c, s)",
    ],
    ids=["commuted", "sub", "const_minus_y", "div", "mul_only"],
)
def test_operand_orders(chain):
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = Conv (X, W)
            {chain}
        }}""",
        {
            "W": randn(4, 3, 1, 1, seed=1),
            "s": per_channel(4, 3, positive=True),
            "t": per_channel(4, 4),
        },
    )
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    result = assert_folded(model, "decomposed")
    assert ops(result.model) == ["Conv"]


@pytest.mark.parametrize(
    "shape", [(1, 4, 1, 1), (4, 1, 1), (1,), ()], ids=["1C11", "C11", "1", "scalar"]
)
def test_per_channel_constant_shapes(shape):
    s = (
        per_channel(4, 3)
        .reshape(-1)[: int(np.prod(shape, dtype=int)) if shape != () else 1]
        .reshape(shape)
    )
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = ConvTranspose (X, W)
            m = Mul (c, s)
            Y = Add (m, t)
        }}""",
        {"W": randn(3, 4, 1, 1, seed=1), "s": s, "t": per_channel(4, 4)},
    )
    assert_folded(model, "decomposed")


def test_gemm_mul_add():
    model = model_from_text(
        f"""{H17}
        g (float[3,6] X) => (float[3,4] Y) {{
            c = Gemm <transB = 1> (X, W, b)
            m = Mul (c, s)
            Y = Add (m, t)
        }}""",
        {
            "W": randn(4, 6, seed=1),
            "b": randn(4, seed=2),
            "s": per_channel(4, 3, (4,)),
            "t": per_channel(4, 4, (1, 4)),
        },
    )
    result = assert_folded(model, "decomposed")
    assert ops(result.model) == ["Gemm"]


def test_matmul_bias_then_mul_add():
    model = model_from_text(
        f"""{H17}
        g (float[3,6] X) => (float[3,4] Y) {{
            c = MatMul (X, W)
            a = Add (c, b)
            m = Mul (a, s)
            Y = Add (m, t)
        }}""",
        {
            "W": randn(6, 4, seed=1),
            "b": randn(4, seed=2),
            "s": per_channel(4, 3, (4,)),
            "t": per_channel(4, 4, (4,)),
        },
    )
    result = assert_folded(model, "decomposed")
    assert ops(result.model) == ["MatMul", "Add"]


def test_decomposed_then_real_bn():
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = Conv (X, W)
            m = Mul (c, s)
            Y = BatchNormalization (m, scale, B, mean, var)
        }}""",
        {"W": randn(4, 3, 1, 1, seed=1), "s": per_channel(4, 3), **bn_params(4)},
    )
    result = fold_checked(model)
    assert [d.direction for d in result.decisions] == ["decomposed", "backward"]
    assert ops(result.model) == ["Conv"]


def test_real_bn_then_decomposed():
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = Conv (X, W)
            n = BatchNormalization (c, scale, B, mean, var)
            Y = Mul (n, s)
        }}""",
        {"W": randn(4, 3, 1, 1, seed=1), "s": per_channel(4, 3), **bn_params(4)},
    )
    result = fold_checked(model)
    assert [d.direction for d in result.decisions] == ["backward", "decomposed"]
    assert ops(result.model) == ["Conv"]


# ================================================================================== never folded
@pytest.mark.parametrize(
    "case",
    [
        "last_axis_C_equals_W",
        "extra_axis",
        "rank5_C11",
        "spatial",
        "bias_only",
        "const_over_y",
        "not_constant",
        "shared_output",
    ],
)
def test_not_per_channel_is_left_alone(case):
    # The output is [2, 4, 5, 4]: a [4] constant broadcasts along W (== C), not along the channels.
    spatial, const, line = "5,4", per_channel(4, 3, (4,)), "Y = Mul (c, k)"
    extra_out = ""
    if case == "extra_axis":
        const = per_channel(4, 3, (1, 1, 4, 1, 1))
        line = "Y = Mul (c, k)"
    elif case == "rank5_C11":
        spatial, const = (
            "4,5,3",
            per_channel(4, 3, (4, 1, 1)),
        )  # right-aligned: axis 2 (D == C), not the channels
    elif case == "spatial":
        const = randn(1, 1, 5, 4, seed=3)
    elif case == "bias_only":
        const, line = per_channel(4, 3), "Y = Add (c, k)"
    elif case == "const_over_y":
        const, line = per_channel(4, 3), "Y = Div (k, c)"
    elif case == "not_constant":
        line = "Y = Mul (c, c)"
    elif case == "shared_output":
        const, line, extra_out = (
            per_channel(4, 3),
            "Y = Mul (c, k)\n Z = Relu (c)",
            f", float[2,4,{spatial}] Z",
        )
    out_shape = "1,2,4,5,4" if case == "extra_axis" else f"2,4,{spatial}"
    w = randn(4, 3, *(1,) * len(spatial.split(",")), seed=1)
    model = model_from_text(
        f"""{H17}
        g (float[2,3,{spatial}] X) => (float[{out_shape}] Y{extra_out}) {{
            c = Conv (X, W)
            {line}
        }}""",
        {"W": w, **({} if case == "not_constant" else {"k": const})},
    )

    assert_not_folded(model)


def test_wrong_mul_after_a_bn_is_not_reported():
    # A real BN that cannot fold is reported once; an unrelated, not-per-channel Mul is not at all.
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,4] X) => (float[2,4,5,4] Y) {{
            r = Relu (X)
            n = BatchNormalization (r, scale, B, mean, var)
            c = Conv (n, W)
            Y = Mul (c, k)
        }}""",
        {"W": randn(4, 4, 1, 1, seed=1), "k": per_channel(4, 3, (4,)), **bn_params(4)},
    )
    result = fold_checked(model)
    assert [d.direction for d in result.decisions] == ["forward"]


# ============================================================================ computed parameters
def test_dynamo_zero_bias_and_constant_params():
    # torch's dynamo exporter gives a bias-less Conv the bias Expand(CastLike(0, x), Shape(W)[0:1]).
    p = bn_params(4)
    model = model_from_text(
        f"""<ir_version: 10, opset_import: ["" : 20]>
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            wd = Shape <start = 0, end = 1> (W)
            one = Constant <value_ints = [1]> ()
            bshape = Expand (wd, one)
            zero = Constant <value = float {{0}}> ()
            zc = CastLike (zero, X)
            bias = Expand (zc, bshape)
            c = Conv <pads = [1, 1, 1, 1]> (X, W, bias)
            sc = Constant <value = {lit(p["scale"])}> ()
            Y = BatchNormalization (c, sc, B, mean, var)
        }}""",
        {"W": randn(4, 3, 3, 3, seed=1), "B": p["B"], "mean": p["mean"], "var": p["var"]},
    )

    result = assert_folded(model, "backward")

    assert ops(result.model) == ["Conv"], "the computed zero bias is replaced, its nodes removed"


def test_parameters_computed_from_constants():
    p = bn_params(4)
    w16 = randn(4, 3, 3, 3, dtype=np.float16, seed=1)
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            W = Cast <to = 1> (W16)
            sc2 = Reshape (scale2d, flat)
            b1 = Unsqueeze (Bs, axis0)
            Bv = Squeeze (b1, axis0)
            mean = Identity (mean0)
            vshape = Shape (mean0)
            var = Expand (v1, vshape)
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = BatchNormalization (c, sc2, Bv, mean, var)
        }}""",
        {
            "W16": w16,
            "scale2d": p["scale"].reshape(2, 2),
            "flat": np.array([-1], np.int64),
            "Bs": p["B"],
            "axis0": np.array([0], np.int64),
            "mean0": p["mean"],
            "v1": np.array([0.7], np.float32),
        },
    )

    result = assert_folded(model, "backward")

    assert ops(result.model) == ["Conv"]
    w = const_values(result.model)[result.model.graph.node[0].input[1]]
    assert w.dtype == np.float32, "folded in the Cast's output dtype"


def test_constant_of_shape_computed_shape():
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            shp = Shape <start = 0, end = 1> (scale)
            ones = ConstantOfShape <value = float[1] {{1.0}}> (shp)
            c = Conv (X, W)
            Y = BatchNormalization (c, scale, B, mean, ones)
        }}""",
        {"W": randn(4, 3, 1, 1, seed=1), **{k: v for k, v in bn_params(4).items() if k != "var"}},
    )
    result = assert_folded(model, "backward")
    assert ops(result.model) == ["Conv"]


def test_decomposed_in_ir3_model_keeps_inputs_consistent():
    model = model_from_text(
        """<ir_version: 3, opset_import: ["" : 7]>
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {
            c = Conv (X, W)
            m = Mul (c, s)
            Y = Add (m, t)
        }""",
        {"W": randn(4, 3, 1, 1, seed=1), "s": per_channel(4, 3), "t": per_channel(4, 4)},
    )
    result = assert_folded(model, "decomposed")
    folded = result.model
    assert {i.name for i in folded.graph.initializer} == {i.name for i in folded.graph.input} - {
        "X"
    }
    onnx.checker.check_model(folded, full_check=True)


@pytest.mark.parametrize(
    "attrs, folds",
    [
        ("<broadcast = 1, axis = 1>", True),  # legacy broadcasting: [C] aligned at the channel axis
        ("<broadcast = 1>", False),  # [C] aligned with the trailing axis W
    ],
)
def test_legacy_broadcast_opset6(attrs, folds):
    from helpers import run_reference

    model = model_from_text(
        f"""<ir_version: 3, opset_import: ["" : 6]>
        g (float[2,3,5,4] X) => (float[2,4,5,4] Y) {{
            c = Conv (X, W)
            m = Mul {attrs} (c, s)
            Y = Add <broadcast = 1, axis = 1> (m, t)
        }}""",
        {
            "W": randn(4, 3, 1, 1, seed=1),
            "s": per_channel(4, 3, (4,)),
            "t": per_channel(4, 4, (4,)),
        },
    )
    if folds:
        # Neither ONNX Runtime (no Mul-6 kernel) nor onnx's reference evaluator (numpy broadcasting)
        # runs legacy broadcasting: compare with numpy instead.
        result = assert_folded(model, "decomposed", run=None)
        assert ops(result.model) == ["Conv"]
        values = const_values(model)
        x = randn(2, 3, 5, 4, seed=7)
        conv = np.einsum(
            "oc,nchw->nohw", values["W"][:, :, 0, 0].astype(np.float64), x.astype(np.float64)
        )
        want = (
            conv * values["s"].astype(np.float64)[:, None, None]
            + values["t"].astype(np.float64)[:, None, None]
        )
        (got,) = run_reference(result.model, {"X": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        result = fold_checked(model)
        assert result.decisions == [] and ops(result.model) == ["Conv", "Mul", "Add"]
