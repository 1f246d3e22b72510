"""A model ONNX Runtime runs (practically) forever: a Loop with a 2^62 trip count."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def endless_loop() -> onnx.ModelProto:
    """``y = x + 2^62 * 1`` computed one iteration at a time (input ``x``: float [1])."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [
            numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def endless_loop_with_bn() -> onnx.ModelProto:
    """:func:`endless_loop` plus a Conv → BatchNormalization branch (input ``z``, output ``w``), so a
    fold has something to fold and then must verify the whole model, Loop included."""
    model = endless_loop()
    g = model.graph
    g.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 3, 3]))
    g.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 2, 3, 3]))
    rng = np.random.default_rng(0)
    params = {
        "cw": rng.standard_normal((2, 2, 1, 1)).astype(np.float32),
        "gamma": np.array([1.5, 0.5], np.float32),
        "beta": np.array([0.1, -0.2], np.float32),
        "mean": np.array([0.3, -0.1], np.float32),
        "var": np.array([2.0, 0.5], np.float32),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in params.items())
    g.node.append(helper.make_node("Conv", ["z", "cw"], ["c"], name="conv"))
    g.node.append(
        helper.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["w"], name="bn"
        )
    )
    return model
