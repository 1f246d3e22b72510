"""The fold pass, case by case: what it folds (and that the result is equivalent), what it keeps and why.

Every model is written as ONNX text so the graph reads like a diagram. ``assert_folds`` checks the
structure, numerical equivalence under ONNX Runtime with optimizations disabled, and the checker;
``assert_kept`` checks the reason, its detail, and that the model is unchanged.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import (
    assert_close,
    assert_folds,
    assert_kept,
    bn_params,
    const_values,
    count_op,
    lit,
    model_from_text,
    randn,
    random_feeds,
    round_exact,
    run_ort,
    run_reference,
    unused_initializers,
)
from onnx import helper, numpy_helper

from bnfold.passes import BatchNormFoldPass
from bnfold.report import SkipReason

H17 = '<ir_version: 8, opset_import: ["" : 17]>'
BN = "BatchNormalization (c, scale, B, mean, var)"
LATEST = onnx.defs.onnx_opset_version()


def dims(*shape: int) -> str:
    return ",".join(str(d) for d in shape)


def header(opset: int) -> str:
    ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>'


def scale_shift(params: dict[str, np.ndarray], eps: float = 1e-5, prefix: str = ""):
    """BN(x) = s·x + t in float64, straight from the definition."""
    g, b, m, v = (params[prefix + k].astype(np.float64) for k in ("scale", "B", "mean", "var"))
    s = g / np.sqrt(v + eps)
    return s, b - m * s


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def conv_bn_model(*, opset_header: str = H17, bn_attrs: str = "", params=None) -> onnx.ModelProto:
    """X [2,4,5,5] → Conv(3x3, pad 1, 6 channels) → BatchNormalization → Y: the generic case."""
    return model_from_text(
        f"""{opset_header}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = BatchNormalization {bn_attrs} (c, scale, B, mean, var)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **(bn_params(6) if params is None else params)},
    )


# ============================================================================================ Conv
CONV_GROUPS = {"group1": (4, 6, 1), "group2": (4, 6, 2), "depthwise": (4, 4, 4)}
SPATIAL = {1: (7,), 2: (5, 5), 3: (4, 4, 4)}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("groups", list(CONV_GROUPS))
@pytest.mark.parametrize("rank", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv(rank, groups, bias):
    cin, cout, group = CONV_GROUPS[groups]
    spatial = SPATIAL[rank]
    params = bn_params(cout)
    inits = {"W": randn(cout, cin // group, *(3,) * rank, seed=1), **params}
    if bias:
        inits["b"] = randn(cout, seed=2)
    model = model_from_text(
        f"""{H17}
        g (float[2,{cin},{dims(*spatial)}] X) => (float[2,{cout},{dims(*spatial)}] Y) {{
            c = Conv <group = {group}, pads = {[1] * 2 * rank}> (X, W{", b" if bias else ""})
            Y = {BN}
        }}""",
        inits,
    )

    result = assert_folds(model, 1)

    (conv,) = result.model.graph.node
    assert conv.op_type == "Conv" and len(conv.input) == 3, "a missing bias is created"
    assert node_attrs(conv) == {"group": group, "pads": [1] * 2 * rank}
    s, t = scale_shift(params)
    b = inits["b"].astype(np.float64) if bias else 0.0
    np.testing.assert_array_equal(
        const_values(result.model)[conv.input[2]], (b * s + t).astype(np.float32)
    )


# =================================================================================== ConvTranspose
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("rank", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv_transpose(rank, group, bias):
    cin, cout = 4, 6  # W is [Cin, Cout/group, k...]
    spatial_in = {1: (5,), 2: (4, 4), 3: (3, 3, 3)}[rank]
    spatial_out = tuple(2 * (d - 1) + 3 for d in spatial_in)  # stride 2, kernel 3, no padding
    inits = {"W": randn(cin, cout // group, *(3,) * rank, seed=1), **bn_params(cout)}
    if bias:
        inits["b"] = randn(cout, seed=2)
    model = model_from_text(
        f"""{H17}
        g (float[2,{cin},{dims(*spatial_in)}] X) => (float[2,{cout},{dims(*spatial_out)}] Y) {{
            c = ConvTranspose <group = {group}, strides = {[2] * rank}> (X, W{", b" if bias else ""})
            Y = {BN}
        }}""",
        inits,
    )

    result = assert_folds(model, 1)

    (convt,) = result.model.graph.node
    assert convt.op_type == "ConvTranspose" and len(convt.input) == 3
    values = const_values(result.model)
    assert values[convt.input[1]].shape == inits["W"].shape
    assert values[convt.input[2]].shape == (cout,)


# ============================================================================================ Gemm
M, K, N = 3, 5, 4
C_SHAPES = {"no_C": None, "C[N]": (N,), "C[1,N]": (1, N), "C[M,N]": (M, N)}


@pytest.mark.parametrize("c_shape", list(C_SHAPES))
@pytest.mark.parametrize(
    "alpha, beta", [(1.0, 1.0), (0.5, -1.5)], ids=["alpha1_beta1", "alpha0.5_beta-1.5"]
)
@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
@pytest.mark.parametrize("trans_a", [0, 1], ids=["transA0", "transA1"])
def test_gemm(trans_a, trans_b, alpha, beta, c_shape):
    a_shape = (K, M) if trans_a else (M, K)
    inits = {"Bw": randn(*((N, K) if trans_b else (K, N)), seed=1), **bn_params(N)}
    if C_SHAPES[c_shape] is not None:
        inits["C"] = randn(*C_SHAPES[c_shape], seed=2)
    model = model_from_text(
        f"""{H17}
        g (float[{dims(*a_shape)}] A) => (float[{M},{N}] Y) {{
            c = Gemm <transA = {trans_a}, transB = {trans_b}, alpha = {alpha!r}, beta = {beta!r}>
                     (A, Bw{", C" if "C" in inits else ""})
            Y = {BN}
        }}""",
        inits,
    )

    result = assert_folds(model, 1)

    (gemm,) = result.model.graph.node
    attrs = node_attrs(gemm)
    assert attrs.get("beta", 1.0) == 1.0, "C absorbs beta"
    assert (
        attrs.get("alpha", 1.0) == alpha
        and attrs["transA"] == trans_a
        and attrs["transB"] == trans_b
    )
    new_c = const_values(result.model)[gemm.input[2]]
    assert new_c.shape == (C_SHAPES[c_shape] or (N,))


# ========================================================================================== MatMul
def test_matmul_without_add_gets_one():
    params = bn_params(4)
    model = model_from_text(
        f"""{H17}
        g (float[3,5] X) => (float[3,4] Y) {{
            c = MatMul (X, W)
            Y = {BN}
        }}""",
        {"W": randn(5, 4, seed=1), **params},
    )

    result = assert_folds(model, 1)

    mm, add = result.model.graph.node
    assert (mm.op_type, add.op_type) == ("MatMul", "Add") and add.input[0] == mm.output[0]
    assert add.output[0] == "Y"
    _, t = scale_shift(params)
    np.testing.assert_array_equal(const_values(result.model)[add.input[1]], t.astype(np.float32))


@pytest.mark.parametrize("bias_first", [False, True], ids=["Add(mm,b)", "Add(b,mm)"])
@pytest.mark.parametrize("bias_shape", [(4,), (1, 4)], ids=["b[N]", "b[1,N]"])
def test_matmul_add(bias_shape, bias_first):
    add_inputs = "bias, m" if bias_first else "m, bias"
    model = model_from_text(
        f"""{H17}
        g (float[3,5] X) => (float[3,4] Y) {{
            m = MatMul (X, W)
            c = Add ({add_inputs})
            Y = {BN}
        }}""",
        {"W": randn(5, 4, seed=1), "bias": randn(*bias_shape, seed=2), **bn_params(4)},
    )

    result = assert_folds(model, 1)

    mm, add = result.model.graph.node
    assert (mm.op_type, add.op_type) == ("MatMul", "Add"), "no second Add"
    bias_name = add.input[0 if bias_first else 1]
    assert const_values(result.model)[bias_name].shape == bias_shape


def test_matmul_rank3_kept():
    # [2, 4, 5] @ [5, 4] → [2, 4, 4]: the BN normalises axis 1, the MatMul's features are on axis 2.
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5] X) => (float[2,4,4] Y) {{
            c = MatMul (X, W)
            Y = {BN}
        }}""",
        {"W": randn(5, 4, seed=1), **bn_params(4)},
    )
    assert_kept(model, SkipReason.UNSUPPORTED_LAYOUT)


def test_matmul_constant_first_input_kept():
    # W [4, 5] @ X [5, 3]: the constant's axis 0 is not the output's channel axis 1.
    model = model_from_text(
        f"""{H17}
        g (float[5,3] X) => (float[4,3] Y) {{
            c = MatMul (W, X)
            Y = {BN}
        }}""",
        {"W": randn(4, 5, seed=1), **bn_params(3)},
    )
    assert_kept(model, SkipReason.UNSUPPORTED_LAYOUT)


# ========================================================================== BatchNormalization opsets
@pytest.mark.parametrize("opset", [6, 7, 9, 14, 15, LATEST])
def test_bn_opsets(opset):
    bn_attrs = "<is_test = 1, spatial = 1, epsilon = 0.001>" if opset == 6 else "<epsilon = 0.001>"
    model = conv_bn_model(opset_header=header(opset), bn_attrs=bn_attrs)
    # ONNX Runtime has no kernel for BatchNormalization-6; onnx's reference evaluator has.
    assert_folds(model, 1, run=run_reference if opset == 6 else run_ort)


def test_bn_opset6_is_test_0_kept():
    # Before opset 7, is_test defaults to 0: the BN normalises with the batch's statistics.
    # (No backend to compare with: ORT lacks BatchNormalization-6, onnx's evaluator fails on it.)
    model = conv_bn_model(opset_header=header(6), bn_attrs="<spatial = 1>")
    result = assert_kept(model, SkipReason.TRAINING_MODE, run=None)
    assert "is_test" in result.decisions[0].detail


def test_missing_epsilon_means_1e_5():
    params = bn_params(6)
    params["var"] = np.full(6, 1e-5, np.float32)  # var + ε is 2e-5, var alone half of it
    model = conv_bn_model(params=params)
    assert not any(a.name == "epsilon" for a in model.graph.node[1].attribute)

    result = assert_folds(model, 1)  # ORT applies the default too

    w = const_values(result.model)[result.model.graph.node[0].input[1]].astype(np.float64)
    w0 = const_values(model)["W"].astype(np.float64)
    s_default, _ = scale_shift(params, eps=1e-5)
    s_zero, _ = scale_shift(params, eps=0.0)
    np.testing.assert_allclose(w, w0 * s_default[:, None, None, None], rtol=1e-6)
    assert not np.allclose(w, w0 * s_zero[:, None, None, None], rtol=0.1)


@pytest.mark.parametrize("opset", [14, 15])
def test_training_mode_kept(opset):
    model = model_from_text(
        f"""{header(opset)}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y, running_mean, running_var = BatchNormalization <training_mode = 1> (c, scale, B, mean, var)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)},
    )
    assert_kept(model, SkipReason.TRAINING_MODE, run=run_reference)


def test_stats_outputs_used_kept():
    model = model_from_text(
        f"""{header(9)}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y, float[6] running_mean) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y, running_mean, running_var, saved_mean, saved_var = BatchNormalization (c, scale, B, mean, var)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)},
    )
    assert_kept(model, SkipReason.STATS_OUTPUTS_USED, run=None)


def test_opset15_mixed_dtypes_fold():
    # BatchNormalization-15: X is T (float16), scale/B are T1 (float32), mean/var are T2 (float16).
    params = bn_params(6)
    inits = {
        "W": randn(6, 4, 1, 1, dtype=np.float16, seed=1),
        "scale": params["scale"],
        "B": params["B"],
        "mean": params["mean"].astype(np.float16),
        "var": params["var"].astype(np.float16),
    }
    model = model_from_text(
        f"""{header(15)}
        g (float16[2,4,5,5] X) => (float16[2,6,5,5] Y) {{
            c = Conv (X, W)
            Y = {BN}
        }}""",
        inits,
    )
    feeds = random_feeds(model)

    result = assert_folds(model, 1, feeds=feeds)

    # Against float64 math of Conv(1x1) + BN on the very same (rounded) inputs and parameters.
    x = feeds["X"].astype(np.float64)
    y = np.einsum("oc,nchw->nohw", inits["W"][:, :, 0, 0].astype(np.float64), x)
    s, t = scale_shift({k: v for k, v in inits.items() if k != "W"})
    want = y * s[None, :, None, None] + t[None, :, None, None]
    (got,) = run_ort(result.model, feeds)
    assert got.dtype == np.float16
    np.testing.assert_allclose(
        got.astype(np.float64), want, rtol=5e-3, atol=5e-3 * np.abs(want).max()
    )


def _spatial0_model(params):
    return model_from_text(
        f"""{header(7)}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = BatchNormalization <spatial = 0> (c, scale, B, mean, var)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **params},
    )


def test_spatial0_per_element_stats_kept():
    assert_kept(_spatial0_model(bn_params(6, shape=(6, 5, 5))), SkipReason.PER_ELEMENT_STATS)


def test_spatial0_constant_per_channel_folds():
    params = {
        k: np.broadcast_to(v[:, None, None], (6, 5, 5)).copy() for k, v in bn_params(6).items()
    }
    assert_folds(_spatial0_model(params), 1)


# ====================================================================================== constants
def test_constant_nodes():
    p = bn_params(6)
    w = randn(6, 4, 3, 3, seed=1)
    model = model_from_text(f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            W = Constant <value = {lit(w)}> ()
            scale = Constant <value = {lit(p["scale"])}> ()
            B = Constant <value = {lit(p["B"])}> ()
            mean = Constant <value = {lit(p["mean"])}> ()
            var = Constant <value = {lit(p["var"])}> ()
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = {BN}
        }}""")

    result = assert_folds(model, 1)

    assert [n.op_type for n in result.model.graph.node] == ["Conv"], "dead Constants are removed"


def test_constant_of_shape():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            W = ConstantOfShape <value = float[1] {{0.25}}> (w_shape)
            scale = ConstantOfShape <value = float[1] {{-1.5}}> (c_shape)
            B = ConstantOfShape <value = float[1] {{0.75}}> (c_shape)
            mean = ConstantOfShape <value = float[1] {{0.5}}> (c_shape)
            var = ConstantOfShape <value = float[1] {{0.3}}> (c_shape)
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = {BN}
        }}""",
        {"w_shape": np.array([6, 4, 3, 3], np.int64), "c_shape": np.array([6], np.int64)},
    )

    result = assert_folds(model, 1)

    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert {i.name for i in result.model.graph.initializer} == set(
        result.model.graph.node[0].input[1:]
    )


def test_constants_behind_identity():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            Wi = Identity (W)
            scale_i = Identity (scale)
            var_i = Identity (var)
            var_ii = Identity (var_i)
            c = Conv <pads = [1, 1, 1, 1]> (X, Wi)
            Y = BatchNormalization (c, scale_i, B, mean, var_ii)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)},
    )

    result = assert_folds(model, 1)

    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_non_constant_param_kept():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X, float[6] mean) => (float[2,6,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = {BN}
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)},
    )
    del model.graph.initializer[[i.name for i in model.graph.initializer].index("mean")]
    assert_kept(model, SkipReason.NON_CONSTANT_PARAMS)


def test_non_constant_weight_kept():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X, float[6,4,3,3] W) => (float[2,6,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = {BN}
        }}""",
        bn_params(6),
    )
    assert_kept(model, SkipReason.NON_CONSTANT_WEIGHT)


# ===================================================================================== IR versions
def test_ir3_initializers_listed_as_inputs():
    model = conv_bn_model(opset_header=header(7))
    assert model.ir_version == 3 and len(model.graph.input) == 1 + 5  # X, W and 4 BN params

    result = assert_folds(model, 1)  # ORT is fed X only: the rest are initializers

    folded = result.model
    inputs = [i.name for i in folded.graph.input]
    assert inputs[0] == "X"
    assert (
        set(inputs[1:])
        == {i.name for i in folded.graph.initializer}
        == set(folded.graph.node[0].input[1:])
    )
    assert not {"scale", "B", "mean", "var"} & set(inputs), "removed BN parameters leave the inputs"
    assert folded.ir_version == 3


@pytest.mark.parametrize(
    "name, reason", [("var", SkipReason.OVERRIDABLE_PARAMS), ("W", SkipReason.OVERRIDABLE_WEIGHT)]
)
def test_ir4_initializer_that_is_an_input_kept(name, reason):
    model = conv_bn_model()
    init = next(i for i in model.graph.initializer if i.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    assert_kept(model, reason)


# ============================================================================== sharing and outputs
def test_shared_weight_gets_private_copy():
    w = randn(6, 4, 3, 3, seed=1)
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y, float[2,6,5,5] Z) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = {BN}
            Z = Conv <pads = [1, 1, 1, 1]> (X, W)
        }}""",
        {"W": w, **bn_params(6)},
    )

    result = assert_folds(model, 1)

    conv_y, conv_z = (n for n in result.model.graph.node if n.op_type == "Conv")
    assert conv_z.output == ["Z"] and conv_z.input[1] == "W"
    np.testing.assert_array_equal(const_values(result.model)["W"], w)
    assert conv_y.input[1] != "W"


@pytest.mark.parametrize("where", ["another_node", "graph_output"])
def test_producer_output_shared_kept(where):
    outputs = "float[2,6,5,5] Y, float[2,6,5,5] " + ("Z" if where == "another_node" else "c")
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => ({outputs}) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = {BN}
            {"Z = Relu (c)" if where == "another_node" else ""}
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)},
    )
    assert_kept(model, SkipReason.PRODUCER_OUTPUT_SHARED)


def test_bn_output_that_is_a_graph_output_keeps_its_name_type_and_shape():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y, float[2,6,5,5] Z) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = {BN}
            Z = Relu (Y)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)},
    )

    result = assert_folds(model, 1)

    assert list(result.model.graph.output) == list(model.graph.output)
    conv, relu = result.model.graph.node
    assert conv.output == ["Y"] and relu.input == ["Y"]


def test_conv_bn_bn_chain_rounds_once():
    p1, p2 = bn_params(6, seed=1), bn_params(6, seed=2, prefix="bn2_")
    w = randn(6, 4, 3, 3, seed=1)
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            y1 = {BN}
            Y = BatchNormalization (y1, bn2_scale, bn2_B, bn2_mean, bn2_var)
        }}""",
        {"W": w, **p1, **p2},
    )

    result = assert_folds(model, 2)

    # The second fold starts from the first one's float64 values, not from their float32 copies.
    (conv,) = result.model.graph.node
    s1, t1 = scale_shift(p1)
    s2, t2 = scale_shift(p2, prefix="bn2_")
    values = const_values(result.model)
    want_w = (w.astype(np.float64) * s1[:, None, None, None]) * s2[:, None, None, None]
    np.testing.assert_array_equal(values[conv.input[1]], want_w.astype(np.float32))
    np.testing.assert_array_equal(values[conv.input[2]], (t1 * s2 + t2).astype(np.float32))


# ========================================================================================== dtypes
def _dtype_model(op: str, type_name: str, np_dtype, opset_header: str = H17) -> onnx.ModelProto:
    params = bn_params(4, np_dtype)
    if op == "Conv":
        return model_from_text(
            f"""{opset_header}
            g ({type_name}[2,3,5,5] X) => ({type_name}[2,4,5,5] Y) {{
                c = Conv <pads = [1, 1, 1, 1]> (X, W, b)
                Y = {BN}
            }}""",
            {
                "W": randn(4, 3, 3, 3, dtype=np_dtype, seed=1),
                "b": randn(4, dtype=np_dtype, seed=2),
                **params,
            },
        )
    line = "c = Gemm <transB = 1> (X, W, b)" if op == "Gemm" else "c = MatMul (X, W)"
    w = randn(4, 5, dtype=np_dtype, seed=1) if op == "Gemm" else randn(5, 4, dtype=np_dtype, seed=1)
    return model_from_text(
        f"""{opset_header}
        g ({type_name}[3,5] X) => ({type_name}[3,4] Y) {{
            {line}
            Y = {BN}
        }}""",
        {"W": w, "b": randn(4, dtype=np_dtype, seed=2), **params}
        if op == "Gemm"
        else {"W": w, **params},
    )


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
@pytest.mark.parametrize("type_name, np_dtype", [("float16", np.float16), ("double", np.float64)])
def test_float16_and_float64(op, type_name, np_dtype):
    model = _dtype_model(op, type_name, np_dtype)
    # ONNX Runtime's CPU provider has no float64 Conv; onnx's reference evaluator does.
    run = run_reference if (op, np_dtype) == ("Conv", np.float64) else run_ort
    result = assert_folds(model, 1, run=run)
    folded_w = next(
        i for i in result.model.graph.initializer if i.name == result.model.graph.node[0].input[1]
    )
    assert folded_w.data_type == model.graph.initializer[0].data_type


def _as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every bfloat16 tensor and type widened (exactly) to float64."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.data_type == onnx.TensorProto.BFLOAT16:
            init.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name)
            )
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return m


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_bfloat16(op):
    # ONNX Runtime's CPU provider has no bfloat16 Conv/Gemm/MatMul: check the folded weights against
    # float64 math rounded once, and the folded model (widened exactly to float64) numerically.
    model = _dtype_model(
        op, "bfloat16", ml_dtypes.bfloat16, header(LATEST)
    )  # bf16 Conv: opset ≥ 22
    onnx.checker.check_model(model, full_check=True)
    result = assert_folds(model, 1, run=None)
    onnx.checker.check_model(result.model, full_check=True)

    values, folded_values = const_values(model), const_values(result.model)
    params = {k: values[k] for k in ("scale", "B", "mean", "var")}
    s, t = scale_shift(params)
    producer = result.model.graph.node[0]
    w64 = values["W"].astype(np.float64)
    want_w = (
        w64 * (s[:, None] if op == "Gemm" else s[None, :])
        if op != "Conv"
        else w64 * s[:, None, None, None]
    )
    got_w = folded_values[producer.input[1]]
    assert got_w.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        got_w.view(np.uint16), round_exact(want_w, ml_dtypes.bfloat16).view(np.uint16)
    )
    bias_name = producer.input[2] if op != "MatMul" else result.model.graph.node[1].input[1]
    want_b = (values["b"].astype(np.float64) * s + t) if op != "MatMul" else t
    np.testing.assert_array_equal(
        folded_values[bias_name].view(np.uint16),
        round_exact(want_b, ml_dtypes.bfloat16).view(np.uint16),
    )

    wide, wide_folded = _as_float64(model), _as_float64(result.model)
    feeds = random_feeds(wide)
    assert_close(
        run_reference(wide_folded, feeds), run_reference(wide, feeds), rtol=2e-2, atol=2e-2
    )


# ======================================================================================== refusals
def _with(params, name, index, value):
    params = {k: v.copy() for k, v in params.items()}
    params[name][index] = value
    return params


@pytest.mark.parametrize("name", ["scale", "B", "mean", "var"])
def test_nan_param_kept(name):
    assert_kept(
        conv_bn_model(params=_with(bn_params(6), name, 2, np.nan)), SkipReason.INVALID_PARAMS
    )


def test_var_plus_epsilon_not_positive_kept():
    assert_kept(
        conv_bn_model(params=_with(bn_params(6), "var", 1, -0.5)), SkipReason.INVALID_PARAMS
    )


OVERFLOW_CASES = {  # op: (X type, Y type, producer line, weight shape); 4 output channels each
    "Conv": ("[2,3,5,5]", "[2,4,5,5]", "c = Conv <pads = [1, 1, 1, 1]> (X, W)", (4, 3, 3, 3)),
    "ConvTranspose": (
        "[2,4,3,3]",
        "[2,4,5,5]",
        "c = ConvTranspose <group = 2> (X, W)",
        (4, 2, 3, 3),
    ),
    "Gemm": ("[3,5]", "[3,4]", "c = Gemm (X, W)", (5, 4)),
    "Gemm_transB": ("[3,5]", "[3,4]", "c = Gemm <transB = 1> (X, W)", (4, 5)),
    "MatMul": ("[3,5]", "[3,4]", "c = MatMul (X, W)", (5, 4)),
}


@pytest.mark.parametrize("op", list(OVERFLOW_CASES))
def test_float16_overflow_kept(op):
    x_shape, y_shape, line, w_shape = OVERFLOW_CASES[op]
    params = _with(
        _with(_with(bn_params(4, np.float16), "scale", 0, 30000.0), "var", 0, 0.0), "mean", 0, 0.0
    )  # s ≈ 9.5e6
    model = model_from_text(
        f"""{H17}
        g (float16{x_shape} X) => (float16{y_shape} Y) {{
            {line}
            Y = {BN}
        }}""",
        {"W": randn(*w_shape, dtype=np.float16, seed=1), **params},
    )
    result = assert_kept(model, SkipReason.OVERFLOW)
    assert "float16" in result.decisions[0].detail


def test_non_float_param_kept():
    params = bn_params(6)
    params["mean"] = np.arange(6, dtype=np.int64)  # not a valid model: the pass keeps it anyway
    assert_kept(conv_bn_model(params=params), SkipReason.UNSUPPORTED_DTYPE, run=None, check=False)


def test_channel_count_mismatch_kept():
    model = conv_bn_model(params=bn_params(4))  # the Conv produces 6 channels
    # An invalid model (ORT and the checker reject it too); the pass must not make it worse.
    assert_kept(model, SkipReason.SHAPE_MISMATCH, run=None, check=False)


def test_bn_after_relu_kept():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            r = Conv <pads = [1, 1, 1, 1]> (X, W)
            c = Relu (r)
            Y = {BN}
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)},
    )
    assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)


def test_bn_on_graph_input_kept():
    model = model_from_text(
        f"""{H17}
        g (float[2,6,5,5] c) => (float[2,6,5,5] Y) {{
            Y = {BN}
        }}""",
        bn_params(6),
    )
    assert_kept(model, SkipReason.NO_PRODUCER)


IF_MODEL = f"""{H17}
    g (bool cond, float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
        c = Conv <pads = [1, 1, 1, 1]> (X, W)
        Y = If (cond) <
            then_branch = then_g () => (float[2,6,5,5] t) {{
                t = {BN}
            }},
            else_branch = else_g () => (float[2,6,5,5] e) {{
                e = Relu (c)
            }}
        >
    }}"""


def test_bn_in_if_branch_kept():
    # The Conv is in the main graph, the BN in a branch: folding would change c for the other branch.
    # (BNs whose producer is inside the branch fold: tests/test_subgraphs.py.)
    model = model_from_text(IF_MODEL, {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)})
    result = assert_kept(model, SkipReason.IN_SUBGRAPH)
    (decision,) = result.decisions
    assert decision.graph != "main" and "If" in decision.detail


def test_bn_in_function_kept():
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {
            Y = local.ConvBN (X, W, scale, B, mean, var)
        }
        <domain: "local", opset_import: ["" : 17]>
        ConvBN (x, w, s, b, m, v) => (y) {
            c = Conv (x, w)
            y = BatchNormalization (c, s, b, m, v)
        }""",
        {"W": randn(6, 4, 1, 1, seed=1), **bn_params(6)},
    )
    result = assert_kept(model, SkipReason.IN_SUBGRAPH)
    assert "ConvBN" in result.decisions[0].detail


# ================================================================================ decisions, the pass
def test_every_bn_has_exactly_one_decision():
    model = model_from_text(
        f"""{H17}
        g (bool cond, float[2,4,5,5] X) => (float[2,6,5,5] Y, float[2,4,5,5] Z, float[2,6,5,5] V) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            [bn_folded] y1 = {BN}
            r = Relu (y1)
            [bn_after_relu] Y = BatchNormalization (r, scale, B, mean, var)
            [bn_on_input] Z = BatchNormalization (X, in_scale, in_B, in_mean, in_var)
            [if_node] V = If (cond) <
                then_branch = then_g () => (float[2,6,5,5] t) {{
                    [bn_in_branch] t = BatchNormalization (r, scale, B, mean, var)
                }},
                else_branch = else_g () => (float[2,6,5,5] e) {{
                    e = Conv <pads = [1, 1, 1, 1]> (X, W)
                }}
            >
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6), **bn_params(4, seed=3, prefix="in_")},
    )

    result = assert_folds(model, 1)

    by_name = {d.name: d for d in result.decisions}
    assert sorted(by_name) == ["bn_after_relu", "bn_folded", "bn_in_branch", "bn_on_input"]
    assert by_name["bn_folded"].folded
    assert by_name["bn_after_relu"].reason == SkipReason.UNSUPPORTED_PRODUCER
    assert by_name["bn_on_input"].reason == SkipReason.NO_PRODUCER
    assert by_name["bn_in_branch"].reason == SkipReason.IN_SUBGRAPH
    assert "if_node" in by_name["bn_in_branch"].detail


def test_pass_runs_on_its_own():
    ir_model = ir.serde.deserialize_model(conv_bn_model())
    fold_pass = BatchNormFoldPass()

    first = fold_pass(ir_model)
    assert isinstance(first, ir.passes.PassResult)
    assert first.modified is True and first.model is ir_model
    assert [d.folded for d in fold_pass.decisions] == [True]
    assert [n.op_type for n in ir_model.graph] == ["Conv"]

    again = fold_pass(ir_model)
    assert again.modified is False and fold_pass.decisions == []


def test_pass_reports_unmodified_when_everything_is_kept():
    ir_model = ir.serde.deserialize_model(
        conv_bn_model(params=_with(bn_params(6), "mean", 0, np.inf))
    )
    fold_pass = BatchNormFoldPass()
    result = fold_pass(ir_model)
    assert result.modified is False
    assert [d.reason for d in fold_pass.decisions] == [SkipReason.INVALID_PARAMS]
    assert count_op(ir.serde.serialize_model(ir_model), "BatchNormalization") == 1
    assert not unused_initializers(ir.serde.serialize_model(ir_model))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_bn_with_a_large_mean_is_kept(dtype):
    """|mean|/std = 50 > 16: the fold would move the cancellation x − μ into rounded weights."""
    params = bn_params(6, np.float32)
    params["mean"][:] = 50.0
    params["var"][:] = 1.0
    params = {k: v.astype(dtype) for k, v in params.items()}
    opset = 17 if dtype == np.float16 else 22
    elem = "float16" if dtype == np.float16 else "bfloat16"
    model = model_from_text(
        f"""<ir_version: 10, opset_import: ["" : {opset}]>
        g ({elem}[2,4,5,5] X) => ({elem}[2,6,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = {BN}
        }}""",
        {"W": randn(6, 4, 3, 3, dtype=dtype, seed=1), **params},
    )
    result = assert_kept(model, SkipReason.PRECISION_LOSS, run=None)
    assert "|mean|/std = 50" in result.decisions[0].detail


def test_float32_bn_with_a_large_mean_still_folds():
    params = bn_params(6)
    params["mean"][:] = 50.0
    params["var"][:] = 1.0
    assert_folds(conv_bn_model(params=params), 1)


def test_conv_bias_of_the_wrong_shape_is_kept_not_a_crash():
    """A corrupt model (bias [3] on a 6-channel Conv): the pass must keep the BN, not raise."""
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W, Bc)
            Y = {BN}
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), "Bc": randn(3, seed=2), **bn_params(6)},
    )
    result = assert_kept(model, SkipReason.SHAPE_MISMATCH, run=None, check=False)
    assert "bias has shape [3]" in result.decisions[0].detail
