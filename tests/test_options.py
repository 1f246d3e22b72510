"""The fold options (``lower_remaining``, ``duplicate_shared``) and the dry run (``inspect_model``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from foldchecks import all_nodes, assert_equivalent, assert_folded, fold_checked, ops
from helpers import assert_kept, bn_params, model_from_text, randn

from bnfold.dryrun import inspect_model
from bnfold.report import SkipReason

H17 = '<ir_version: 8, opset_import: ["" : 17]>'
SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


# ====================================================================================== lower_remaining
@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 5), (2, 4, 5, 5)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("type_name, dtype", [("float", np.float32), ("float16", np.float16)])
def test_lower_remaining(shape, type_name, dtype):
    model = model_from_text(
        f"""{H17}
        g ({type_name}[{",".join(map(str, shape))}] X) => ({type_name}[{",".join(map(str, shape))}] Y) {{
            r = Relu (X)
            Y = BatchNormalization (r, scale, B, mean, var)
        }}""",
        bn_params(4, dtype),
    )

    result = fold_checked(model, lower_remaining=True)

    (d,) = result.decisions
    assert not d.folded and d.reason == SkipReason.UNSUPPORTED_PRODUCER and d.direction == "lowered"
    assert "lowered to Mul + Add" in d.detail
    assert ops(result.model) == ["Relu", "Mul", "Add"]
    assert result.model.graph.output[0].name == "Y"
    assert_equivalent(model, result.model)
    assert not result.report.folded and len(result.report.kept) == 1, (
        "a lowered BN still counts as kept"
    )


def test_lower_remaining_leaves_training_mode_bns_and_folds_the_rest():
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 15]>
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y, float[2,6,5,5] Z) {
            c = Conv (X, W)
            Y = BatchNormalization (c, scale, B, mean, var)
            r = Relu (Y)
            Z, rm, rv = BatchNormalization <training_mode = 1> (r, scale, B, mean, var)
        }""",
        {"W": randn(6, 4, 1, 1, seed=1), **bn_params(6)},
    )
    result = fold_checked(model, lower_remaining=True)
    assert [(d.direction, d.reason) for d in result.decisions] == [
        ("backward", None),
        (None, SkipReason.TRAINING_MODE),
    ]
    assert ops(result.model) == ["Conv", "Relu", "BatchNormalization"]


def test_lower_remaining_in_ir3_model():
    model = model_from_text(
        """<ir_version: 3, opset_import: ["" : 7]>
        g (float[2,4,5,5] X) => (float[2,4,5,5] Y) {
            r = Relu (X)
            Y = BatchNormalization (r, scale, B, mean, var)
        }""",
        bn_params(4),
    )
    result = fold_checked(model, lower_remaining=True)
    assert ops(result.model) == ["Relu", "Mul", "Add"]
    assert_equivalent(model, result.model)


def test_lower_remaining_off_by_default():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,4,5,5] Y) {{
            r = Relu (X)
            Y = BatchNormalization (r, scale, B, mean, var)
        }}""",
        bn_params(4),
    )
    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)
    assert result.decisions[0].direction is None


# ===================================================================================== duplicate_shared
SHARED = {
    "Conv": ("[2,4,5,5]", "[2,6,5,5]", "c = Conv <pads = [1, 1, 1, 1]> (X, W)", (6, 4, 3, 3)),
    "Gemm": ("[3,5]", "[3,6]", "c = Gemm <transB = 1> (X, W)", (6, 5)),
    "MatMul+Add": ("[3,5]", "[3,6]", "m = MatMul (X, W)\n c = Add (m, b)", (5, 6)),
}


@pytest.mark.parametrize("op", list(SHARED))
def test_duplicate_shared(op):
    x, y, line, w = SHARED[op]
    model = model_from_text(
        f"""{H17}
        g (float{x} X) => (float{y} Y, float{y} Z) {{
            {line}
            Y = BatchNormalization (c, scale, B, mean, var)
            Z = Relu (c)
        }}""",
        {"W": randn(*w, seed=1), "b": randn(6, seed=2), **bn_params(6)}
        if "Add" in line
        else {"W": randn(*w, seed=1), **bn_params(6)},
    )
    assert_kept(model, SkipReason.PRODUCER_OUTPUT_SHARED)

    result = assert_folded(model, "backward", duplicate_shared=True)

    assert "copy" in result.decisions[0].detail and "duplicate-shared" in result.decisions[0].detail
    producer = op.split("+")[0]
    assert ops(result.model).count(producer) == 2
    assert ops(result.model)[-1] == "Relu" and result.model.graph.output[0].name == "Y"


def test_duplicate_shared_matmul_output_shared_inside_matmul_add():
    model = model_from_text(
        f"""{H17}
        g (float[3,5] X) => (float[3,6] Y, float[3,6] Z) {{
            m = MatMul (X, W)
            c = Add (m, b)
            Y = BatchNormalization (c, scale, B, mean, var)
            Z = Relu (m)
        }}""",
        {"W": randn(5, 6, seed=1), "b": randn(6, seed=2), **bn_params(6)},
    )
    assert_kept(model, SkipReason.PRODUCER_OUTPUT_SHARED)
    result = assert_folded(model, "backward", duplicate_shared=True)
    assert ops(result.model).count("MatMul") == 2


def test_duplicate_shared_undone_when_the_fold_fails():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X, float[6,4,1,1] W) => (float[2,6,5,5] Y, float[2,6,5,5] Z) {{
            c = Conv (X, W)
            Y = BatchNormalization (c, scale, B, mean, var)
            Z = Relu (c)
        }}""",
        bn_params(6),
    )
    result = fold_checked(model, duplicate_shared=True)
    assert result.decisions[0].reason == SkipReason.NON_CONSTANT_WEIGHT
    assert ops(result.model) == ["Conv", "BatchNormalization", "Relu"], "the copy is removed again"


# ======================================================================================= inspect_model
def test_inspect_path_writes_nothing(tmp_path):
    src = tmp_path / "keras_style.onnx"
    src.write_bytes((SAMPLES / "keras_style.onnx").read_bytes())
    before = src.read_bytes()

    report = inspect_model(src, allow_slower_folds=True)

    assert src.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [
        "keras_style.onnx"
    ]
    assert [(d.direction, d.target_op) for d in report.decisions] == [
        ("forward", "Conv"),
        ("forward", "Gemm"),
    ]
    assert report.output is None and not report.written and report.verification is None
    assert (
        report.input == str(src) and report.nodes_after == report.nodes_before - 2 + 1
    )  # + border Add
    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"] == {"batchnorms": 2, "folded": 2, "kept": 0}
    assert [b["direction"] for b in data["batchnorms"]] == ["forward", "forward"]


def test_inspect_proto_and_ir_model_are_not_modified():
    model = model_from_text(
        f"""{H17}
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y, float[2,6,5,5] Z) {{
            c = Conv (X, W)
            n = BatchNormalization (c, scale, B, mean, var)
            Y = Relu (n)
            r = Relu (X)
            [kept_bn] Z = BatchNormalization (r, scale4, B4, mean4, var4)
        }}""",
        {
            "W": randn(6, 4, 1, 1, seed=1),
            **bn_params(6),
            **{k + "4": v for k, v in bn_params(4, seed=2).items()},
        },
    )
    before = model.SerializeToString(deterministic=True)
    report = inspect_model(model)
    assert model.SerializeToString(deterministic=True) == before
    assert [(d.status, d.direction) for d in report.decisions] == [
        ("folded", "backward"),
        ("kept", None),
    ]

    ir_model = ir.serde.deserialize_model(model)
    n_nodes = len(list(ir_model.graph))
    lowered = inspect_model(ir_model, lower_remaining=True)
    assert len(list(ir_model.graph)) == n_nodes
    assert sum(n.op_type == "BatchNormalization" for n in ir_model.graph) == 2
    assert [d.direction for d in lowered.decisions] == ["backward", "lowered"]
    assert lowered.kept[0].reason == SkipReason.UNSUPPORTED_PRODUCER
    assert not [n for n in all_nodes(model) if n.op_type == "Mul"]
    onnx.checker.check_model(model)
