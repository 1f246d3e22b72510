"""The committed Keras/TensorFlow exporter fixtures are what MANIFEST.json says they are.

These hold today (no xfail): every file listed passes ``onnx.checker``, runs under ONNX Runtime with
optimizations disabled and reproduces the Keras model's own output (stored beside it by
``make_keras_fixtures.py``), is well under 1 MB, and holds exactly the BN layers the manifest counts.
``test_keras_exports.py`` states what bnfold must do with them (issue 13).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_close
from keras_checks import (
    FOLDED_TODAY,
    assert_check_flags_every_bn,
    assert_folds_every_bn,
    bn_like_left,
    run_images,
)

DATA = Path(__file__).resolve().parent / "data" / "keras"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text())
FILES = MANIFEST["files"]
FIXTURES = sorted(name for name, entry in FILES.items() if "error" not in entry)
ROUTES = {
    "tf2onnx_k3",
    "tf2onnx_k2",
    "keras3_tf",
    "keras3_torch",
    "keras3_torch_dynamo",
    "savedmodel_k3",
    "savedmodel_k2",
}


def test_every_route_in_both_paddings_for_both_models():
    made = {(e["route"], e["model"], e["padding"]) for e in FILES.values() if "error" not in e}
    want = {(r, m, p) for r in ROUTES for m in ("tutorial", "convbn") for p in ("valid", "same")}
    assert made == want
    assert set(FIXTURES) == {p.name for p in DATA.glob("*.onnx")}


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_runs_and_matches_keras(name):
    entry = FILES[name]
    path = DATA / name
    assert path.stat().st_size == entry["bytes"] < 1_000_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    with np.load(DATA / f"reference_{entry['model']}_{entry['padding']}.npz") as ref:
        image, want = ref["image"], ref["output"]
    got = run_images(model, image)
    assert got.shape == want.shape == (2, 10)
    assert_close([got], [want])
    # the randomized BN statistics make the output far from trivial
    assert np.abs(want).max() > 0.5


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_holds_the_bn_layers_the_manifest_counts(name):
    entry = FILES[name]
    model = onnx.load(str(DATA / name))
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    muls = sum(n.op_type == "Mul" and any(i in consts for i in n.input) for n in model.graph.node)
    assert bns + muls == entry["onnx_bn_layers"]
    assert (
        entry["onnx_bn_layers"] + len(entry["exporter_fused_bn"]) == entry["keras_bn_layers"] == 3
    )
    assert [b["layer"] for b in entry["bn_layers"]] == ["bn1", "bn2", "bn3"]


@pytest.mark.parametrize("name", FOLDED_TODAY)
def test_fixtures_folded_today_stay_folded(name, tmp_path):
    """BN right after Conv/Dense in tf2onnx output already folds: keep it so."""
    assert_folds_every_bn(name)
    assert_check_flags_every_bn(name, tmp_path)


@pytest.mark.parametrize("name", FIXTURES)
def test_bn_like_left_sees_each_bn_and_no_bias(name):
    """The structural check of the goal tests flags each BN's Mul/Sub/Add (or BatchNormalization
    node) in an unfolded fixture, and none of the Conv/Dense bias Adds."""
    forms = FILES[name]["onnx_bn_forms"]
    left = bn_like_left(onnx.load(str(DATA / name)))
    ops = [entry.split()[0] for entry in left]
    assert ops.count("BatchNormalization") == forms["BatchNormalization"]
    assert ops.count("Mul") == ops.count("Add") == forms["Mul+Add"]
    assert ops.count("Sub") in (0, forms["Mul+Add"])  # Keras 3's torch backend: Sub -> Mul -> Add
