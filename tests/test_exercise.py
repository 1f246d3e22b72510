"""Input sizes that exercise every weight (issue 12, vacuous passes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from deep_models import corner_tap_pair
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold import io
from bnfold.errors import UsageError
from bnfold.exercise import UNCONSTRAINED, InputShapeError, derive_input_shapes


def _model(nodes, inits, in_shape, out_name="y", elem=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, in_shape)],
        [helper.make_tensor_value_info(out_name, elem, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _w(name: str, shape) -> onnx.TensorProto:
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def test_corner_taps_are_caught_with_derived_shapes_and_missed_at_1x1():
    model, candidate = corner_tap_pair()
    shapes = derive_input_shapes(io.from_proto(model))
    n, c, h, w = shapes["x"]
    assert (n, c) == (1, 4) and h >= 2 and w >= 2
    assert not bnfold.verify(model, candidate, input_shapes=shapes)
    # what verification used before: every symbolic dim 1, only the centre tap is ever read
    assert bnfold.verify(model, candidate, input_shapes={"x": (1, 4, 1, 1)})


def test_flatten_gemm_fixes_the_spatial_size():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"]),
    ]
    model = _model(nodes, [_w("w", (2, 3, 3, 3)), _w("fc", (2 * 5 * 5, 7))], ["N", 3, "H", "W"])
    assert derive_input_shapes(io.from_proto(model)) == {"x": (1, 3, 5, 5)}
    # K = 2*5*6 needs H != W (or a non-square size): no single size fits -> ask for --input-shape
    bad = _model(nodes, [_w("w", (2, 3, 3, 3)), _w("fc", (2 * 5 * 6, 7))], ["N", 3, "H", "W"])
    with pytest.raises(InputShapeError, match="--input-shape x=") as info:
        derive_input_shapes(io.from_proto(bad))
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    assert "\n" not in str(info.value)
    # ... and a shape the user gives is used as given
    given = derive_input_shapes(io.from_proto(bad), {"x": (2, 3, 5, 6)})
    assert given == {"x": (2, 3, 5, 6)}


def _covers_every_tap(size: int, k: int, s: int, d: int, pb: int) -> tuple[bool, int]:
    out = (size + 2 * pb - (d * (k - 1) + 1)) // s + 1
    if out < 1:
        return False, out
    ok = all(any(0 <= o * s - pb + j * d < size for o in range(out)) for j in range(k))
    return ok, out


@pytest.mark.parametrize("k,s,d,p", [(3, 1, 1, 1), (3, 2, 2, 0), (5, 3, 1, 2), (3, 1, 3, 3)])
def test_receptive_field_through_a_stack_is_the_smallest_that_uses_every_tap(k, s, d, p):
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w1"],
            ["c1"],
            kernel_shape=[k, k],
            strides=[s, s],
            dilations=[d, d],
            pads=[p] * 4,
        ),
        helper.make_node("MaxPool", ["c1"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["m", "w2"], ["y"], kernel_shape=[3, 3]),
    ]
    model = _model(nodes, [_w("w1", (2, 1, k, k)), _w("w2", (2, 2, 3, 3))], ["N", 1, "H", "W"])
    size = derive_input_shapes(io.from_proto(model))["x"][2]

    def fits(n: int) -> bool:
        ok, out = _covers_every_tap(n, k, s, d, p)
        if not ok:
            return False
        pooled = (out - 2) // 2 + 1
        return pooled >= 3 and _covers_every_tap(pooled, 3, 1, 1, 0)[0]

    assert fits(size) and not any(fits(n) for n in range(1, size))


def test_unconstrained_and_fixed_dims():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [], ["N", "T"])
    assert derive_input_shapes(io.from_proto(model)) == {"x": (1, UNCONSTRAINED)}
    fixed = _model([helper.make_node("Relu", ["x"], ["y"])], [], [3, 5])
    assert derive_input_shapes(io.from_proto(fixed)) == {"x": (3, 5)}


def test_conv_transpose_taps_must_land_in_the_output():
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[2, 2, 2, 2])
    ]
    model = _model(nodes, [_w("w", (1, 2, 3, 3))], ["N", 1, "H", "W"])
    h = derive_input_shapes(io.from_proto(model))["x"][2]
    # output length h + 2 - 4 = h - 2 must be >= 1 and every tap j must hit [0, h - 2)
    assert h == 3
