"""Specification of ``bnfold.divergence``: name the first shared tensor where two models disagree.

Chain models are built in code; a "perturbed" candidate is the same graph with one weight changed,
so the tensor that must be reported is known. Intermediate values carry no declared type (as in
exported models): ONNX Runtime infers the type of an exposed intermediate.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from bnfold import _ort
from bnfold.api import fold
from bnfold.compare import verify_models
from bnfold.divergence import Divergence, LocalizeResult, Producer, localize
from bnfold.errors import InputNotFoundError, InvalidModelError, UsageError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
FLOAT = onnx.TensorProto.FLOAT


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "B1": rng.standard_normal(4).astype(np.float32),
        "W2": rng.standard_normal((5, 4, 3, 3)).astype(np.float32),
        "B2": rng.standard_normal(5).astype(np.float32),
    }


def chain_model(
    weights: dict[str, np.ndarray] | None = None, *, with_shape: bool = False
) -> onnx.ModelProto:
    """``X -conv1-> c1 -relu1-> r1 -conv2-> c2 -relu2-> Y`` (named nodes, untyped intermediates).

    ``with_shape`` adds an int64 side branch (``s = Shape(r1)``, ``Y = Reshape(r2, s2)``), a shared
    tensor that is not compared because it is not floating-point.
    """
    w = weights or _weights()
    nodes = [
        oh.make_node("Conv", ["X", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    if with_shape:
        nodes += [
            oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            oh.make_node("Shape", ["r2"], ["s"], name="shape"),
            oh.make_node("Reshape", ["r2", "s"], ["Y"], name="reshape"),
        ]
    else:
        nodes.append(oh.make_node("Relu", ["c2"], ["Y"], name="relu2"))
    graph = oh.make_graph(
        nodes,
        "chain",
        [oh.make_tensor_value_info("X", FLOAT, ["N", 3, 6, 6])],
        [oh.make_tensor_value_info("Y", FLOAT, ["N", 5, 6, 6])],
        [onh.from_array(a, n) for n, a in w.items()],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def perturbed(name: str, delta: float = 0.5, **kwargs) -> onnx.ModelProto:
    w = _weights()
    w[name] = w[name] + np.float32(delta)
    return chain_model(w, **kwargs)


# --- the chain model -------------------------------------------------------------------------------


def test_perturbed_second_conv_is_named():
    result = localize(chain_model(), perturbed("W2"))
    assert isinstance(result, LocalizeResult) and result  # truthy: a divergence was found
    d = result.divergence
    assert isinstance(d, Divergence)
    assert (d.tensor, d.reference_tensor, d.node, d.op_type) == ("c2", "c2", "conv2", "Conv")
    assert d.candidate_producer == d.reference_producer == Producer("conv2", "Conv")
    assert d.checked == result.checked == 3  # c1, r1 matched; c2 did not
    assert result.shared == 4  # c1, r1, c2, Y
    assert not d.comparison.passed and d.comparison.mismatched > 0
    assert d.comparison.shape == (1, 5, 6, 6)
    # Everything upstream of c2 matched, so the chain is the producer alone.
    assert d.candidate_chain == d.reference_chain == (Producer("conv2", "Conv"),)
    assert "'c2'" in result.describe() and "conv2 (Conv)" in result.describe()
    assert result.message is None


def test_perturbed_first_bias_is_named_first():
    d = localize(chain_model(), perturbed("B1")).divergence
    assert d is not None and (d.tensor, d.node, d.checked) == ("c1", "conv1", 1)


def test_identical_models_have_no_divergence():
    result = localize(chain_model(), chain_model())
    assert not result and result.divergence is None
    assert result.checked == result.shared == 4
    assert "all 4 compared shared tensors match" in result.message


def test_non_float_shared_tensors_are_not_compared():
    result = localize(chain_model(with_shape=True), perturbed("W2", with_shape=True))
    assert result.shared == 6  # c1 r1 c2 r2 s Y: s is undeclared, so it is exposed ...
    assert result.divergence is not None and result.divergence.tensor == "c2"
    same = localize(chain_model(with_shape=True), chain_model(with_shape=True))
    assert same.checked == 5  # ... and dropped once ORT reports it as int64


def test_tolerances_decide():
    small = perturbed("B2", delta=1e-3)
    assert localize(chain_model(), small).divergence.tensor == "c2"
    assert not localize(chain_model(), small, atol=1e-2)


def test_chunks_give_the_same_answer():
    one_run = localize(chain_model(), perturbed("W2"))
    chunked = localize(chain_model(), perturbed("W2"), chunk_size=1)
    assert chunked.divergence == one_run.divergence


def test_accepts_paths_bytes_protos_and_ir_models(tmp_path):
    ref_path, cand_path = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(chain_model(), ref_path)
    onnx.save(perturbed("W2"), cand_path)
    ir_model = ir.serde.deserialize_model(perturbed("W2"))
    outputs_before = [v.name for v in ir_model.graph.outputs]
    for ref, cand in [
        (ref_path, cand_path),
        (str(ref_path), str(cand_path)),
        (chain_model().SerializeToString(), perturbed("W2").SerializeToString()),
        (chain_model(), ir_model),
    ]:
        assert localize(ref, cand).divergence.tensor == "c2"
    assert [v.name for v in ir_model.graph.outputs] == outputs_before  # restored


def test_external_data_next_to_the_models(tmp_path, monkeypatch):
    for name, proto in [("ref", chain_model()), ("cand", perturbed("W2"))]:
        folder = tmp_path / name
        folder.mkdir()
        onnx.save(
            proto,
            folder / "model.onnx",
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="weights.bin",
            size_threshold=0,
        )
    ref, cand = tmp_path / "ref" / "model.onnx", tmp_path / "cand" / "model.onnx"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    saves = []
    real_save = ir.save
    monkeypatch.setattr(ir, "save", lambda *a, **k: saves.append(a[1]) or real_save(*a, **k))

    result = localize(ref, cand, chunk_size=2)  # two chunks (c1 r1 | c2 Y)
    assert result.divergence.tensor == "c2"
    assert len(saves) == 2  # the weights of each model are staged once, not once per chunk
    assert not localize(ref, ref)
    assert sorted(p.name for p in (tmp_path / "cand").iterdir()) == ["model.onnx", "weights.bin"]
    assert list(scratch.iterdir()) == []  # the staging folder is gone


def test_falls_back_to_typed_outputs_if_ort_refuses_untyped_ones(monkeypatch):
    real = _ort.make_session
    refused = []

    def picky(source, **kwargs):
        proto = onnx.load_from_string(source)
        if any(not o.type.HasField("tensor_type") for o in proto.graph.output):
            refused.append([o.name for o in proto.graph.output])
            raise InvalidModelError("ONNX Runtime cannot load the model: output has no type")
        return real(source, **kwargs)

    monkeypatch.setattr(_ort, "make_session", picky)
    ref, cand = chain_model(), perturbed("W2")
    for proto in (ref, cand):  # declare only c2's type
        proto.graph.value_info.append(oh.make_tensor_value_info("c2", FLOAT, None))
    result = localize(ref, cand)
    assert refused  # the untyped exposures were refused, then only c2 (and Y) were exposed
    assert result.divergence.tensor == "c2" and result.checked == 1


def test_input_shapes_and_seed_are_reported():
    result = localize(chain_model(), perturbed("W2"), input_shapes={"X": (2, 3, 6, 6)}, seed=7)
    assert result.input_shapes == {"X": [2, 3, 6, 6]} and result.seed == 7
    assert result.divergence.comparison.shape == (2, 5, 6, 6)


def test_to_dict_is_json():
    data = json.loads(json.dumps(localize(chain_model(), perturbed("W2")).to_dict()))
    assert data["found"] is True
    assert data["divergence"]["tensor"] == "c2" and data["divergence"]["node"] == "conv2"
    assert data["divergence"]["comparison"]["passed"] is False
    assert data["divergence"]["candidate_chain"] == [
        {"name": "conv2", "op_type": "Conv", "domain": ""}
    ]
    none = json.loads(json.dumps(localize(chain_model(), chain_model()).to_dict()))
    assert none["found"] is False and none["divergence"] is None


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError):
        localize(chain_model(), chain_model(), chunk_size=0)
    with pytest.raises(UsageError):
        localize(chain_model(), chain_model(), atol=-1)
    with pytest.raises(UsageError):
        localize(chain_model(), chain_model(), input_shapes={"nope": (1,)})
    with pytest.raises(UsageError):
        localize(object(), chain_model())
    with pytest.raises(InputNotFoundError):
        localize(tmp_path / "missing.onnx", chain_model())


def test_a_candidate_ort_cannot_run_is_a_message():
    broken = chain_model()
    broken.graph.node[2].op_type = "NoSuchOp"
    result = localize(chain_model(), broken)
    assert not result
    assert result.message.startswith("ONNX Runtime cannot run the candidate model")


def test_no_shared_names():
    other = chain_model()
    for node in other.graph.node:
        node.output[0] = node.output[0] + "_x" if node.output[0] != "Y" else "Y"
        node.input[0] = node.input[0] + "_x" if node.input[0] != "X" else "X"
    other.graph.node[-1].output[0] = "Y"  # keep the graph output, but it is the only shared name
    result = localize(chain_model(), other)
    assert result.shared == 1 and result.checked == 1 and not result


# --- after a fold ----------------------------------------------------------------------------------


def conv_bn_relu(*, folded: str | None = None, bn_scale: float = 1.5) -> onnx.ModelProto:
    """``X -conv-> c -bn-> b -relu-> Y``; ``folded="keep"`` folds the BN into the Conv keeping its
    output name ``c`` (what bnfold does), ``folded="rename"`` has the Conv write ``b`` instead."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    scale = np.full(4, bn_scale, np.float32)
    shift = np.arange(4, dtype=np.float32)
    mean, var = rng.standard_normal(4).astype(np.float32), np.full(4, 0.5, np.float32)
    inits = {"W": w, "B": b}
    if folded is None:
        inits.update(scale=scale, shift=shift, mean=mean, var=var)
        nodes = [
            oh.make_node("Conv", ["X", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            oh.make_node(
                "BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["b"], name="bn"
            ),
            oh.make_node("Relu", ["b"], ["Y"], name="relu"),
        ]
    else:
        k = scale / np.sqrt(var + np.float32(1e-5))
        inits = {"Wf": w * k[:, None, None, None], "Bf": (b - mean) * k + shift}
        out = "c" if folded == "keep" else "b"
        nodes = [
            oh.make_node("Conv", ["X", "Wf", "Bf"], [out], name="conv", pads=[1, 1, 1, 1]),
            oh.make_node("Relu", [out], ["Y"], name="relu"),
        ]
    graph = oh.make_graph(
        nodes,
        "cbr",
        [oh.make_tensor_value_info("X", FLOAT, [1, 3, 5, 5])],
        [oh.make_tensor_value_info("Y", FLOAT, [1, 4, 5, 5])],
        [onh.from_array(a.astype(np.float32), n) for n, a in inits.items()],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("style", ["keep", "rename"])
def test_a_correct_fold_has_no_divergence(style):
    result = localize(conv_bn_relu(), conv_bn_relu(folded=style))
    assert not result, result.describe()
    assert result.checked == 2  # keep: c (as b), Y; rename: b, Y


def test_a_wrong_fold_that_kept_the_conv_name_names_the_conv():
    # The candidate's c stands for the reference's b (the folded BN's output), not for its c.
    d = localize(conv_bn_relu(), conv_bn_relu(folded="keep", bn_scale=1.0)).divergence
    assert (d.tensor, d.reference_tensor, d.node, d.op_type) == ("c", "b", "conv", "Conv")
    assert d.reference_producer == Producer("bn", "BatchNormalization")
    assert d.reference_chain == (Producer("conv", "Conv"), Producer("bn", "BatchNormalization"))
    assert "compared with the reference's 'b'" in d.describe()


def test_a_wrong_fold_that_renamed_names_the_conv_through_its_chain():
    d = localize(conv_bn_relu(), conv_bn_relu(folded="rename", bn_scale=1.0)).divergence
    assert (d.tensor, d.reference_tensor, d.node) == ("b", "b", "conv")
    assert d.reference_producer == Producer("bn", "BatchNormalization")


def test_bn_kept_in_place_weights_compare_either_way():
    # Same producer (op and input names) but the BN is gone: c may equal the reference's c or b.
    ref = conv_bn_relu()
    cand = conv_bn_relu(folded="keep")
    for init in cand.graph.initializer:
        init.name = {"Wf": "W", "Bf": "B"}[init.name]
    cand.graph.node[0].input[1:] = ["W", "B"]
    assert not localize(ref, cand)


@pytest.fixture(scope="module")
def folded_cnn2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fold") / "cnn2d_folded.onnx"
    result = fold(SAMPLES / "cnn2d.onnx", out)
    assert result, "the sample model should fold and verify"
    return out


def test_folded_sample_model_matches(folded_cnn2d):
    result = localize(SAMPLES / "cnn2d.onnx", folded_cnn2d)
    assert not result, result.describe()
    assert result.checked == result.shared == 6  # both Conv outputs compared with their BN outputs


def test_perturbed_folded_sample_model_names_the_conv(folded_cnn2d, tmp_path):
    proto = onnx.load(folded_cnn2d)
    conv = next(n for n in proto.graph.node if n.name == "/3/Conv")
    weight = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    array = onh.to_array(weight).copy()
    array[0] += np.float32(0.25)
    weight.CopyFrom(onh.from_array(array, weight.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, broken)
    assert not verify_models(SAMPLES / "cnn2d.onnx", broken)

    result = localize(SAMPLES / "cnn2d.onnx", broken)
    d = result.divergence
    assert d is not None
    assert (d.tensor, d.node, d.op_type) == ("/3/Conv_output_0", "/3/Conv", "Conv")
    assert d.reference_tensor == "/4/BatchNormalization_output_0"
    assert d.reference_producer.op_type == "BatchNormalization"
    assert [p.name for p in d.reference_chain] == ["/3/Conv", "/4/BatchNormalization"]
    assert d.checked == 3  # /0/Conv_output_0 (as the first BN's output) and /2/Relu matched
