"""Forward folds: a BN with no producer to fold into folds into the node(s) that consume its output.

Each test checks the structure (BN gone, which nodes remain), equivalence under ONNX Runtime with
optimizations disabled and the full checker (``assert_folded``); the kept cases check the reason and
that the model is unchanged (``helpers.assert_kept``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from foldchecks import assert_equivalent, assert_folded, fold_checked, ops
from helpers import assert_kept, bn_params, const_values, model_from_text, randn, run_ort

from bnfold.passes import forward_targets
from bnfold.report import SkipReason

H17 = '<ir_version: 8, opset_import: ["" : 17]>'
BN = "y = BatchNormalization (x, scale, B, mean, var)"
SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def positive(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same BN with every scale > 0."""
    return {**params, "scale": np.abs(params["scale"]) + np.float32(0.1)}


def dims(*shape) -> str:
    return ",".join(str(d) for d in shape)


def conv_of(result, index: int = 0) -> onnx.NodeProto:
    return [n for n in result.model.graph.node if n.op_type == "Conv"][index]


# ============================================================================== into Conv, no padding
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "cin, cout, group", [(4, 6, 1), (4, 6, 2), (4, 4, 4)], ids=["group1", "group2", "depthwise"]
)
@pytest.mark.parametrize("spatial", [(7,), (5, 6), (4, 4, 3)], ids=["1d", "2d", "3d"])
def test_into_unpadded_conv(spatial, cin, cout, group, bias):
    rank = len(spatial)
    inits = {"W": randn(cout, cin // group, *(3,) * rank, seed=1), **bn_params(cin)}
    if bias:
        inits["b"] = randn(cout, seed=2)
    out = tuple(d - 2 for d in spatial)
    model = model_from_text(
        f"""{H17}
        g (float[2,{cin},{dims(*spatial)}] x) => (float[2,{cout},{dims(*out)}] Y) {{
            {BN}
            Y = Conv <group = {group}> (y, W{", b" if bias else ""})
        }}""",
        inits,
    )

    result = assert_folded(model, "forward")

    assert ops(result.model) == ["Conv"]
    conv = conv_of(result)
    assert conv.input[0] == "x" and len(conv.input) == 3, (
        "the Conv reads the BN's input; a bias is created"
    )
    (d,) = result.decisions
    assert d.target_op == "Conv" and "input channels" in d.detail
    assert not np.array_equal(const_values(result.model)[conv.input[1]], inits["W"])


# ============================================================================== into Conv, padded
PADDED = {
    "pads1": "pads = [1, 1, 1, 1]",
    "pads_asymmetric": "pads = [0, 2, 1, 0]",
    "stride2": "pads = [1, 1, 1, 1], strides = [2, 2]",
    "dilation2": "pads = [2, 2, 2, 2], dilations = [2, 2]",
    "same_upper_stride2": 'auto_pad = "SAME_UPPER", strides = [2, 2]',
    "same_lower": 'auto_pad = "SAME_LOWER"',
    "group2": "pads = [1, 1, 1, 1], group = 2",
}


@pytest.mark.parametrize("attrs", list(PADDED))
def test_into_padded_conv_compensates_the_border(attrs):
    group = 2 if "group" in PADDED[attrs] else 1
    model = model_from_text(
        f"""{H17}
        g (float[2,4,7,6] x) => (float[2,6,H,W] Y) {{
            {BN}
            Y = Conv <{PADDED[attrs]}> (y, W, b)
        }}""",
        {"W": randn(6, 4 // group, 3, 3, seed=1), "b": randn(6, seed=2), **bn_params(4)},
    )

    result = assert_folded(model, "forward", allow_slower_folds=True)

    assert ops(result.model) == ["Conv", "Add"]
    conv, add = result.model.graph.node
    assert add.input[0] == conv.output[0] and add.output[0] == "Y", (
        "the graph output keeps its name"
    )
    (y,) = onnx.shape_inference.infer_shapes(model).graph.output
    want = (1, 6) + tuple(d.dim_value for d in y.type.tensor_type.shape.dim[2:])
    correction = const_values(result.model)[add.input[1]]
    assert correction.shape == want
    assert np.any(correction) and "border correction" in result.decisions[0].detail


def test_padded_conv_with_zero_shift_needs_no_correction():
    params = bn_params(4)
    params["B"][:] = 0
    params["mean"][:] = 0  # t = β − μ·s = 0: the padded zeros stay zeros
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] x) => (float[2,6,5,5] Y) {{
            {BN}
            Y = Conv <pads = [1, 1, 1, 1]> (y, W)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **params},
    )

    result = assert_folded(model, "forward")

    assert ops(result.model) == ["Conv"]


def test_padded_conv_with_unknown_spatial_size_kept():
    model = model_from_text(
        f"""{H17}
        g (float[N,4,H,W] x) => (float[N,6,H,W] Y) {{
            {BN}
            Y = Conv <pads = [1, 1, 1, 1]> (y, W)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(4)},
    )
    result = assert_kept(model, SkipReason.PADDED_CONSUMER)
    assert "not static" in result.decisions[0].detail


def test_padded_conv_correction_too_large_kept(monkeypatch):
    monkeypatch.setattr(
        forward_targets, "MAX_BORDER_CORRECTION", 100
    )  # 6 x 5 x 5 = 150 values needed
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] x) => (float[2,6,5,5] Y) {{
            {BN}
            Y = Conv <pads = [1, 1, 1, 1]> (y, W)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(4)},
    )
    result = assert_kept(model, SkipReason.PADDED_CONSUMER)
    assert "150" in result.decisions[0].detail


# ============================================================================ through per-channel ops
KERAS = f"""{H17}
    g (float[2,3,12,12] X) => (float[2,8,6,6] Y) {{
        r = Conv <pads = [1, 1, 1, 1]> (X, W1, b1)
        x = Relu (r)
        {BN}
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (y)
        Y = Conv <pads = [1, 1, 1, 1]> (p, W2, b2)
    }}"""


def keras_inits(params):
    return {
        "W1": randn(4, 3, 3, 3, seed=1),
        "b1": randn(4, seed=2),
        "W2": randn(8, 4, 3, 3, seed=3),
        "b2": randn(8, seed=4),
        **params,
    }


def test_keras_style_through_maxpool():
    # Conv → ReLU → BN → MaxPool → Conv: the BN cannot fold backward (ReLU), but with every scale
    # > 0 it commutes with MaxPool and folds into the next Conv.
    model = model_from_text(KERAS, keras_inits(positive(bn_params(4))))

    result = assert_folded(model, "forward", allow_slower_folds=True)

    assert ops(result.model) == ["Conv", "Relu", "MaxPool", "Conv", "Add"]
    (d,) = result.decisions
    assert "MaxPool" in d.detail and d.target_op == "Conv"


def test_negative_scale_does_not_pass_maxpool():
    model = model_from_text(KERAS, keras_inits(bn_params(4)))  # bn_params has a negative γ
    result = assert_kept(model, SkipReason.NON_POSITIVE_SCALE)
    assert "MaxPool" in result.decisions[0].detail


def test_maxpool_with_padding_and_ceil_mode():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,7,7] X) => (float[2,6,4,4] Y) {{
            x = Relu (X)
            {BN}
            p = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1], ceil_mode = 1> (y)
            Y = Conv (p, W)
        }}""",
        {"W": randn(6, 4, 1, 1, seed=1), **positive(bn_params(4))},
    )
    assert_folded(model, "forward")


def test_maxpool_indices_used_kept():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,6,6] X) => (float[2,6,3,3] Y, int64[2,4,3,3] I) {{
            x = Relu (X)
            {BN}
            p, I = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (y)
            Y = Conv (p, W)
        }}""",
        {"W": randn(6, 4, 1, 1, seed=1), **positive(bn_params(4))},
    )
    assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)


@pytest.mark.parametrize(
    "pool, folds",
    [
        ("AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 0>", True),
        ("AveragePool <kernel_shape = [3, 3], count_include_pad = 1>", True),
        ("AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 1>", False),
        ("GlobalAveragePool", True),
    ],
    ids=["avg_pad_not_counted", "avg_unpadded", "avg_pad_counted", "global_avg"],
)
def test_through_average_pool(pool, folds):
    out = "1,1" if pool == "GlobalAveragePool" else ("6,6" if "pads" in pool else "4,4")
    model = model_from_text(
        f"""{H17}
        g (float[2,4,6,6] X) => (float[2,5,{out}] Y) {{
            x = Relu (X)
            {BN}
            p = {pool} (y)
            Y = Conv (p, W, b)
        }}""",
        {"W": randn(5, 4, 1, 1, seed=1), "b": randn(5, seed=2), **bn_params(4)},
    )
    if folds:
        result = assert_folded(model, "forward")
        assert ops(result.model) == ["Relu", pool.split()[0], "Conv"]
    else:
        assert_kept(model, SkipReason.PADDED_CONSUMER)


def test_through_identity_and_inference_dropout():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            x = Relu (X)
            {BN}
            i = Identity (y)
            d = Dropout <seed = 1> (i, ratio)
            Y = Conv (d, W)
        }}""",
        {"W": randn(6, 4, 1, 1, seed=1), "ratio": np.array(0.5, np.float32), **bn_params(4)},
    )
    assert_folded(model, "forward")


def test_training_dropout_is_not_passed():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            x = Relu (X)
            {BN}
            d = Dropout <seed = 1> (y, ratio, training)
            Y = Conv (d, W)
        }}""",
        {
            "W": randn(6, 4, 1, 1, seed=1),
            "ratio": np.array(0.5, np.float32),
            "training": np.array(True),
            **bn_params(4),
        },
    )
    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER, run=None)
    assert "training mode" in result.decisions[0].detail


def test_relu_does_not_commute():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            x = Relu (X)
            {BN}
            r = Relu (y)
            Y = Conv (r, W)
        }}""",
        {"W": randn(6, 4, 1, 1, seed=1), **positive(bn_params(4))},
    )
    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)
    assert "feeds Relu" in result.decisions[0].detail


# ============================================================================ into Gemm / MatMul
CNN1D_TAIL = {
    "flatten": "f = Flatten (y)",
    "flatten_after_maxpool": "p = MaxPool <kernel_shape = [1]> (y)\n f = Flatten (p)",
    "reshape_0_-1": "f = Reshape (y, shape0)",
    "reshape_-1_K": "f = Reshape (y, shape1)",
    "reshape_computed": "n = Shape <end = 1> (y)\n s = Concat <axis = 0> (n, minus1)\n f = Reshape (y, s)",
}


@pytest.mark.parametrize("head", ["gemm_transB", "gemm_alpha_beta", "matmul_add", "matmul"])
@pytest.mark.parametrize("tail", list(CNN1D_TAIL))
def test_1d_cnn_last_bn_into_linear(tail, head):
    # Conv1d → ReLU → BN → Flatten → Linear: channel c covers features c·L … (c+1)·L − 1.
    c, length, n_out = 4, 6, 5
    k = c * length
    line = {
        "gemm_transB": "Y = Gemm <transB = 1> (f, Wt, b)",
        "gemm_alpha_beta": "Y = Gemm <alpha = 0.5, beta = 2.0> (f, Wk, b)",
        "matmul_add": "m = MatMul (f, Wk)\n Y = Add (m, b)",
        "matmul": "Y = MatMul (f, Wk)",
    }[head]
    model = model_from_text(
        f"""{H17}
        g (float[N,3,{length}] X) => (float[N,{n_out}] Y) {{
            r = Conv <pads = [1, 1]> (X, W1)
            x = Relu (r)
            {BN}
            {CNN1D_TAIL[tail]}
            {line}
        }}""",
        {
            "W1": randn(c, 3, 3, seed=1),
            "Wt": randn(n_out, k, seed=2),
            "Wk": randn(k, n_out, seed=3),
            "b": randn(n_out, seed=4),
            "shape0": np.array([0, -1], np.int64),
            "shape1": np.array([-1, k], np.int64),
            "minus1": np.array([-1], np.int64),
            **positive(bn_params(c)),
        },
    )
    if tail == "reshape_computed":  # exporters annotate it (shape inference cannot: N is symbolic)
        model.graph.value_info.append(
            onnx.helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT, ["N", k])
        )
    # the initializers a head does not read would be unused: drop them
    used = {i for node in model.graph.node for i in node.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)

    result = assert_folded(model, "forward")

    (d,) = result.decisions
    assert d.target_op in ("Gemm", "MatMul") and f"{length}" in d.detail
    if head == "matmul":
        assert ops(result.model)[-2:] == ["MatMul", "Add"], "an Add of the shift is created"
    if head == "gemm_alpha_beta":
        gemm = result.model.graph.node[-1]
        assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}.get(
            "beta", 1.0
        ) == 1.0


def test_flatten_with_unknown_length_kept():
    model = model_from_text(
        f"""{H17}
        g (float[N,3,L] X) => (float[N,5] Y) {{
            r = Conv <pads = [1, 1]> (X, W1)
            x = Relu (r)
            {BN}
            f = Flatten (y)
            Y = MatMul (f, W)
        }}""",
        {"W1": randn(4, 3, 3, seed=1), "W": randn(24, 5, seed=2), **bn_params(4)},
    )
    assert_kept(model, SkipReason.UNKNOWN_SHAPE, run=None)


def test_computed_reshape_to_batch_and_minus1_folds():
    # [N, -1] built from the BN output's own batch dim: a flatten to [N, 24] (issue 13)
    model = model_from_text(
        f"""{H17}
        g (float[N,4,6] X) => (float[N,5] Y) {{
            x = Relu (X)
            {BN}
            n = Shape <end = 1> (y)
            s = Concat <axis = 0> (n, minus1)
            f = Reshape (y, s)
            Y = MatMul (f, W)
        }}""",
        {"W": randn(24, 5, seed=2), "minus1": np.array([-1], np.int64), **bn_params(4)},
    )
    result = assert_folded(model, "forward")
    assert "blocks of 6" in result.decisions[0].detail


def test_computed_reshape_of_unknown_output_shape_kept():
    # the feature count comes from a graph input: nothing says it flattens to [N, 24]
    model = model_from_text(
        f"""{H17}
        g (float[N,4,6] X, int64[1] K) => (float[N,5] Y) {{
            x = Relu (X)
            {BN}
            n = Shape <end = 1> (y)
            s = Concat <axis = 0> (n, K)
            f = Reshape (y, s)
            Y = MatMul (f, W)
        }}""",
        {"W": randn(24, 5, seed=2), **bn_params(4)},
    )
    assert_kept(model, SkipReason.UNKNOWN_SHAPE, run=None)


def test_reshape_that_is_not_a_flatten_kept():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,6] X) => (float[8,5] Y) {{
            x = Relu (X)
            {BN}
            f = Reshape (y, shape)
            Y = MatMul (f, W)
        }}""",
        {"W": randn(6, 5, seed=2), "shape": np.array([8, 6], np.int64), **bn_params(4)},
    )
    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)
    assert "Reshape" in result.decisions[0].detail


@pytest.mark.parametrize(
    "c_shape", [None, (5,), (1, 5), (3, 5)], ids=["no_C", "C[N]", "C[1,N]", "C[M,N]"]
)
@pytest.mark.parametrize("attrs", ["transB = 0", "transB = 1", "alpha = 0.5, beta = -1.5"])
def test_bn1d_into_gemm(attrs, c_shape):
    trans_b = "transB = 1" in attrs
    inits = {
        "W1": randn(6, 4, seed=1),
        "W2": randn(*((5, 4) if trans_b else (4, 5)), seed=2),
        **bn_params(4),
    }
    if c_shape:
        inits["C"] = randn(*c_shape, seed=3)
    model = model_from_text(
        f"""{H17}
        g (float[3,6] X) => (float[3,5] Y) {{
            h = MatMul (X, W1)
            x = Relu (h)
            {BN}
            Y = Gemm <{attrs}> (y, W2{", C" if c_shape else ""})
        }}""",
        inits,
    )

    result = assert_folded(model, "forward")

    gemm = result.model.graph.node[-1]
    assert len(gemm.input) == 3
    assert const_values(result.model)[gemm.input[2]].shape == (c_shape or (5,))


def test_gemm_trans_a_kept():
    model = model_from_text(
        f"""{H17}
        g (float[5,3] x) => (float[3,4] Y) {{
            {BN}
            Y = Gemm <transA = 1> (y, W)
        }}""",
        {"W": randn(5, 4, seed=1), **bn_params(3)},
    )
    assert_kept(model, SkipReason.UNSUPPORTED_LAYOUT)


# ============================================================================== choices and sharing
def test_backward_is_preferred():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,3,5,5] Y) {{
            x = Conv (X, W1)
            {BN}
            Y = Conv (y, W2)
        }}""",
        {"W1": randn(6, 4, 1, 1, seed=1), "W2": randn(3, 6, 1, 1, seed=2), **bn_params(6)},
    )
    result = assert_folded(model, "backward")
    assert result.decisions[0].target == "<Conv → x>"


def test_forward_when_the_producer_output_is_shared():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,3,5,5] Y, float[2,6,5,5] Z) {{
            x = Conv (X, W1)
            Z = Relu (x)
            {BN}
            Y = Conv (y, W2)
        }}""",
        {"W1": randn(6, 4, 1, 1, seed=1), "W2": randn(3, 6, 1, 1, seed=2), **bn_params(6)},
    )
    result = assert_folded(model, "forward")
    assert result.decisions[0].target == "<Conv → Y>"


def test_folds_into_every_consumer():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,6,6] X) => (float[2,3,6,6] A, float[2,5,6,6] Bo, float[2,2,3,3] Co) {{
            x = Relu (X)
            {BN}
            A = Conv (y, Wa)
            Bo = Conv <pads = [1, 1, 1, 1]> (y, Wb, bb)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (y)
            Co = Conv (p, Wc)
        }}""",
        {
            "Wa": randn(3, 4, 1, 1, seed=1),
            "Wb": randn(5, 4, 3, 3, seed=2),
            "bb": randn(5, seed=3),
            "Wc": randn(2, 4, 1, 1, seed=4),
            **positive(bn_params(4)),
        },
    )

    result = assert_folded(model, "forward", allow_slower_folds=True)

    (d,) = result.decisions
    assert d.target.count(",") == 2 and d.target_op == "Conv"
    assert [o.name for o in result.model.graph.output] == ["A", "Bo", "Co"]


def test_one_unfoldable_consumer_keeps_the_bn():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,6,6] X) => (float[2,3,6,6] A, float[2,4,6,6] R) {{
            x = Relu (X)
            {BN}
            A = Conv (y, Wa)
            R = Relu (y)
        }}""",
        {"Wa": randn(3, 4, 1, 1, seed=1), **bn_params(4)},
    )
    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)
    assert "Relu" in result.decisions[0].detail


def test_float16_overflow_kept():
    params = bn_params(4, np.float16)
    params["scale"][0], params["var"][0], params["mean"][0] = 30000.0, 0.0, 0.0  # s ≈ 9.5e6
    model = model_from_text(
        f"""{H17}
        g (float16[2,4,5,5] x) => (float16[2,6,5,5] Y) {{
            {BN}
            Y = Conv (y, W)
        }}""",
        {"W": randn(6, 4, 1, 1, dtype=np.float16, seed=1), **params},
    )
    result = assert_kept(model, SkipReason.OVERFLOW)
    assert "float16" in result.decisions[0].detail


def test_float16_forward_fold():
    model = model_from_text(
        f"""{H17}
        g (float16[2,4,5,5] X) => (float16[2,6,5,5] Y) {{
            x = Relu (X)
            {BN}
            Y = Conv <pads = [1, 1, 1, 1]> (y, W, b)
        }}""",
        {
            "W": randn(6, 4, 3, 3, dtype=np.float16, seed=1),
            "b": randn(6, dtype=np.float16, seed=2),
            **bn_params(4, np.float16),
        },
    )
    assert_folded(model, "forward", allow_slower_folds=True)


# ============================================================================== the sample model
def test_keras_style_sample_folds_completely():
    model = onnx.load(str(SAMPLES / "keras_style.onnx"))
    result = fold_checked(model, allow_slower_folds=True)
    assert [d.direction for d in result.decisions] == ["forward", "forward"]
    assert [d.target_op for d in result.decisions] == ["Conv", "Gemm"]
    feeds = {"input": np.random.default_rng(0).standard_normal((3, 3, 28, 28)).astype(np.float32)}
    assert_equivalent(model, result.model, feeds=feeds)
    assert run_ort(result.model, feeds)[0].shape == (3, 10)


# ============================================================================== the cost rule
def test_padded_forward_fold_is_kept_for_cost_by_default():
    # The Keras pattern: the fold would need a border-correction Add after the second Conv, which
    # was measured slower at ONNX Runtime level 'all'; by default the BN stays, with its own reason.
    model = model_from_text(KERAS, keras_inits(positive(bn_params(4))))

    result = assert_kept(model, SkipReason.SLOWER_FOLD)

    (d,) = result.decisions
    assert "border-correction Add of 288 elements" in d.detail, d.detail  # 8 x 6 x 6
    assert "BN's 576" in d.detail and "--allow-slower-folds" in d.detail  # 4 x 12 x 12


def test_allow_slower_folds_forces_the_padded_fold():
    model = model_from_text(KERAS, keras_inits(positive(bn_params(4))))

    result = assert_folded(model, "forward", allow_slower_folds=True)

    assert ops(result.model)[-1] == "Add" and "border correction" in result.decisions[0].detail


def test_unpadded_and_shift_free_forward_folds_still_fold_by_default():
    # No Add is needed: an unpadded Conv, and a padded Conv whose shift is zero.
    unpadded = model_from_text(
        f"""{H17}
        g (float[2,4,7,7] x) => (float[2,6,5,5] Y) {{
            {BN}
            Y = Conv (y, W)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(4)},
    )
    params = bn_params(4)
    params["B"][:], params["mean"][:] = 0, 0
    shift_free = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] x) => (float[2,6,5,5] Y) {{
            {BN}
            Y = Conv <pads = [1, 1, 1, 1]> (y, W)
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **params},
    )
    for model in (unpadded, shift_free):
        assert ops(assert_folded(model, "forward").model) == ["Conv"]


def test_keras_sample_keeps_the_padded_bn_and_folds_the_other():
    model = onnx.load(str(SAMPLES / "keras_style.onnx"))
    result = fold_checked(model)
    assert [(d.folded, d.reason) for d in result.decisions] == [
        (False, SkipReason.SLOWER_FOLD),
        (True, None),
    ]
