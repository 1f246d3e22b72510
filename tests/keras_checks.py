"""Shared checks on the Keras/TensorFlow exporter fixtures in tests/data/keras (issue 13).

``assert_folds_every_bn`` and ``assert_check_flags_every_bn`` state the goal: bnfold reports every BN
layer the exporter left in the graph and folds all of them, exactly; ``bnfold check`` flags each one.
``test_keras_exports.py`` applies them to the fixtures bnfold does not fold yet (xfail), and
``test_keras_fixtures.py`` to those it already folds (a regression guard).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from helpers import assert_close, run_ort
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app

DATA = Path(__file__).resolve().parent / "data" / "keras"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text())
FIXTURES = sorted(name for name, entry in MANIFEST["files"].items() if "error" not in entry)
# Today's bnfold already folds these completely: a BN right after a Conv or Dense, lowered by tf2onnx
# to Mul+Add with [1, C, 1, 1] / [C] constants (Keras 3) or fused into the Conv by tf2onnx itself
# (Keras 2). Everything else (BN after an activation; the NHWC Conv -> Transpose -> bias Add ->
# Sub -> Mul -> Add of Keras 3's torch backend) is issue 13's work.
TF_ROUTES = {"tf2onnx_k3", "keras3_tf", "savedmodel_k3", "tf2onnx_k2", "savedmodel_k2"}
FOLDED_TODAY = sorted(
    name
    for name in FIXTURES
    if MANIFEST["files"][name]["model"] == "convbn"
    and MANIFEST["files"][name]["route"] in TF_ROUTES
)
NOT_YET = sorted(set(FIXTURES) - set(FOLDED_TODAY))
# Ops through which a BN-like affine can only be an unfolded BN: these graphs have no other Mul/Sub/Div.
AFFINE_OPS = {"Mul", "Sub", "Div", "BatchNormalization"}
LINEAR_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
# What may sit between a Conv/MatMul and its bias Add: Keras 3's torch export writes
# Conv -> Transpose -> Cast -> Add(bias [1, 1, 1, C]) and MatMul -> Cast -> Add(bias [C]).
PASS_THROUGH = {"Add", "Transpose", "Cast", "Identity"}


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(str(DATA / name))


def run_images(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    """Run the reference batch under ORT (unoptimised); a static batch of 1 (Keras 3's dynamo
    export with a static input signature) runs one image at a time."""
    inp = model.graph.input[0]
    if inp.type.tensor_type.shape.dim[0].dim_value == 1:
        outs = [run_ort(model, {inp.name: image[i : i + 1]})[0] for i in range(len(image))]
        return np.concatenate(outs)
    return run_ort(model, {inp.name: image})[0]


def _reference(name: str) -> dict[str, np.ndarray]:
    entry = MANIFEST["files"][name]
    with np.load(DATA / f"reference_{entry['model']}_{entry['padding']}.npz") as ref:
        return {"image": ref["image"], "output": ref["output"]}


def _constants(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def bn_like_left(model: onnx.ModelProto) -> list[str]:
    """Nodes of a folded fixture that still apply a BN's scale or shift.

    A BN lowers to Mul/Sub/Div/Add with constants (or stays a BatchNormalization); after a complete
    fold no Mul/Sub/Div/BatchNormalization is left, and every Add of a constant follows the
    Conv/MatMul/Gemm it belongs to (through Transpose/Cast/Identity and other constant Adds only): a
    bias, or a border correction of a forward fold.
    """
    graph = model.graph
    consts = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    left = []
    for node in graph.node:
        if node.op_type in AFFINE_OPS:
            left.append(f"{node.op_type} {node.name}")
        elif node.op_type == "Add" and any(i in consts for i in node.input):
            data = [i for i in node.input if i not in consts]
            src = producer.get(data[0]) if len(data) == 1 else None
            # bias Add, border-correction Add, layout/no-op nodes between the producer and its bias
            while src is not None and src.op_type in PASS_THROUGH:
                nxt = [
                    i for i in src.input[: 1 if src.op_type != "Add" else None] if i not in consts
                ]
                src = producer.get(nxt[0]) if len(nxt) == 1 else None
            if src is None or src.op_type not in LINEAR_OPS:
                left.append(f"Add {node.name} (after {src.op_type if src else 'input'})")
    return left


def assert_folds_every_bn(name: str) -> None:
    # the BN layers the exporter left in the graph (tf2onnx fuses Keras 2's Conv -> BN itself)
    n_bn = MANIFEST["files"][name]["onnx_bn_layers"]
    original = _load(name)
    pristine = original.SerializeToString()
    # By default a forward fold that needs a border-correction Add (a "same"-padded Conv after the
    # BN) is kept for cost (issue 17): every other BN folds, and nothing is kept for another reason.
    default = bnfold.fold(original).report.to_dict()
    assert default["verification"]["passed"]
    assert default["totals"]["batchnorms"] == n_bn, default["batchnorms"]
    assert all(
        d["status"] == "folded" or d["reason"] == "slower_fold" for d in default["batchnorms"]
    ), default["batchnorms"]
    # Forced, every BN layer folds, exactly.
    result = bnfold.fold(original, allow_slower_folds=True)
    assert original.SerializeToString() == pristine  # the input is never modified
    report = result.report.to_dict()

    # every Keras BN layer is reported as a BatchNorm, and all of them are folded
    assert report["totals"] == {"batchnorms": n_bn, "folded": n_bn, "kept": 0}, report["batchnorms"]
    assert [d["status"] for d in report["batchnorms"]] == ["folded"] * n_bn
    assert all(d["target_op"] in LINEAR_OPS for d in report["batchnorms"]), report["batchnorms"]
    assert result.passed and report["verification"]["passed"]

    folded = result.model
    onnx.checker.check_model(folded, full_check=True)
    assert bn_like_left(folded) == []
    # the input fixture was not touched, and it did hold BN-like affines to fold
    assert bn_like_left(original) != []

    # the folded model computes what the original and the Keras model compute (ORT unoptimised)
    ref = _reference(name)
    want = run_images(original, ref["image"])
    got = run_images(folded, ref["image"])
    assert_close([got], [want])
    assert_close([got], [ref["output"]])


def assert_check_flags_every_bn(name: str, tmp_path: Path) -> None:
    n_bn = MANIFEST["files"][name]["onnx_bn_layers"]
    out = tmp_path / "check.json"
    res = CliRunner().invoke(
        app, ["check", str(DATA / name), "--json", str(out)], env={"COLUMNS": "400"}
    )
    assert res.exit_code == 1, res.output
    model = json.loads(out.read_text())["models"][0]
    assert model["batchnorms"] == n_bn
    # check flags what `bnfold fold` (same defaults) folds; a BN kept for cost is reported, not flagged
    default = bnfold.fold(_load(name)).report.to_dict()["batchnorms"]
    n_cost = sum(d["reason"] == "slower_fold" for d in default)
    assert len(model["foldable"]) == n_bn - n_cost > 0, model
    assert len(model["kept"]) == n_cost, model
    # each foldable BN is named, in the JSON and in the human output
    for entry in model["foldable"]:
        assert entry["name"] and entry["name"] in res.output
