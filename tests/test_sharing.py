"""Folded constants with identical bytes are one initializer (``bnfold.passes.sharing``).

ONNX Runtime merges two nodes (CommonSubexpressionElimination) only when they read the same
values; the fold must not hide branches that compute the same thing behind separate, bit-identical
initializers (the light model-zoo ``light_inception_v2`` ran 9 more Convs after folding).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.passes.weights import DEFER_MIN_BYTES
from tests.helpers import assert_close, bn_params, fold, model_from_text, random_feeds, run_ort

TWO_BRANCHES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 8, 8] x) => (float[1, 8, 8, 8] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
    b1 = BatchNormalization (c1, bn1_scale, bn1_B, bn1_mean, bn1_var)
    r1 = Relu (b1)
    c2 = Conv <pads = [1, 1, 1, 1]> (x, w2)
    b2 = BatchNormalization (c2, bn2_scale, bn2_B, bn2_mean, bn2_var)
    r2 = Relu (b2)
    y = Add (r1, r2)
}
"""


def two_branches(same_bn: bool, cout: int = 8, ir_version: int | None = None) -> onnx.ModelProto:
    """Two Conv → BN → Relu branches on the same input, equal weights in separate initializers."""
    w = np.random.default_rng(0).standard_normal((cout, 3, 3, 3)).astype(np.float32)
    inits = {"w1": w, "w2": w.copy()}
    inits |= bn_params(cout, seed=1, prefix="bn1_")
    inits |= bn_params(cout, seed=1 if same_bn else 2, prefix="bn2_")
    text = TWO_BRANCHES.replace("[1, 8, 8, 8]", f"[1, {cout}, 8, 8]")
    return model_from_text(text, inits, ir_version=ir_version)


def conv_count_after_ort_basic(model: onnx.ModelProto, tmp_path) -> int:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "basic.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "Conv" for n in onnx.load(str(tmp_path / "basic.onnx")).graph.node)


def test_identical_folded_weights_share_one_initializer_and_ort_merges_the_branches(tmp_path):
    model = two_branches(same_bn=True)
    assert conv_count_after_ort_basic(model, tmp_path) == 2  # separate weights: nothing merged
    folded = fold(model).model
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    assert convs[0].input[1:] == convs[1].input[1:]  # weight and bias: the same initializers
    assert len(folded.graph.initializer) == 2
    assert conv_count_after_ort_basic(folded, tmp_path) == 1
    feeds = random_feeds(model)
    assert_close(run_ort(folded, feeds), run_ort(model, feeds))


def test_different_folded_weights_stay_separate():
    folded = fold(two_branches(same_bn=False)).model
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]
    assert convs[0].input[2] != convs[1].input[2]
    assert len(folded.graph.initializer) == 4


def test_below_ir4_the_dropped_duplicate_leaves_the_graph_inputs():
    folded = fold(two_branches(same_bn=True, ir_version=3)).model
    inits = {i.name for i in folded.graph.initializer}
    assert len(inits) == 2
    assert {i.name for i in folded.graph.input} == inits | {"x"}


def test_large_folded_weights_are_not_read_to_be_compared():
    cout = DEFER_MIN_BYTES // (4 * 27) + 1  # each folded weight just over the size limit
    folded = fold(two_branches(same_bn=True, cout=cout)).model
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]  # large: left separate
    assert convs[0].input[2] == convs[1].input[2]  # the small biases are shared
