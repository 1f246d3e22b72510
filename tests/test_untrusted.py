"""Untrusted ONNX inputs and outputs (issue 15): output integrity and resource limits.

Each test builds the crafted input that broke an earlier bnfold (a device node as ``-o``, a
``Constant`` whose value lives in the input's data file, a crafted earlier output that names another
input's data, three runs racing on one ``-o``, an unwritable report, a sparse 1 TiB tensor) and
checks the contract: exit 2 with one line and nothing written, or a complete, self-contained output.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from bnfold import io as bio
from bnfold.cli import app
from bnfold.errors import OutputError, ResourceError, resource_error

runner = CliRunner()
W = np.arange(2 * 3, dtype=np.float32).reshape(2, 3, 1, 1) / 7
BN = {"s": [1.5, -0.5], "b": [0.1, 0.2], "m": [0.3, -0.1], "v": [0.9, 2.0]}


def _external(name: str, array: np.ndarray, location: str, offset: int = 0) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
    t.data_location = TensorProto.EXTERNAL
    for k, v in {"location": location, "offset": str(offset), "length": str(array.nbytes)}.items():
        t.external_data.add(key=k, value=v)
    return t


def conv_bn(
    extra_nodes=(), extra_inits=(), *, weight: TensorProto | None = None
) -> onnx.ModelProto:
    inits = [weight if weight is not None else numpy_helper.from_array(W, "W")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in BN.items()]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
        *extra_nodes,
    ]
    out = "Y" if extra_nodes else "y"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 2, 2, 2])],
        inits + list(extra_inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def with_external_weight(folder: Path, name: str = "m.onnx", data: str = "w.data") -> Path:
    (folder / data).write_bytes(W.tobytes())
    path = folder / name
    onnx.save(conv_bn(weight=_external("W", W, data)), path)
    return path


def big_external(folder: Path) -> ir.Model:
    """A model whose weight (6 KiB) onnx_ir keeps in the output's external data file."""
    w = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (folder / "w.data").write_bytes(w.tobytes())
    proto = conv_bn(weight=_external("W", w, "w.data"))
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    proto.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 16
    for d in proto.graph.output[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 1
    onnx.save(proto, folder / "big.onnx")
    return bio.load(folder / "big.onnx")


def refused(args: list, text: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert text.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------- output integrity
def _private_null(folder: Path) -> Path:
    """A character device like /dev/null, made in ``folder``: the test never risks the real one
    (an older bnfold, run as root, replaced /dev/null with a regular file)."""
    node = folder / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError, AttributeError):
        pytest.skip("cannot create a device node here (not root, or nodev)")
    return node


def test_device_node_output_is_refused_and_left_alone(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    node = _private_null(tmp_path)
    refused(["fold", model, "-o", node], "device node")
    assert stat.S_ISCHR(os.stat(node).st_mode), "the device node was replaced"
    link = tmp_path / "null.onnx"
    link.symlink_to(node)  # a link to a device is no way around it
    refused(["fold", model, "-o", link], "device node")
    assert link.is_symlink()
    with pytest.raises(OutputError, match="device node"):
        bio.check_output_path("/dev/null", input_path=model)  # only inspected, never written


def test_fifo_and_socket_outputs_are_refused(tmp_path):
    import socket

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    refused(["fold", model, "-o", fifo], "FIFO")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    sock_path = tmp_path / "s.onnx"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        with pytest.raises(OutputError, match="socket"):
            bio.check_output_path(sock_path, input_path=model)
    finally:
        sock.close()


def _constant_external_model(folder: Path, *, in_subgraph: bool = False) -> Path:
    kval = np.array([1.0, -2.0], np.float32).reshape(1, 2, 1, 1)
    (folder / "k.bin").write_bytes(kval.tobytes())
    const = helper.make_node("Constant", [], ["k"], value=_external("kv", kval, "k.bin"))
    if in_subgraph:
        then = helper.make_graph(
            [const, helper.make_node("Add", ["y", "k"], ["t"])],
            "then",
            [],
            [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 2, 2, 2])],
        )
        other = helper.make_graph(
            [helper.make_node("Identity", ["y"], ["e"])],
            "else",
            [],
            [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 2, 2, 2])],
        )
        nodes = [
            helper.make_node("If", ["cond"], ["Y"], then_branch=then, else_branch=other),
        ]
        inits = [numpy_helper.from_array(np.array(True), "cond")]
    else:
        nodes, inits = [const, helper.make_node("Add", ["y", "k"], ["Y"])], []
    path = folder / "m.onnx"
    onnx.save(conv_bn(nodes, inits), path)
    return path


@pytest.mark.parametrize("in_subgraph", [False, True], ids=["graph", "subgraph"])
def test_constant_with_external_value_travels_with_the_output(tmp_path, in_subgraph):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    model = _constant_external_model(src, in_subgraph=in_subgraph)
    out = dst / "folded.onnx"
    result = runner.invoke(app, ["fold", str(model), "-o", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output + result.stderr
    proto = onnx.load(str(out), load_external_data=False)
    for tensor in bio._iter_tensor_protos(proto):
        assert tensor.data_location != TensorProto.EXTERNAL or not any(
            e.key == "location" and e.value == "k.bin" for e in tensor.external_data
        ), "the output still points at the input's k.bin, which was not copied"
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype(np.float32)
    folded = ort.InferenceSession(str(out)).run(None, {"X": x})[0]
    original = ort.InferenceSession(str(model)).run(None, {"X": x})[0]
    np.testing.assert_allclose(folded, original, rtol=1e-5, atol=1e-6)
    assert (src / "k.bin").exists()


def test_protected_set_includes_constant_data(tmp_path):
    model = bio.load(_constant_external_model(tmp_path))
    assert (tmp_path / "k.bin").resolve() in bio.external_data_files(model)


def test_batch_cleanup_never_deletes_another_inputs_data(tmp_path):
    """A crafted earlier output ``out/x.onnx`` names ``x.onnx.data``, which is really the data of
    input ``y.onnx`` (in the output folder). Folding x used to delete it."""
    inputs, out = tmp_path / "in", tmp_path / "in" / "out"
    out.mkdir(parents=True)
    onnx.save(conv_bn(), inputs / "x.onnx")
    (out / "x.onnx.data").write_bytes(W.tobytes())
    onnx.save(conv_bn(weight=_external("W", W, "out/x.onnx.data")), inputs / "y.onnx")
    crafted = conv_bn(weight=_external("W", W, "x.onnx.data"))
    onnx.save(crafted, out / "x.onnx")
    before = (out / "x.onnx.data").read_bytes()
    result = runner.invoke(
        app, ["fold", str(inputs / "y.onnx"), str(inputs / "x.onnx"), "-O", str(out)]
    )
    assert (out / "x.onnx.data").exists(), "y's input data was deleted by x's cleanup"
    assert (out / "x.onnx.data").read_bytes() == before
    assert result.exit_code == 0, result.output + result.stderr


def test_cleanup_removes_only_the_previous_outputs_own_data(tmp_path):
    model = big_external(tmp_path)
    final = tmp_path / "o.onnx"
    for _ in range(2):  # second run: the first output's data is provably its own and goes
        with bio.StagedOutput(final) as staged:
            staged.write(model, external=True)
            staged.commit()
    datas = sorted(p.name for p in tmp_path.glob("o.onnx*.data"))
    assert len(datas) == 1, datas
    # a previous output whose data file holds more than it reads is not provably bnfold's: kept
    current = tmp_path / datas[0]
    with open(current, "ab") as f:
        f.write(b"someone else's bytes")
    with bio.StagedOutput(final) as staged:
        staged.write(model, external=True)
        staged.commit()
    assert current.exists()
    # protected by the caller: kept even when it is the previous output's own data
    own = tmp_path / next(p.name for p in tmp_path.glob("o.onnx*.data") if p != current)
    with bio.StagedOutput(final) as staged:
        staged.write(model, external=True)
        staged.commit(protected={own})
    assert own.exists()
    with bio.protecting({current}), bio.StagedOutput(final) as staged:
        staged.write(model, external=True)
        staged.commit()
    assert current.exists()


def test_concurrent_runs_on_one_output_all_commit(tmp_path):
    """Three runs stage with external data before any commits; each commit picks its data name
    under the lock, so none fails naming a staging file and the last one wins, complete."""
    model = big_external(tmp_path)
    final = tmp_path / "o.onnx"
    staged = [bio.StagedOutput(final) for _ in range(3)]
    for s in staged:
        s.write(model, external=True)
    for s in staged:
        s.commit()
    proto = onnx.load(str(final))  # loads the data it names: complete
    weight = next(t for t in proto.graph.initializer if t.name == "W")
    np.testing.assert_array_equal(
        numpy_helper.to_array(weight), model.graph.initializers["W"].const_value.numpy()
    )
    leftovers = [p.name for p in tmp_path.iterdir() if ".bnfold-" in p.name]
    assert leftovers == []
    assert len(list(tmp_path.glob("o.onnx*.data"))) == 1


def test_concurrent_threads_on_one_output(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from bnfold.api import fold

    model = with_external_weight(tmp_path)
    out = tmp_path / "o.onnx"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: fold(model, out, verify=False), range(3)))
    assert all(r.report.written for r in results)
    onnx.load(str(out))


@pytest.mark.parametrize("which", ["json", "markdown", "summary"])
def test_unwritable_report_means_nothing_written(tmp_path, monkeypatch, which):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)
    out = tmp_path / "o.onnx"
    bad = tmp_path / "no-such-folder" / "report"
    args = ["fold", str(model), "-o", str(out), "--no-verify"]
    if which == "json":
        args += ["--json", str(bad)]
    elif which == "markdown":
        args += ["--markdown", str(bad)]
    else:
        monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))  # a folder: cannot append
    refused(args, "report" if which != "summary" else "directory")
    assert not out.exists(), "exit 2, but the model was committed"


def test_check_report_path(tmp_path):
    assert bio.check_report_path(tmp_path / "r.json") == tmp_path / "r.json"
    with pytest.raises(OutputError, match="directory"):
        bio.check_report_path(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        bio.check_report_path(tmp_path / "x" / "r.json")
    assert not (tmp_path / "r.json").exists()  # checking creates nothing


# -------------------------------------------------------------------------------- resource limits
def test_sparse_terabyte_tensor_is_refused(tmp_path):
    data = tmp_path / "big.data"
    with open(data, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, no blocks stored
    if os.stat(data).st_blocks * 512 > 1 << 30:
        pytest.skip("this file system does not keep sparse files")
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[1 << 38])
    big.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "big.data", "offset": "0", "length": str(1 << 40)}.items():
        big.external_data.add(key=k, value=v)
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(extra_inits=[big]), model)
    refused(["fold", model, "-o", tmp_path / "o.onnx"], "sparse")
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(ResourceError):
        bio.load(model)


def test_data_budget_accepts_real_data(tmp_path):
    path = with_external_weight(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    assert bio.check_data_budget(proto, tmp_path, str(path)) == W.nbytes


def test_onnxruntime_allocation_failure_is_a_resource_error():
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    exc = ort_state.Fail("[ONNXRuntimeError] : 1 : FAIL : bad allocation")
    assert isinstance(resource_error(exc), ResourceError)
    assert resource_error(ort_state.Fail("[ONNXRuntimeError] : 1 : FAIL : Node X failed")) is None


@pytest.mark.parametrize(
    "exc, expect",
    [
        (MemoryError("Unable to allocate 1.00 TiB"), "out of memory"),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), "cannot map"),
        (ValueError("mmap length is greater than file size"), "memory-map"),
        (RuntimeError("[ONNXRuntimeError] : 6 : Failed to allocate memory"), "out of memory"),
        (ValueError("some other problem"), None),
        (KeyError("x"), None),
    ],
)
def test_resource_errors_are_recognised(exc, expect):
    got = resource_error(exc, "m.onnx")
    if expect is None:
        assert got is None
    else:
        assert isinstance(got, ResourceError) and got.exit_code == 2
        assert expect in str(got) and "\n" not in str(got)


def test_out_of_memory_during_fold_is_one_line_exit_2(tmp_path, monkeypatch):
    """Fault injection: the fold's memory runs out (numpy raises MemoryError)."""
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 8.00 GiB for an array")

    monkeypatch.setattr(ir.serde, "deserialize_model", no_memory)
    refused(["fold", model, "-o", tmp_path / "o.onnx"], "out of memory")
    assert not (tmp_path / "o.onnx").exists()


def test_batch_model_out_of_memory_is_that_models_exit_2(tmp_path, monkeypatch):
    from bnfold.batch import _fold_one
    from bnfold.options import FoldOptions

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), model)

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(ir.serde, "deserialize_model", no_memory)
    item = _fold_one((str(model), str(tmp_path / "o.onnx"), FoldOptions(), frozenset()))
    assert item.exit_code == 2 and "out of memory" in item.error
    assert json.dumps(item.to_dict())


def test_input_files_lists_the_model_and_every_data_file_it_reads(tmp_path):
    model = _constant_external_model(tmp_path)  # k.bin read by a Constant
    (tmp_path / "w.data").write_bytes(W.tobytes())
    proto = onnx.load(str(model), load_external_data=False)
    proto.graph.initializer[0].CopyFrom(_external("W", W, "w.data"))
    onnx.save(proto, model)
    assert bio.input_files(model) == {
        model.resolve(),
        (tmp_path / "k.bin").resolve(),
        (tmp_path / "w.data").resolve(),
    }
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert bio.input_files(junk) == {junk.resolve()}
