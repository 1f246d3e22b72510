"""Hostile and broken files: one clear line, exit 2, no traceback, nothing written or changed.

Every case runs ``bnfold fold`` through the CLI (typer's CliRunner) on a file built in a fresh folder
and checks the contract of exit code 2 (README, "Exit codes"): exactly one line on stderr, starting
``bnfold: error:``, that names the problem; no traceback; every file in the folder has the bytes it
had before; no file or folder (staging folders included) appeared, there or in the test's own
temporary folder (``conftest.private_tempdir``: what other processes put in the machine's shared
temporary folder is never looked at).

A model that is well formed but that ONNX Runtime cannot run (an operator of an unknown domain) is
not an error: the BatchNorms around it are folded and the report says why it could not be verified;
unverified is not a pass (exit 4, nothing written) unless ``--accept-unverified``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from bnfold.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
runner = CliRunner()

W = np.arange(2 * 3, dtype=np.float32).reshape(2, 3, 1, 1) / 7
BN = {"s": [1.5, -0.5], "b": [0.1, 0.2], "m": [0.3, -0.1], "v": [0.9, 2.0]}


# --------------------------------------------------------------------------------------- helpers
def _snapshot(folder: Path) -> dict[str, object]:
    """Every path under ``folder`` (hidden ones too): a file's bytes (size and mtime for big ones),
    None for a folder or a link."""
    snap: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink() or not p.is_file():
                snap[rel] = None
            elif p.stat().st_size > 64 << 20:
                snap[rel] = (p.stat().st_size, p.stat().st_mtime_ns)
            else:
                snap[rel] = p.read_bytes()
    return snap


#: Written to the temporary folder by ONNX Runtime itself when it is imported (a session-id file).
ORT_TEMP_FILES = {".ses"}


def _temp_entries() -> set[str]:
    """What is in this test's private temporary folder (its TMPDIR, given by conftest)."""
    return set(os.listdir(tempfile.gettempdir())) - ORT_TEMP_FILES


def refused(args: list, folder: Path, text: str) -> str:
    """Run ``bnfold *args`` and check the exit-2 contract; return the error line."""
    before, temps = _snapshot(folder), _temp_entries()
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnfold: error:"), lines
    assert "Traceback" not in result.output + result.stderr
    assert text.lower() in lines[0].lower(), lines[0]
    print(lines[0])  # shown with pytest -s: the messages users see
    assert _snapshot(folder) == before, "a file was written, changed or removed"
    assert _temp_entries() <= temps, "a temporary file or folder was left behind"
    return lines[0]


def test_refused_ignores_other_processes_temp_folders(folder, shared_temp, monkeypatch):
    """Another bnfold process (or anything) creating ``bnfold-*`` in the shared temporary folder
    while a test runs does not fail the test: only the test's own TMPDIR is checked."""
    path = folder / "broken.onnx"
    path.write_bytes(b"\x08\x07\x12\xff not a model")
    intruders: list[Path] = []
    real_invoke = runner.invoke

    def invoke_while_another_process_works(*args, **kwargs):
        intruders.append(Path(tempfile.mkdtemp(prefix="bnfold-", dir=shared_temp)))
        return real_invoke(*args, **kwargs)

    monkeypatch.setattr(runner, "invoke", invoke_while_another_process_works)
    try:
        refused(["fold", path, "-o", folder / "out.onnx"], folder, "")
        assert intruders and intruders[0].is_dir()
    finally:
        for p in intruders:
            p.rmdir()


def test_refused_sees_what_is_left_in_the_tests_own_tempdir(folder, private_tempdir, monkeypatch):
    """The temp check is not vacuous: a folder left in the test's TMPDIR fails it."""
    path = folder / "broken.onnx"
    path.write_bytes(b"\x08\x07\x12\xff not a model")
    real_invoke = runner.invoke

    def invoke_and_leave_a_folder(*args, **kwargs):
        tempfile.mkdtemp(prefix="bnfold-")
        return real_invoke(*args, **kwargs)

    monkeypatch.setattr(runner, "invoke", invoke_and_leave_a_folder)
    with pytest.raises(AssertionError, match="left behind"):
        refused(["fold", path, "-o", folder / "out.onnx"], folder, "")


def conv_bn(
    nodes_extra: list | None = None, *, weight: TensorProto | None = None, opset: int = 17
) -> onnx.ModelProto:
    """X -> Conv(W) -> BatchNormalization -> Y, with its initializers (W may be replaced)."""
    inits = [weight if weight is not None else numpy_helper.from_array(W, "W")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in BN.items()]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["Y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes + (nodes_extra or []),
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2, 2, 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def save(model: onnx.ModelProto | bytes, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def external_weight(
    location: str, *, offset: int = 0, length: int | None = None, dims: list[int] | None = None
) -> TensorProto:
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=dims or list(W.shape))
    t.data_location = TensorProto.EXTERNAL
    entries = {
        "location": location,
        "offset": str(offset),
        "length": str(W.nbytes if length is None else length),
    }
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)
    return t


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d


# --------------------------------------------------------------------------------------- external data
def _ext_case(folder: Path, case: str) -> tuple[Path, str]:
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.data").write_bytes(W.tobytes())
    (folder / "w.data").write_bytes(W.tobytes())
    location, expect, kw = "w.data", "", {}
    if case == "dotdot":
        location, expect = "../outside/secret.data", "escapes the model's folder"
    elif case == "deep-dotdot":
        location, expect = "sub/../../../../etc/passwd", "escapes the model's folder"
    elif case == "absolute":
        location, expect = str(outside / "secret.data"), "escapes the model's folder"
    elif case == "symlink-file":
        os.symlink(outside / "secret.data", folder / "link.data")
        location, expect = "link.data", "outside the model's folder"
    elif case == "symlink-folder":
        os.symlink(outside, folder / "sub")
        location, expect = "sub/secret.data", "outside the model's folder"
    elif case == "missing":
        location, expect = "nope.data", "is missing"
    elif case == "offset-past-end":
        kw, expect = {"offset": 8}, "runs past the end"
    elif case == "length-past-end":
        kw, expect = {"length": 10_000}, "runs past the end"
    elif case == "huge-offset":
        kw, expect = {"offset": 2**62}, "runs past the end"
    elif case == "length-short":
        kw, expect = {"length": 8}, "needs 24 bytes"
    elif case == "absurd-dims":
        kw, expect = {"dims": [2**30, 2**30, 1, 1], "length": None}, "absurd"
    elif case == "not-a-file":
        (folder / "adir").mkdir()
        location, expect = "adir", "not a regular file"
    elif case == "nul-byte":
        location, expect = "w.data\0x", "NUL"
    elif case == "hard-link":
        os.link(folder / "w.data", folder / "hard.data")
        location, expect = "hard.data", "hard links"
    elif case == "no-location":
        location, expect = "", "has no location"
    weight = external_weight(location, **kw)
    if case == "no-location":
        del weight.external_data[0]
    return save(conv_bn(weight=weight), folder), expect


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "deep-dotdot",
        "absolute",
        "symlink-file",
        "symlink-folder",
        "missing",
        "offset-past-end",
        "length-past-end",
        "huge-offset",
        "length-short",
        "absurd-dims",
        "not-a-file",
        "nul-byte",
        "hard-link",
        "no-location",
    ],
)
def test_hostile_external_data(folder, case):
    path, expect = _ext_case(folder, case)
    refused(["fold", path, "-o", folder / "out.onnx"], folder.parent, expect)


def test_valid_external_data_still_folds(folder):
    (folder / "w.data").write_bytes(W.tobytes())
    path = save(conv_bn(weight=external_weight("w.data")), folder)
    result = runner.invoke(app, ["fold", str(path), "-o", str(folder / "out.onnx"), "-q"])
    assert result.exit_code == 0, result.output
    assert (folder / "out.onnx.data").is_file()


# --------------------------------------------------------------------------------------- protobuf
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_if_model(depth: int) -> bytes:
    """A model whose If nodes nest ``depth`` subgraphs deep, encoded by hand (protobuf's own
    serializer refuses to build what its parser would refuse to read)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["o0"])],
        "g0",
        [],
        [helper.make_tensor_value_info("o0", TensorProto.FLOAT, None)],
    ).SerializeToString()
    for i in range(1, depth + 1):
        out = "Y" if i == depth else f"o{i}"
        attr = helper.make_attribute("then_branch", helper.make_graph([], "x", [], []))
        attr.ClearField("g")
        attr.type = onnx.AttributeProto.GRAPH
        attr_bytes = attr.SerializeToString() + _field(6, graph)
        else_attr = helper.make_attribute(
            "else_branch",
            helper.make_graph(
                [helper.make_node("Identity", ["X"], [f"e{i}"])],
                f"e{i}",
                [],
                [helper.make_tensor_value_info(f"e{i}", TensorProto.FLOAT, None)],
            ),
        )
        node = helper.make_node("If", ["cond"], [out])
        node.attribute.append(else_attr)
        node_bytes = node.SerializeToString() + _field(5, attr_bytes)
        name = "main" if i == depth else f"g{i}"
        shell = onnx.GraphProto(name=name)
        if i == depth:
            shell.input.extend(
                [
                    helper.make_tensor_value_info("X", TensorProto.FLOAT, [1]),
                    helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                ]
            )
        shell.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        graph = shell.SerializeToString() + _field(1, node_bytes)
    model = helper.make_model(onnx.GraphProto(), opset_imports=[helper.make_opsetid("", 17)])
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph)


def _bytes_case(case: str) -> tuple[bytes, str]:
    sample = (SAMPLES / "cnn2d.onnx").read_bytes()
    if case == "truncated-early":
        return sample[:100], "not a valid ONNX model"
    if case == "truncated-late":
        return sample[: len(sample) - 7], "not a valid ONNX model"
    if case == "corrupted":
        data = bytearray(sample)
        data[40:72] = b"\xff" * 32  # an unterminated varint / bad wire types in the middle
        return bytes(data), "not a valid ONNX model"
    if case == "random-bytes":
        return random.Random(0).randbytes(4096), "not"
    if case == "tensor-proto":
        return numpy_helper.from_array(W, "W").SerializeToString(), "not"
    if case == "node-proto":
        return helper.make_node("Relu", ["x"], ["y"]).SerializeToString(), "not"
    if case == "zip":  # e.g. a PyTorch checkpoint given by mistake
        return b"PK\x03\x04" + bytes(200), "not"
    if case == "no-graph":
        return onnx.ModelProto(ir_version=8).SerializeToString(), "no graph"
    if case == "nested-200":
        return nested_if_model(200), "not a valid ONNX model"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "truncated-early",
        "truncated-late",
        "corrupted",
        "random-bytes",
        "tensor-proto",
        "node-proto",
        "zip",
        "no-graph",
        "nested-200",
    ],
)
def test_broken_protobuf(folder, case):
    data, expect = _bytes_case(case)
    path = save(data, folder)
    refused(["fold", path, "-o", folder / "out.onnx"], folder, expect)


def test_bigger_than_protobuf_can_hold(folder):
    path = folder / "huge.onnx"
    with open(path, "wb") as f:
        f.truncate(3 << 30)  # sparse: no disk used
    refused(["fold", path, "-o", folder / "out.onnx"], folder, "2 GB")


def test_deepest_parseable_nesting_is_handled(folder):
    """The deepest If nesting protobuf parses (about 32 levels) loads, folds nothing, verifies."""
    for depth in (32, 31, 30):
        try:
            onnx.load_from_string(nested_if_model(depth))
        except Exception:
            continue
        break
    path = save(nested_if_model(depth), folder)
    result = runner.invoke(app, ["fold", str(path), "-o", str(folder / "out.onnx"), "-q"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------- graphs
def _graph_case(case: str) -> tuple[onnx.ModelProto, str]:
    bn = helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["Y"], name="bn")
    m = conv_bn()
    g = m.graph
    if case == "cycle":
        g.ClearField("node")
        g.node.extend([helper.make_node("Conv", ["Y", "W"], ["c"], name="conv"), bn])
        return m, "has a cycle"
    if case == "cycle-off-path":
        g.node.extend(
            [
                helper.make_node("Relu", ["d"], ["e"], name="r1"),
                helper.make_node("Relu", ["e"], ["d"], name="r2"),
            ]
        )
        return m, "has a cycle"
    if case == "self-loop":
        g.node.append(helper.make_node("Relu", ["z"], ["z"], name="r"))
        return m, "has a cycle"
    if case == "dangling-input":
        g.node[1].input[4] = "nowhere"
        return m, "'nowhere', which is not defined"
    if case == "dangling-output":
        g.output[0].name = "nowhere"
        return m, "output 'nowhere' is not defined"
    if case == "duplicate-output":
        g.node.append(helper.make_node("Relu", ["X"], ["c"], name="again"))
        return m, "already defined"
    if case == "output-shadows-initializer":
        g.node[0].output[0] = "s"
        g.node[1].input[0] = "s"
        return m, "already defined"
    if case == "duplicate-initializer":
        g.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "s"))
        return m, "two initializers named 's'"
    if case == "duplicate-input":
        g.input.append(helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 2, 2]))
        return m, "declares input 'X' twice"
    if case == "bn-without-outputs":
        g.node[1].ClearField("output")
        g.output[0].name = "c"
        return m, "has 0 outputs"
    if case == "bn-three-inputs":
        del g.node[1].input[3:]
        return m, "has 3 inputs"
    if case == "epsilon-is-a-string":
        g.node[1].attribute.append(helper.make_attribute("epsilon", "tiny"))
        return m, "attribute 'epsilon' has type STRING"
    if case == "group-is-a-float":
        g.node[0].attribute.append(helper.make_attribute("group", 1.5))
        return m, "attribute 'group' has type FLOAT"
    if case == "zero-stride":
        g.node[0].attribute.append(helper.make_attribute("strides", [0, 1]))
        return m, "strides = [0, 1] must be >= 1"
    if case == "negative-group":
        g.node[0].attribute.append(helper.make_attribute("group", -(2**40)))
        return m, "must be >= 1"
    if case == "training-mode-7":
        g.node[1].attribute.append(helper.make_attribute("training_mode", 7))
        return m, "training_mode = 7 must be 0 or 1"
    if case == "dangling-in-subgraph":
        body = helper.make_graph(
            [helper.make_node("Identity", ["ghost"], ["o"])],
            "body",
            [],
            [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        )
        g.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=body, else_branch=body))
        g.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        return m, "'ghost', which is not defined"
    if case == "sparse-initializer":
        values = numpy_helper.from_array(np.ones(1, np.float32), "sp")
        indices = numpy_helper.from_array(np.zeros(1, np.int64), "sp_i")
        g.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
        return m, "sparse initializers"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "cycle",
        "cycle-off-path",
        "self-loop",
        "dangling-input",
        "dangling-output",
        "duplicate-output",
        "output-shadows-initializer",
        "duplicate-initializer",
        "duplicate-input",
        "bn-without-outputs",
        "bn-three-inputs",
        "epsilon-is-a-string",
        "group-is-a-float",
        "zero-stride",
        "negative-group",
        "training-mode-7",
        "dangling-in-subgraph",
        "sparse-initializer",
    ],
)
def test_malformed_graph(folder, case):
    model, expect = _graph_case(case)
    path = save(model, folder)
    refused(["fold", path, "-o", folder / "out.onnx"], folder, expect)


def _tensor_case(case: str) -> tuple[onnx.ModelProto, str]:
    w = numpy_helper.from_array(W, "W")
    if case == "raw-too-short":
        w.raw_data = w.raw_data[:8]
        return conv_bn(weight=w), "needs 24 bytes of data but has 8"
    if case == "raw-too-long":
        w.raw_data = w.raw_data + b"\0" * 4
        return conv_bn(weight=w), "needs 24 bytes of data but has 28"
    if case == "float-data-short":
        w = helper.make_tensor("W", TensorProto.FLOAT, [6], W.reshape(-1).tolist())
        w.dims[:] = [2, 3, 1, 1]
        del w.float_data[3:]
        return conv_bn(weight=w), "has 3 values in float_data, expected 6"
    if case == "wrong-field":
        w = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2, 3, 1, 1])
        w.int64_data.extend(range(6))
        return conv_bn(weight=w), "wrong field"
    if case == "absurd-dims":
        w.dims[:] = [2**21, 2**21, 1, 1]
        return conv_bn(weight=w), "absurd"
    if case == "huge-dims-small-data":
        w.dims[:] = [2**16, 2**16, 1, 1]
        return conv_bn(weight=w), "needs 17179869184 bytes"
    if case == "negative-dims":
        w.dims[:] = [-2, -3, 1, 1]
        return conv_bn(weight=w), "negative dimension"
    if case == "undefined-dtype":
        w.data_type = 0
        return conv_bn(weight=w), "undefined or unknown data type"
    if case == "constant-attr-mismatch":
        t = numpy_helper.from_array(np.ones(2, np.float32), "tv")
        t.raw_data = t.raw_data[:4]
        m = conv_bn([helper.make_node("Constant", [], ["k"], value=t)])
        return m, "needs 8 bytes of data but has 4"
    if case == "absurd-input":
        m = conv_bn()
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**45
        return m, "absurd"
    if case == "negative-input-dim":
        m = conv_bn()
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
        return m, "negative dimension"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "raw-too-short",
        "raw-too-long",
        "float-data-short",
        "wrong-field",
        "absurd-dims",
        "huge-dims-small-data",
        "negative-dims",
        "undefined-dtype",
        "constant-attr-mismatch",
        "absurd-input",
        "negative-input-dim",
    ],
)
def test_tensor_does_not_match_its_declaration(folder, case):
    model, expect = _tensor_case(case)
    path = save(model, folder)
    refused(["fold", path, "-o", folder / "out.onnx"], folder, expect)


def test_huge_but_not_absurd_input_is_refused_before_allocating(folder):
    m = conv_bn()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**30  # 12 GiB of float32 inputs
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2**30
    path = save(m, folder)
    refused(["fold", path, "-o", folder / "out.onnx"], folder, "--no-verify")


def test_unknown_domain_folds_around_it_and_says_it_is_unverified(folder):
    m = conv_bn()
    g = m.graph
    g.node[1].output[0] = "y0"
    g.node.append(helper.make_node("Mystery", ["y0"], ["Y"], name="mystery", domain="com.example"))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    path = save(m, folder)
    out = folder / "out.onnx"
    result = runner.invoke(app, ["fold", str(path), "-o", str(out), "--json", "-", "-q"])
    assert result.exit_code == 4, result.output  # unverified is not a pass: nothing written
    report = json.loads(result.stdout)
    assert report["totals"] == {"batchnorms": 1, "folded": 1, "kept": 0}
    assert "ONNX Runtime cannot run" in report["verification"]["skipped_reason"]
    assert report["status"] == "unverified" and not report["written"] and not out.exists()
    accepted = ["fold", str(path), "-o", str(out), "--accept-unverified", "--json", "-", "-q"]
    assert runner.invoke(app, accepted).exit_code == 0
    folded = onnx.load(str(out))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Mystery"]
    human = runner.invoke(app, ["fold", str(path), "-o", str(out)])
    assert human.exit_code == 4 and "Not verified: ONNX Runtime cannot run" in human.stdout


def test_nodes_out_of_order_are_accepted(folder):
    """Not topologically sorted but acyclic: ONNX Runtime runs it, so bnfold folds it."""
    m = conv_bn()
    nodes = list(m.graph.node)
    m.graph.ClearField("node")
    m.graph.node.extend(reversed(nodes))
    path = save(m, folder)
    result = runner.invoke(
        app, ["fold", str(path), "-o", str(folder / "out.onnx"), "--json", "-", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["folded"] == 1


def test_absurd_constant_of_shape_is_kept_not_materialised(folder):
    """A BN scale computed by ConstantOfShape of 2^40 elements: kept, nothing allocated."""
    m = conv_bn()
    g = m.graph
    keep = [i for i in g.initializer if i.name != "s"]
    g.ClearField("initializer")
    g.initializer.extend(keep)
    g.node.insert(
        0,
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["s"],
            value=numpy_helper.from_array(np.ones(1, np.float32)),
        ),
    )
    g.node.insert(
        0,
        helper.make_node(
            "Constant", [], ["shape"], value=numpy_helper.from_array(np.array([2**40], np.int64))
        ),
    )
    path = save(m, folder)
    result = runner.invoke(
        app, ["fold", str(path), "-o", str(folder / "out.onnx"), "--json", "-", "-q"]
    )
    # ONNX Runtime cannot run the original either (its shape inference rejects the BN): unverified
    assert result.exit_code == 4, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "unverified" and not report["written"]
    bn = report["batchnorms"][0]
    assert bn["status"] == "kept" and "too large" in bn["detail"]


# --------------------------------------------------------------------------------------- outputs
def _external_input(folder: Path) -> Path:
    (folder / "w.data").write_bytes(W.tobytes())
    return save(conv_bn(weight=external_weight("w.data")), folder)


@pytest.mark.parametrize(
    "case, expect",
    [
        ("input", "is the input"),
        ("input-via-dot", "is the input"),
        ("input-via-symlink", "is the input"),
        ("input-hard-link", "is the input"),
        ("external-data", "external data"),
        ("data-name-clash", "external data"),
        ("directory", "is a directory"),
        ("missing-folder", "does not exist"),
        ("parent-is-a-file", "not a folder"),
        ("proc", "/proc"),
    ],
)
def test_bad_output_path(folder, case, expect):
    src = _external_input(folder)
    out: Path | str = {
        "input": src,
        "input-via-dot": folder / "." / "m.onnx",
        "external-data": folder / "w.data",
        "directory": folder,
        "missing-folder": folder / "nope" / "o.onnx",
        "parent-is-a-file": src / "o.onnx",
        "proc": "/proc/bnfold-out.onnx",
    }.get(case, folder / "o.onnx")
    if case == "input-via-symlink":
        os.symlink(src, folder / "o.onnx")
    elif case == "input-hard-link":
        os.link(src, folder / "o.onnx")
    elif case == "data-name-clash":  # the output's data would be named like the input's
        (folder / "w.data").rename(folder / "o.onnx.data")
        src = save(conv_bn(weight=external_weight("o.onnx.data")), folder)
    if case == "proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc")
    refused(["fold", src, "-o", out], folder, expect)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_output_folder_not_writable(folder):
    src = _external_input(folder)
    ro = folder / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(["fold", src, "-o", ro / "o.onnx"], folder, "not writable")
    finally:
        ro.chmod(0o700)


def test_very_long_output_name_still_writes(folder):
    src = _external_input(folder)
    out = folder / ("x" * 240 + ".onnx")
    result = runner.invoke(app, ["fold", str(src), "-o", str(out), "-q"])
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        assert out.is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left


# --------------------------------------------------------------------------------------- mutations
@pytest.mark.parametrize("seed", range(12))
def test_random_corruption_never_crashes(tmp_path, seed):
    """Random byte edits of a sample model: bnfold may refuse (2), fold (0) or fail verification (1),
    but never crashes (3) or prints a traceback; on a refusal nothing is written."""
    rng = random.Random(seed)
    data = bytearray((SAMPLES / "cnn2d.onnx").read_bytes())
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(data))
        kind = rng.random()
        if kind < 0.6:
            data[i] = rng.randrange(256)
        elif kind < 0.8:
            del data[i : i + rng.randint(1, 16)]
        else:
            data[i:i] = rng.randbytes(rng.randint(1, 16))
    path = save(bytes(data), tmp_path)
    out = tmp_path / "out.onnx"
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["fold", str(path), "-o", str(out), "-q"])
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1
    if result.exit_code != 0:
        assert _snapshot(tmp_path) == before
    assert path.read_bytes() == bytes(data)
