"""Calibrated equality (issue 12): correct folds of deep nets pass, above-noise fold bugs fail."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from deep_models import convtranspose_square, deep_resnet
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.calibrate import FACTOR, perturb_parameters, verify_calibrated

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import mutations  # noqa: E402


@pytest.fixture(scope="module")
def deep():
    """The issue's false-refusal case: 50 layers, logits ~1.6e5, and its correct fold."""
    model = deep_resnet(50, size=32, gain=1.4, seed=0)
    return model, bnfold.fold(model, verify=False).model


def test_deep_net_correct_fold_passes_where_a_fixed_tolerance_refuses(deep):
    model, folded = deep
    result = verify_calibrated(model, folded)
    out = result.outputs[0]
    assert result.passed and result.status == "passed", out
    assert out.mode == "calibrated" and out.scale > 1e5
    assert 0 < out.error <= out.threshold and out.margin >= 1
    assert out.noise_sources["ort_basic"] > 0 and out.noise_sources["weight_ulp"] > 0
    line = out.summary()
    assert line.startswith("'logits': ok, error") and "ort_basic" in line and "\n" not in line
    # the same error is beyond the old fixed default (atol = rtol = 1e-4) on some element, and
    # an explicit tolerance keeps meaning exactly that: element-wise, no calibration
    strict = verify_calibrated(model, folded, atol=1e-4, rtol=1e-4)
    assert not strict.passed and strict.outputs[0].mode == "tolerance"
    assert strict.outputs[0].noise == out.noise  # the noise is still measured and reported
    loose = verify_calibrated(model, folded, atol=10.0, rtol=0.0)
    assert loose.passed and loose.outputs[0].atol == 10.0


def _plus(model: onnx.ModelProto, index: int, delta: float) -> onnx.ModelProto:
    """``model`` with ``delta`` added to element ``index`` of its (only) output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0].name
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = "pre_" + out
    width = m.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    d = np.zeros((1, width), np.float32)
    d[0, index] = delta
    m.graph.initializer.append(numpy_helper.from_array(d, "delta"))
    m.graph.node.append(helper.make_node("Add", ["pre_" + out, "delta"], [out]))
    return m


def test_issue_case_near_zero_logit_off_by_0_14_passes(deep):
    model, _ = deep
    from bnfold import _ort

    session = _ort.make_session(model.SerializeToString())
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    logits = _ort.run(session, feeds)[0]
    near_zero = int(np.argmin(np.abs(logits)))
    result = verify_calibrated(model, _plus(model, near_zero, 0.14), feeds=[feeds])
    out = result.outputs[0]
    assert abs(out.error - 0.14) < 0.01 and out.error / out.scale < 1e-6
    assert result.passed, out
    # ... while an error 3x beyond the threshold, at the same element, is refused
    bad = verify_calibrated(model, _plus(model, near_zero, 3 * out.threshold), feeds=[feeds])
    assert not bad.passed and bad.status == "failed"


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda n=n: onnx.load(str(ROOT / "sample_models" / f"{n}.onnx")), id=n)
        for n in ("cnn2d", "decoder_convtranspose", "mlp_bn")
    ]
    + [pytest.param(lambda: deep_resnet(18, size=32, gain=1.0, dtype=np.float16), id="fp16")]
    + [pytest.param(convtranspose_square, id="deconv_square")],
)
def test_every_above_noise_mutant_fails_and_the_correct_fold_passes(build):
    model = build()
    feeds = mutations._feeds(model)
    row = mutations.measure(mutations.Subject("m", model, feeds), k=10.0)
    assert row is not None and row.above > 0
    assert not row.cal_refused_correct
    assert row.cal_caught == row.above, row.missed


def test_mutant_kinds_covered():
    """The benchmark's mutants include every kind the issue lists (on models that allow it)."""
    kinds = set()
    for name in ("cnn2d", "decoder_convtranspose", "mlp_bn"):
        model = onnx.load(str(ROOT / "sample_models" / f"{name}.onnx"))
        result = bnfold.fold(model, verify=False)
        kinds |= {k for k, _ in mutations.mutants(model, result.model, result.decisions)}
    for extra in (deep_resnet(6, size=16), convtranspose_square()):
        result = bnfold.fold(extra, verify=False)
        kinds |= {k for k, _ in mutations.mutants(extra, result.model, result.decisions)}
    kinds |= {k.split("@")[0] for k in kinds}
    assert kinds >= {
        "wrong_eps",
        "bias_missing",
        "bias_shift",
        "channel_scale",
        "swap_channels",
        "transposed",
        "wrong_axis",
    }
    assert "wrong_axis@ConvTranspose" in kinds


def test_unrunnable_reference_is_unverified_not_passed():
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.com")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.com", 1)]
    )
    result = verify_calibrated(model, model)
    assert not result.passed and result.status == "unverified"
    assert "reference" in result.unverified_reason
    assert result.to_dict()["status"] == "unverified"


def test_integer_outputs_are_exact_and_tolerances_are_per_output():
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "k"], ["y"]),
            helper.make_node("Cast", ["y"], ["i"], to=TensorProto.INT64),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3]),
        ],
        [numpy_helper.from_array(np.float32(1000.0).reshape(()), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.float32(1000.5).reshape(()), "k")
    )
    result = verify_calibrated(model, other)
    modes = {o.name: o.mode for o in result.outputs}
    assert modes == {"y": "calibrated", "i": "exact"}
    assert not result.passed
    given = verify_calibrated(model, other, output_tolerances={"y": (10.0, 0.0)})
    assert {o.name: o.mode for o in given.outputs} == {"y": "tolerance", "i": "exact"}
    assert given.outputs[0].passed
    with pytest.raises(bnfold.BnfoldError, match="not an output"):
        verify_calibrated(model, other, output_tolerances={"nope": (1.0, 1.0)})


def test_perturbation_touches_parameters_not_shapes():
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"]),
            helper.make_node("Reshape", ["c", "shape"], ["r"]),
            helper.make_node("Mul", ["r", "k"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.full((4, 2, 1, 1), 0.3, np.float32), "w"),
            numpy_helper.from_array(np.full(4, 0.7, np.float32), "b"),
            numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
            numpy_helper.from_array(np.full((1,), 3.0, np.float32), "k"),
        ],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    assert perturb_parameters(model, seed=1) == 3
    init = model.graph.initializers
    assert init["shape"].const_value.numpy().tolist() == [1, -1]
    w = init["w"].const_value.numpy()
    moved = w != np.float32(0.3)
    assert moved.any() and not moved.all()  # about a quarter of them
    assert np.all(np.abs(w - np.float32(0.3)) <= np.spacing(np.float32(0.3)))
    assert FACTOR >= 1
