"""Loading and saving models: the only module that touches ``onnx`` protobuf.

Loading validates before it trusts: the file must exist and parse as a ModelProto with a graph, and
every external-data reference must stay inside the model's folder (no absolute paths, no ``..``, no
symlink that leads out), name an existing file, and lie within it. Weights stay memory-mapped by
onnx_ir; nothing is read until it is needed.

Saving is atomic. The model (and its external data, if any) is written into a private staging folder
next to the destination; only after it is complete (and, in ``bnfold fold``, verified) are the files
moved into place with ``os.replace``: the external data first, then the model file. An interrupted run
(Ctrl-C, an exception, SIGKILL) never leaves a half-written file at the destination.
"""

from __future__ import annotations

__all__ = [
    "load",
    "from_proto",
    "to_proto",
    "model_bytes_estimate",
    "has_external_data",
    "external_data_files",
    "check_output_path",
    "StagedOutput",
    "TWO_GB",
]

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .errors import ExternalDataError, InputNotFoundError, InvalidModelError, OutputError

TWO_GB = 2**31 - 1  # protobuf's hard limit on one serialized message
_HEADROOM = 64 << 20  # leave room for the graph itself when deciding on external data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_graph_protos(attr.g)
            for g in attr.graphs:
                yield from _iter_graph_protos(g)


def _iter_tensor_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    graphs = list(_iter_graph_protos(model.graph))
    for f in model.functions:
        for node in f.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.extend(_iter_graph_protos(attr.g))
    for g in graphs:
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Validate every external reference; return the external files used."""
    base_real = base_dir.resolve()
    files: dict[Path, int] = {}
    for tensor in _iter_tensor_protos(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        name = tensor.name or "<unnamed>"
        if not location:
            raise ExternalDataError(f"tensor {name!r} is marked external but has no location")
        loc = Path(location)
        if loc.is_absolute() or ".." in loc.parts:
            raise ExternalDataError(
                f"tensor {name!r}: external data location {location!r} escapes the model's folder"
            )
        full = base_dir / loc
        try:
            real = full.resolve()
        except OSError as exc:
            raise ExternalDataError(f"tensor {name!r}: cannot resolve {location!r}: {exc}") from None
        if base_real != real and base_real not in real.parents:
            raise ExternalDataError(
                f"tensor {name!r}: external data {location!r} leads outside the model's folder"
            )
        if not real.is_file():
            raise ExternalDataError(
                f"tensor {name!r}: external data file {str(full)!r} is missing"
            )
        size = files.get(real)
        if size is None:
            size = files[real] = real.stat().st_size
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") else size - offset
        except ValueError:
            raise ExternalDataError(f"tensor {name!r}: malformed offset/length") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise ExternalDataError(
                f"tensor {name!r}: external data [{offset}, {offset + length}) runs past the end of "
                f"{location!r} ({size} bytes)"
            )
    return list(files)


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx_ir with external weights memory-mapped, validating as it goes."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise InputNotFoundError(f"{p}: is a directory, not an ONNX file")
    if not p.is_file():
        raise InputNotFoundError(f"{p}: not a regular file")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise InputNotFoundError(f"{p}: {exc.strerror or exc}") from None
    if size == 0:
        raise InvalidModelError(f"{p}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{p}: not a valid ONNX model ({_first_line(exc)})") from None
    except Exception as exc:  # protobuf may raise its own error types on corrupt input
        raise InvalidModelError(f"{p}: not a valid ONNX model ({_first_line(exc)})") from None
    _check_model_proto(proto, str(p))
    _check_external_data(proto, p.parent)
    model = _deserialize(proto, str(p))
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    for fn in model.functions.values():
        ir.external_data.set_base_dir(fn.graph if hasattr(fn, "graph") else fn, str(p.parent))  # type: ignore[arg-type]
    return model


def _check_model_proto(proto: onnx.ModelProto, where: str) -> None:
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{where}: not an ONNX model (no graph)")
    if proto.ir_version <= 0:
        raise InvalidModelError(f"{where}: not an ONNX model (ir_version missing)")
    if not proto.opset_import and proto.ir_version >= 3:
        raise InvalidModelError(f"{where}: ONNX model declares no opset_import")


def _deserialize(proto: onnx.ModelProto, where: str) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises ValueError/TypeError/KeyError on malformed graphs
        raise InvalidModelError(f"{where}: malformed ONNX model ({_first_line(exc)})") from None


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """Wrap an in-memory ModelProto (it is not modified; tensors are shared, not copied)."""
    if not isinstance(proto, onnx.ModelProto):
        raise InvalidModelError(f"expected an onnx.ModelProto, got {type(proto).__name__}")
    _check_model_proto(proto, "model")
    return _deserialize(proto, "model")


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def has_external_data(model: ir.Model) -> bool:
    for graph in model.graphs():
        for v in graph.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                return True
    return False


def external_data_files(model: ir.Model) -> set[Path]:
    """Resolved paths of every external-data file the model reads from."""
    files: set[Path] = set()
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                files.add(Path(t.path).resolve())
    return files


def model_bytes_estimate(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if t is not None:
                total += int(t.nbytes)
    return total


def check_output_path(
    output: str | os.PathLike, *, input_path: str | os.PathLike | None, protected: set[Path] = frozenset()
) -> Path:
    """Refuse outputs that would overwrite the input or its external data, or that cannot be written."""
    out = Path(output)
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name for the output")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{out}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{out}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {str(parent)!r} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"{out}: file is not writable")
    out_real = out.resolve()
    data_real = out_real.with_name(out_real.name + ".data")
    if input_path is not None:
        in_real = Path(input_path).resolve()
        if out_real == in_real or (out.exists() and os.path.samefile(out, input_path)):
            raise OutputError(f"{out}: is the input file; bnfold never modifies its input, choose another -o")
    for f in protected:
        if out_real == f or data_real == f:
            raise OutputError(
                f"{out}: would overwrite the input's external data {str(f)!r}; choose another -o"
            )
    return out


class StagedOutput:
    """Write a model into a staging folder beside ``final``; :meth:`commit` moves it into place.

    ``path`` is the staged model file, which can be loaded (e.g. by ONNX Runtime for verification)
    exactly as it will be at the destination, since external data is referenced by a relative name.
    """

    def __init__(self, final: str | os.PathLike) -> None:
        self.final = Path(final)
        parent = self.final.parent if str(self.final.parent) else Path(".")
        self._dir = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.bnfold-", dir=parent))
        self.path = self._dir / self.final.name
        self.data_name: str | None = None
        self.committed = False

    def write(
        self,
        model: ir.Model,
        *,
        external: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        try:
            if external:
                self.data_name = self.final.name + ".data"

                def callback(tensor, info) -> None:  # noqa: ANN001 - onnx_ir callback signature
                    if progress is not None:
                        progress(info.index + 1, info.total)

                ir.save(model, self.path, external_data=self.data_name, callback=callback)
            else:
                proto = to_proto(model)
                if proto.ByteSize() > TWO_GB:
                    raise OutputError("the model exceeds 2 GB as one file; write it with external data")
                with open(self.path, "wb") as f:
                    f.write(proto.SerializeToString())
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            self.discard()
            raise OutputError(f"{self.final}: cannot write ({exc.strerror or exc})") from None

    def commit(self) -> Path:
        """Move the staged files to the destination (external data first, then the model)."""
        try:
            if self.data_name:
                os.replace(self._dir / self.data_name, self.final.with_name(self.data_name))
            os.replace(self.path, self.final)
        except OSError as exc:
            raise OutputError(f"{self.final}: cannot write ({exc.strerror or exc})") from None
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        self.committed = True
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.discard()


def needs_external_data(model: ir.Model) -> bool:
    """External data when the input had it, or when one file would pass protobuf's 2 GB limit."""
    return has_external_data(model) or model_bytes_estimate(model) > TWO_GB - _HEADROOM


def save_proto_to(proto: onnx.ModelProto, path: Path) -> None:
    """Write a ModelProto to ``path`` (used to stage an in-memory original for verification)."""
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())


def save_ir_to(model: ir.Model, path: Path) -> None:
    if needs_external_data(model):
        ir.save(model, path, external_data=path.name + ".data")
    else:
        save_proto_to(to_proto(model), path)
