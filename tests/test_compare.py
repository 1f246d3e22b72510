"""Specification of the equivalence check (bnfold.compare) and the ONNX Runtime helper (bnfold._ort).

Models are written in ONNX text syntax; a "perturbed" candidate is the same graph with a constant
changed, so the expected error is known exactly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import namedtuple

import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnfold import _ort
from bnfold.compare import (
    OutputComparison,
    VerificationResult,
    compare_outputs,
    default_tolerances,
    make_inputs,
    parse_input_shapes,
    verify_models,
)
from bnfold.errors import InputNotFoundError, InvalidModelError, UsageError

HEADER = '<ir_version: 10, opset_import: ["" : 21]>'


def model(body: str) -> bytes:
    """Serialized model from the graph part of ONNX text syntax."""
    proto = onnx.parser.parse_model(f"{HEADER}\n{body}")
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def add_model(c: str = "1.0, 2.0, 3.0") -> bytes:
    """``Y = X + C`` with a dynamic batch dimension."""
    return model(
        f"add (float[N, 3] X) => (float[N, 3] Y) <float[3] C = {{{c}}}> {{ Y = Add(X, C) }}"
    )


def two_output_model(c2: str = "2.0") -> bytes:
    """``Y1 = X + 1``, ``Y2 = X * C2``."""
    return model(
        f"two (float[2, 3] X) => (float[2, 3] Y1, float[2, 3] Y2) "
        f"<float C1 = {{1.0}}, float C2 = {{{c2}}}> {{ Y1 = Add(X, C1)  Y2 = Mul(X, C2) }}"
    )


REFERENCE = add_model()
PERTURBED = add_model("1.0, 2.0, 3.5")  # column 2 is off by exactly 0.5


# --- verify_models: the headline behaviour ---------------------------------------------------------


def test_identical_models_pass_with_zero_error():
    result = verify_models(REFERENCE, REFERENCE)

    assert result and result.passed
    assert result.skipped_reason is None and result.message is None
    (out,) = result.outputs
    assert out.name == "Y" and out.dtype == "float32" and out.shape == (1, 3)
    assert out.max_abs_error == out.mean_abs_error == out.median_abs_error == 0
    assert out.max_rel_error == 0
    assert out.mismatched == 0 and out.nan_or_inf_mismatch == 0
    assert out.worst_index is None
    assert out.min_atol_to_pass == 0 and out.min_rtol_to_pass == 0
    # the default verdict is calibrated: the threshold is the measured noise (the Add's constant
    # nudged by one ulp) times FACTOR plus the dtype floor, element-wise with rtol 0
    assert out.mode == "calibrated" and out.rtol == 0 and out.margin == float("inf")
    assert out.noise == max(out.noise_sources["ort_basic"], out.noise_sources["weight_ulp"]) > 0
    assert out.atol == pytest.approx(4 * out.noise + 2 * 2.0**-24 * out.scale)
    assert out.atol == out.threshold


def test_perturbed_constant_fails_with_exact_error_and_location():
    result = verify_models(REFERENCE, PERTURBED, input_shapes={"X": (2, 3)})

    assert not result and result.message is None
    (out,) = result.outputs
    assert not out
    assert out.max_abs_error == pytest.approx(0.5, abs=1e-6)
    assert out.mean_abs_error == pytest.approx(0.5 * 2 / 6, abs=1e-6)
    assert out.median_abs_error == 0
    assert out.worst_index == (0, 2) and out.worst_sample == 0
    assert out.mismatched == 2 and out.elements == 6


def test_models_are_accepted_as_paths_with_external_data(tmp_path):
    proto = onnx.load_from_string(PERTURBED)
    proto.graph.initializer[0].CopyFrom(  # raw_data, so that it can move to the external file
        onnx.numpy_helper.from_array(np.array([1.0, 2.0, 3.5], np.float32), "C")
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").exists()

    result = verify_models(str(tmp_path / "m.onnx"), path)

    assert result.passed and result.outputs[0].max_abs_error == 0


def test_a_model_proto_is_accepted_too():
    assert verify_models(onnx.load_from_string(REFERENCE), REFERENCE).passed


def test_a_missing_path_is_the_users_error(tmp_path):
    with pytest.raises(InputNotFoundError, match="reference model not found"):
        verify_models(tmp_path / "nope.onnx", REFERENCE)


# --- tolerances ------------------------------------------------------------------------------------


def test_default_tolerances_loosen_with_lower_precision_and_are_exact_for_integers():
    f64, f32, f16, bf16 = (
        default_tolerances(np.dtype(t))
        for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)
    )
    for tighter, looser in [(f64, f32), (f32, f16), (f16, bf16)]:
        assert tighter[0] < looser[0] and tighter[1] < looser[1]
    for exact in (np.int64, np.int32, np.uint8, np.bool_):
        assert default_tolerances(exact) == (0.0, 0.0)
    atol, rtol = default_tolerances(ml_dtypes.float8_e4m3fn)  # other floats: in units of eps
    assert atol > 0 and rtol > 0


def test_a_difference_a_float16_model_tolerates_fails_a_float32_model():
    ref = np.array([1.0, 0.0])
    cand = ref + 1e-3

    assert compare_outputs("y", ref.astype(np.float16), cand.astype(np.float16))
    assert not compare_outputs("y", ref.astype(np.float32), cand.astype(np.float32))


def test_verify_picks_tolerances_from_the_output_dtype():
    half = model(
        "h (float16[N, 3] X) => (float16[N, 3] Y) <float[3] C = {1.0, 2.0, 3.0}> "
        "{ H = Cast<to = 10>(C)  Y = Add(X, H) }"
    )
    result = verify_models(half, half, atol=None, rtol=1e-2)

    assert result.passed
    assert (result.outputs[0].atol, result.outputs[0].rtol) == (
        default_tolerances(np.float16)[0],
        1e-2,
    )
    assert result.outputs[0].dtype == "float16" and result.outputs[0].mode == "tolerance"


def test_explicit_atol_overrides_the_default_for_every_output():
    result = verify_models(REFERENCE, PERTURBED, atol=0.5)

    assert result.passed
    assert result.outputs[0].atol == 0.5
    assert result.outputs[0].rtol == default_tolerances(np.float32)[1]


def test_explicit_rtol_can_pass_a_relative_difference():
    ref = np.array([100.0, 200.0], np.float32)
    assert not compare_outputs("y", ref, ref * 1.01)
    assert compare_outputs("y", ref, ref * 1.01, rtol=0.02)


def test_per_output_tolerance_overrides_everything_for_that_output():
    reference, candidate = two_output_model("2.0"), two_output_model("2.5")

    assert not verify_models(reference, candidate)
    result = verify_models(
        reference, candidate, atol=0.0, rtol=0.0, output_tolerances={"Y2": (10.0, 0.0)}
    )

    assert result.passed
    y1, y2 = result.outputs
    assert (y1.name, y1.atol, y1.rtol) == ("Y1", 0.0, 0.0)
    assert (y2.name, y2.atol, y2.rtol) == ("Y2", 10.0, 0.0)


def test_tolerance_for_an_unknown_output_is_a_usage_error():
    with pytest.raises(UsageError, match=r"'Z'.*outputs are: 'Y1', 'Y2'"):
        verify_models(two_output_model(), two_output_model(), output_tolerances={"Z": (1, 1)})


@pytest.mark.parametrize("bad", [{"atol": -1.0}, {"rtol": math.nan}, {"samples": 0}])
def test_bad_arguments_are_usage_errors(bad):
    with pytest.raises(UsageError):
        verify_models(REFERENCE, REFERENCE, **bad)


# --- compare_outputs: the element-wise rules ------------------------------------------------------


def test_relative_error_is_finite_where_the_reference_is_zero():
    out = compare_outputs("y", np.array([0.0, 1.0]), np.array([1e-3, 1.0]), atol=1e-2, rtol=0.0)

    assert out.passed
    assert out.max_rel_error == pytest.approx(1e-3 / 1e-2)  # |diff| / max(|ref|, atol)
    assert out.min_rtol_to_pass == 0.0  # nothing exceeds atol


def test_with_zero_atol_a_difference_at_a_zero_reference_is_infinitely_relative():
    out = compare_outputs("y", np.array([0.0, 1.0]), np.array([1e-3, 1.0]), atol=0.0, rtol=0.5)

    assert not out
    assert out.max_rel_error == math.inf
    assert out.min_rtol_to_pass == math.inf  # no rtol helps where the reference is 0
    assert out.min_atol_to_pass == pytest.approx(1e-3)


def test_nan_in_both_is_equal():
    out = compare_outputs(
        "y", np.array([np.nan, 1.0], np.float32), np.array([np.nan, 1.0], np.float32)
    )

    assert out.passed and out.nan_or_inf_mismatch == 0 and out.max_abs_error == 0


def test_nan_in_one_fails_whatever_the_tolerance():
    out = compare_outputs(
        "y", np.array([[1.0, np.nan], [2.0, 3.0]]), np.array([[1.0, 5.0], [2.0, 3.5]]), atol=1e6
    )

    assert not out
    assert out.nan_or_inf_mismatch == 1 and out.mismatched == 1
    assert out.worst_index == (0, 1)  # a NaN/Inf mismatch is the worst element
    assert out.max_abs_error == pytest.approx(0.5)  # statistics only over finite-in-both elements
    assert out.min_atol_to_pass == math.inf and out.min_rtol_to_pass == math.inf


@pytest.mark.parametrize(
    ("ref", "cand", "equal"),
    [
        (np.inf, np.inf, True),
        (-np.inf, -np.inf, True),
        (np.inf, -np.inf, False),
        (np.inf, 1e30, False),
        (1.0, -np.inf, False),
        (np.nan, np.inf, False),
    ],
)
def test_infinities_are_equal_only_to_the_same_infinity(ref, cand, equal):
    out = compare_outputs("y", np.array([ref, 0.0]), np.array([cand, 0.0]), atol=1e300)

    assert out.passed is equal
    assert out.nan_or_inf_mismatch == (0 if equal else 1)


def test_shape_or_dtype_mismatch_fails_with_a_message():
    by_shape = compare_outputs("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    by_dtype = compare_outputs("y", np.zeros(3, np.float32), np.zeros(3, np.float64))

    for out in (by_shape, by_dtype):
        assert not out and out.message and "'y'" in out.message
        assert math.isnan(out.max_abs_error) and out.min_atol_to_pass == math.inf
    assert "float32[3, 2]" in by_shape.message
    assert by_shape.to_dict()["max_abs_error"] is None


def test_integer_outputs_must_match_exactly():
    assert compare_outputs("i", np.arange(4), np.arange(4)).passed
    out = compare_outputs("i", np.arange(4), np.array([0, 1, 2, 4]))
    assert not out and out.worst_index == (3,) and out.max_abs_error == 1


def test_bool_outputs_compare_too():
    assert not compare_outputs("b", np.array([True, False]), np.array([True, True]))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    ref=hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e6, 1e6)),
    noise=st.floats(-1e3, 1e3),
    atol=st.sampled_from([0.0, 1e-6, 1e-2]),
    rtol=st.sampled_from([0.0, 1e-6, 1e-2]),
)
def test_min_tolerances_to_pass_are_exact(ref, noise, atol, rtol):
    cand = ref + noise * np.linspace(0, 1, ref.size)
    out = compare_outputs("y", ref, cand, atol=atol, rtol=rtol)

    assert out.passed is bool(np.all(np.isclose(cand, ref, atol=atol, rtol=rtol)))
    assert compare_outputs("y", ref, cand, atol=out.min_atol_to_pass, rtol=rtol).passed
    if out.min_atol_to_pass > 0:
        # Minimal up to float rounding of atol + rtol·|ref|: a value a little smaller fails.
        smaller = min(
            out.min_atol_to_pass * (1 - 1e-9), float(np.nextafter(out.min_atol_to_pass, 0))
        )
        assert not compare_outputs("y", ref, cand, atol=smaller, rtol=rtol).passed
    if math.isfinite(out.min_rtol_to_pass):
        assert compare_outputs("y", ref, cand, atol=atol, rtol=out.min_rtol_to_pass).passed


# --- inputs and their shapes -----------------------------------------------------------------------


def test_dynamic_dimensions_default_to_one():
    result = verify_models(REFERENCE, REFERENCE)
    assert result.input_shapes == {"X": [1, 3]}


def test_input_shapes_fill_dynamic_dimensions():
    result = verify_models(REFERENCE, REFERENCE, input_shapes={"X": (4, 3)})

    assert result.input_shapes == {"X": [4, 3]}
    assert result.outputs[0].shape == (4, 3)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ({"X": (4,)}, r"'X' has rank 1 but the model expects \[N, 3\] \(rank 2\)"),
        ({"X": (4, 5)}, r"'X' has 5 in dimension 1 but the model expects \[N, 3\]"),
        ({"W": (1, 3)}, r"'W'.*not an input of the model; its inputs are: 'X'"),
    ],
)
def test_input_shapes_that_contradict_the_model_are_usage_errors(shapes, match):
    with pytest.raises(UsageError, match=match):
        verify_models(REFERENCE, REFERENCE, input_shapes=shapes)


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (["x=1,3,224,224", "y=4"], {"x": (1, 3, 224, 224), "y": (4,)}),
        ([" x = 1, 3 "], {"x": (1, 3)}),
        (["x=[2,3]"], {"x": (2, 3)}),
        (["x="], {"x": ()}),
        (["a=b=2"], {"a=b": (2,)}),
        ([], {}),
    ],
)
def test_parse_input_shapes(specs, expected):
    assert parse_input_shapes(specs) == expected


@pytest.mark.parametrize("spec", ["x", "=1,2", "x=1,,2", "x=a", "x=0", "x=-1", "x=1.5", "x=1,2,"])
def test_parse_input_shapes_rejects_malformed_specs_in_one_line(spec):
    with pytest.raises(UsageError, match="malformed input shape") as info:
        parse_input_shapes([spec])
    assert "\n" not in str(info.value) and "x=1,3,224,224" in str(info.value)


def test_parse_input_shapes_rejects_a_name_given_twice():
    with pytest.raises(UsageError, match="'x' is given twice"):
        parse_input_shapes(["x=1", "x=2"])


NodeArg = namedtuple("NodeArg", "name type shape")


def test_make_inputs_is_seeded_and_typed():
    specs = [
        NodeArg("f", "tensor(float)", ["batch", 3]),
        NodeArg("h", "tensor(float16)", [2, None]),
        NodeArg("i", "tensor(int64)", [1000]),
        NodeArg("b", "tensor(bool)", [1000]),
        NodeArg("bf", "tensor(bfloat16)", [2]),
    ]
    feeds = make_inputs(specs, input_shapes={"f": (5, 3)}, seed=7)

    assert {k: (v.dtype, v.shape) for k, v in feeds.items()} == {
        "f": (np.float32, (5, 3)),
        "h": (np.float16, (2, 1)),
        "i": (np.int64, (1000,)),
        "b": (np.bool_, (1000,)),
        "bf": (np.dtype(ml_dtypes.bfloat16), (2,)),
    }
    assert set(np.unique(feeds["i"])) == {0, 1, 2, 3}
    assert 0 < feeds["b"].sum() < 1000
    again = make_inputs(specs, input_shapes={"f": (5, 3)}, seed=7)
    other = make_inputs(specs, input_shapes={"f": (5, 3)}, seed=8)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert not np.array_equal(feeds["f"], other["f"])


def test_make_inputs_refuses_non_tensor_inputs():
    with pytest.raises(UsageError, match="'s' of type seq"):
        make_inputs([NodeArg("s", "seq(tensor(float))", [])], input_shapes=None, seed=0)


# --- the candidate must be comparable --------------------------------------------------------------


def test_output_names_must_match_in_order():
    renamed = model("add (float[N, 3] X) => (float[N, 3] Z) { Z = Identity(X) }")

    result = verify_models(REFERENCE, renamed)

    assert not result and result.outputs == ()
    assert "outputs (Z) differ from the reference's (Y)" in result.message


def test_inputs_must_match_by_name_and_type():
    retyped = model("add (double[N, 3] X) => (double[N, 3] Y) { Y = Identity(X) }")

    result = verify_models(REFERENCE, retyped)

    assert not result
    assert "X: tensor(double)" in result.message and "X: tensor(float)" in result.message


def test_output_dtype_change_fails_that_output():
    cast = model("add (float[N, 3] X) => (double[N, 3] Y) { Y = Cast<to = 11>(X) }")

    (out,) = verify_models(REFERENCE, cast).outputs

    assert not out and "float64" in out.message


# --- several samples -------------------------------------------------------------------------------


def test_samples_aggregate_over_seeded_batches():
    scale = model("s (float[N, 8] X) => (float[N, 8] Y) <float K = {1.001}> { Y = Mul(X, K) }")
    same = model("s (float[N, 8] X) => (float[N, 8] Y) { Y = Identity(X) }")

    singles = [verify_models(same, scale, seed=s, atol=1.0).outputs[0] for s in (5, 6, 7)]
    result = verify_models(same, scale, seed=5, samples=3, atol=1.0)
    (out,) = result.outputs

    assert result.samples == 3 and result.seed == 5
    assert out.elements == 3 * 8
    assert out.max_abs_error == max(s.max_abs_error for s in singles)
    assert out.mean_abs_error == pytest.approx(np.mean([s.mean_abs_error for s in singles]))
    worst = int(np.argmax([s.max_abs_error for s in singles]))
    assert (out.worst_sample, out.worst_index) == (worst, singles[worst].worst_index)


def test_mismatches_are_counted_over_all_samples():
    (out,) = verify_models(REFERENCE, PERTURBED, input_shapes={"X": (2, 3)}, samples=4).outputs
    assert out.mismatched == 4 * 2 and out.elements == 4 * 6


# --- NaN through real models -----------------------------------------------------------------------


def test_nan_produced_by_both_models_passes_but_by_one_fails():
    log = model("l (float[16] X) => (float[16] Y) { Y = Log(X) }")
    log_abs = model("l (float[16] X) => (float[16] Y) { A = Abs(X)  Y = Log(A) }")

    assert verify_models(log, log).passed  # log of negative inputs is NaN on both sides
    (out,) = verify_models(log, log_abs).outputs
    assert not out and out.nan_or_inf_mismatch > 0 and out.worst_index is not None


# --- when ONNX Runtime cannot run a model ----------------------------------------------------------

CUSTOM_OP = (
    '<ir_version: 10, opset_import: ["" : 21, "com.example" : 1]>\n'
    "c (float[N, 3] X) => (float[N, 3] Y) { Y = com.example.Mystery(X) }"
)


def test_an_unrunnable_reference_skips_verification_instead_of_raising():
    reference = onnx.parser.parse_model(CUSTOM_OP).SerializeToString()

    result = verify_models(reference, REFERENCE)

    assert not result and result.outputs == ()
    assert result.skipped_reason.startswith("ONNX Runtime cannot run the reference model: ")
    assert "Mystery" in result.skipped_reason and "\n" not in result.skipped_reason
    assert "[ONNXRuntimeError]" not in result.skipped_reason


def test_a_reference_that_loads_but_fails_to_run_is_skipped():
    bad_reshape = model(
        "r (float[N, 3] X) => (float[5] Y) <int64[1] S = {5}> { Y = Reshape(X, S) }"
    )
    result = verify_models(bad_reshape, bad_reshape)

    assert not result and result.skipped_reason.startswith(
        "ONNX Runtime cannot run the reference model"
    )


def test_an_unloadable_candidate_fails_with_a_message():
    candidate = onnx.parser.parse_model(CUSTOM_OP).SerializeToString()

    result = verify_models(REFERENCE, candidate)

    assert not result and result.skipped_reason is None
    assert result.message.startswith("ONNX Runtime cannot run the candidate model: ")


def test_a_candidate_that_fails_to_run_fails_with_a_message():
    fixed = model("add (float[2, 3] X) => (float[2, 3] Y) { Y = Identity(X) }")

    result = verify_models(REFERENCE, fixed)  # fed X of shape [1, 3]

    assert not result and result.message.startswith("ONNX Runtime cannot run the candidate model")


# --- results as values -----------------------------------------------------------------------------


def test_results_serialize_to_strict_json():
    result = verify_models(REFERENCE, PERTURBED, atol=0.0)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))

    assert data["passed"] is False and data["seed"] == 0 and data["input_shapes"] == {"X": [1, 3]}
    (out,) = data["outputs"]
    assert out["name"] == "Y" and out["worst_index"] == [0, 2] and out["passed"] is False
    assert isinstance(result, VerificationResult)
    assert isinstance(result.outputs[0], OutputComparison)
    assert result.failed_outputs == result.outputs
    assert result.seconds > 0


def test_bfloat16_models_run_through_ort_values():
    identity = model("b (bfloat16[N, 4] X) => (bfloat16[N, 4] Y) { Y = Identity(X) }")

    result = verify_models(identity, identity)

    assert result.passed
    assert result.outputs[0].dtype == "bfloat16"
    # calibrated in bfloat16's own unit roundoff (2**-8): an Identity has no noise of its own
    out = result.outputs[0]
    assert out.mode == "calibrated" and out.atol == pytest.approx(2 * 2.0**-8 * out.scale)
    strict = verify_models(identity, identity, atol=0.3, rtol=0.08)
    assert (strict.outputs[0].atol, strict.outputs[0].rtol) == default_tolerances(
        ml_dtypes.bfloat16
    )


# --- the ONNX Runtime helper -----------------------------------------------------------------------


def test_make_session_turns_ort_errors_into_one_line_invalid_model_errors():
    with pytest.raises(InvalidModelError) as info:
        _ort.make_session(b"not a model")
    message = str(info.value)
    assert message.startswith("ONNX Runtime cannot load the model: ") and "\n" not in message


def test_make_session_rejects_unknown_levels():
    with pytest.raises(UsageError, match="disable, basic, extended, all"):
        _ort.make_session(REFERENCE, level="max")


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_make_session_levels(level):
    session = _ort.make_session(REFERENCE, level=level, intra_op_threads=1)
    (y,) = _ort.run(session, {"X": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(y, [[1, 2, 3], [1, 2, 3]])


@pytest.mark.parametrize(
    ("type_str", "dtype"),
    [
        ("tensor(float)", np.float32),
        ("tensor(float16)", np.float16),
        ("tensor(bfloat16)", ml_dtypes.bfloat16),
        ("tensor(double)", np.float64),
        ("tensor(int8)", np.int8),
        ("tensor(int16)", np.int16),
        ("tensor(int32)", np.int32),
        ("tensor(int64)", np.int64),
        ("tensor(uint8)", np.uint8),
        ("tensor(uint16)", np.uint16),
        ("tensor(uint32)", np.uint32),
        ("tensor(uint64)", np.uint64),
        ("tensor(bool)", np.bool_),
    ],
)
def test_ort_type_to_numpy(type_str, dtype):
    assert _ort.ort_type_to_numpy(type_str) == np.dtype(dtype)


@pytest.mark.parametrize("type_str", ["seq(tensor(float))", "tensor(string)", "float"])
def test_ort_type_to_numpy_rejects_what_it_cannot_map(type_str):
    with pytest.raises(ValueError):
        _ort.ort_type_to_numpy(type_str)


def test_importing_verify_does_not_import_onnxruntime():
    code = "import sys, bnfold.compare; sys.exit('onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_perturbed_model_differs_only_in_its_constant():
    # guards the premise of the tests above: C differs by 0.5 in column 2 only
    (ref,) = onnx.load_from_string(REFERENCE).graph.initializer
    (cand,) = onnx.load_from_string(PERTURBED).graph.initializer
    diff = onnx.numpy_helper.to_array(cand) - onnx.numpy_helper.to_array(ref)
    np.testing.assert_array_equal(diff, [0, 0, 0.5])
