"""Loading validates its input; saving is atomic and never touches the input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from bnfold import io as bio
from bnfold.errors import ExternalDataError, InputNotFoundError, InvalidModelError, OutputError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _external_model(
    folder: Path,
    location: str = "w.data",
    *,
    offset: int = 0,
    length: int | None = None,
    write_data: bool = True,
) -> Path:
    """A Conv model whose weight lives in external data at ``location`` (relative to ``folder``)."""
    w = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1)
    if write_data:
        (folder / location).parent.mkdir(parents=True, exist_ok=True)
        (folder / location).write_bytes(w.tobytes())
    t = onnx.TensorProto(name="W", data_type=onnx.TensorProto.FLOAT, dims=[2, 3, 1, 1])
    t.data_location = onnx.TensorProto.EXTERNAL
    entries = {
        "location": location,
        "offset": str(offset),
        "length": str(length if length is not None else w.nbytes),
    }
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 2, 2, 2])],
        [t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_load_sample_model():
    model = bio.load(SAMPLES / "cnn1d.onnx")
    assert sum(n.op_type == "BatchNormalization" for n in model.graph) == 2


@pytest.mark.parametrize(
    "make, error, text",
    [
        (lambda d: d / "missing.onnx", InputNotFoundError, "no such file"),
        (lambda d: d, InputNotFoundError, "is a directory"),
        (lambda d: _write(d / "empty.onnx", b""), InvalidModelError, "empty file"),
        (lambda d: _write(d / "text.onnx", b"hello, I am not a model\n"), InvalidModelError, "not"),
        (
            lambda d: _write(d / "trunc.onnx", (SAMPLES / "cnn1d.onnx").read_bytes()[:1000]),
            InvalidModelError,
            "not a valid ONNX model",
        ),
        (
            lambda d: _write(
                d / "graph.onnx", helper.make_graph([], "g", [], []).SerializeToString()
            ),
            InvalidModelError,
            "not an ONNX model",
        ),
    ],
    ids=["missing", "directory", "empty", "text", "truncated", "graph-not-model"],
)
def test_bad_input_is_one_clear_error(tmp_path, make, error, text):
    path = make(tmp_path)
    with pytest.raises(error) as exc_info:
        bio.load(path)
    message = str(exc_info.value)
    assert text in message
    assert "\n" not in message


def test_external_data_loads_memory_mapped(tmp_path):
    model = bio.load(_external_model(tmp_path))
    w = model.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor)
    np.testing.assert_array_equal(w.numpy().reshape(-1), np.arange(6, dtype=np.float32))


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"write_data": False}, "missing"),
        ({"location": "../outside.data"}, "escapes"),
        ({"location": "/etc/passwd", "write_data": False}, "escapes"),
        ({"offset": 16}, "runs past the end"),
        ({"length": 10_000}, "runs past the end"),
    ],
    ids=["missing", "dotdot", "absolute", "offset", "length"],
)
def test_bad_external_data(tmp_path, kwargs, text):
    folder = tmp_path / "m"
    folder.mkdir()
    if kwargs.get("location", "").startswith(".."):
        (tmp_path / "outside.data").write_bytes(b"\0" * 24)
        kwargs = {**kwargs, "write_data": False}
    path = _external_model(folder, **kwargs)
    with pytest.raises(ExternalDataError, match=text):
        bio.load(path)


def test_external_data_symlink_out_of_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "secret.data").write_bytes(np.zeros(6, np.float32).tobytes())
    os.symlink(tmp_path / "secret.data", folder / "w.data")
    path = _external_model(folder, write_data=False)
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        bio.load(path)


def test_output_checks(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes((SAMPLES / "cnn1d.onnx").read_bytes())
    with pytest.raises(OutputError, match="is the input"):
        bio.check_output_path(src, input_path=src)
    with pytest.raises(OutputError, match="is the input"):
        bio.check_output_path(tmp_path / "." / "in.onnx", input_path=src)
    with pytest.raises(OutputError, match="is a directory"):
        bio.check_output_path(tmp_path, input_path=src)
    with pytest.raises(OutputError, match="does not exist"):
        bio.check_output_path(tmp_path / "nope" / "out.onnx", input_path=src)
    data = (tmp_path / "out.onnx.data").resolve()
    with pytest.raises(OutputError, match="external data"):
        bio.check_output_path(tmp_path / "out.onnx", input_path=src, protected={data})


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            bio.check_output_path(ro / "out.onnx", input_path=None)
    finally:
        ro.chmod(0o700)


def test_staged_output_is_invisible_until_commit(tmp_path):
    model = bio.load(SAMPLES / "cnn1d.onnx")
    final = tmp_path / "out.onnx"
    with bio.StagedOutput(final) as staged:
        staged.write(model, external=False)
        assert staged.path.exists() and not final.exists()
        staged.commit()
    assert final.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]  # staging folder removed
    onnx.checker.check_model(str(final), full_check=True)


def test_staged_output_discarded_on_error(tmp_path):
    model = bio.load(SAMPLES / "cnn1d.onnx")
    final = tmp_path / "out.onnx"
    final.write_bytes(b"previous")
    with pytest.raises(RuntimeError), bio.StagedOutput(final) as staged:
        staged.write(model, external=True)
        raise RuntimeError("interrupted")
    assert final.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_external_output_round_trips(tmp_path):
    model = bio.load(SAMPLES / "cnn1d.onnx")
    final = tmp_path / "out.onnx"
    with bio.StagedOutput(final) as staged:
        staged.write(model, external=True)
        staged.commit()
    assert (tmp_path / "out.onnx.data").exists()
    reloaded = onnx.load(str(final), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in reloaded.graph.initializer)
    onnx.checker.check_model(str(final), full_check=True)


def test_commit_steps_are_looked_up_on_the_package(tmp_path, monkeypatch):
    """``bnfold.io`` is a package: replacing a commit step on it (as the crash test's KILL_INSIDE
    hook does) must change what ``StagedOutput.commit`` runs, in the protocol's order."""
    model = bio.load(SAMPLES / "cnn1d.onnx")
    final = tmp_path / "out.onnx"
    calls: list[str] = []
    for _ in range(2):  # the second commit replaces the first and removes its data
        with bio.StagedOutput(final) as staged:
            staged.write(model, external=True)
            calls.clear()
            for name in ("_publish_data", "_replace_model", "_remove_files"):
                real = getattr(bio, name)

                def step(*args, _real=real, _name=name):
                    calls.append(_name)
                    return _real(*args)

                monkeypatch.setattr(bio, name, step)
            staged.commit()
            monkeypatch.undo()
    assert calls == ["_publish_data", "_replace_model", "_remove_files"]
    onnx.checker.check_model(str(final), full_check=True)
    data = [p.name for p in tmp_path.iterdir() if p.name.endswith(".data")]
    assert len(data) == 1, data  # the first commit's data was removed by the second


@pytest.mark.parametrize(
    "name",
    [
        *bio.__all__,
        "from_bytes",
        "needs_external_data",
        "save_ir_to",
        "save_proto_to",
        "_publish_data",
        "_replace_model",
        "_remove_files",
        "_iter_tensor_protos",
    ],
)
def test_every_name_other_modules_use_is_on_the_package(name):
    assert getattr(bio, name) is not None


def test_from_proto_does_not_modify_the_proto():
    proto = onnx.load(str(SAMPLES / "cnn1d.onnx"))
    before = proto.SerializeToString()
    model = bio.from_proto(proto)
    assert isinstance(model, ir.Model)
    assert proto.SerializeToString() == before
    np.testing.assert_array_equal(
        numpy_helper.to_array(proto.graph.initializer[0]),
        model.graph.initializers[proto.graph.initializer[0].name].const_value.numpy(),
    )
