"""Reading models: :func:`load` (a file, validated, weights memory-mapped), :func:`from_proto`,
:func:`from_bytes` and :func:`to_proto` (in memory), and queries on a loaded model's weights
(:func:`has_external_data`, :func:`external_data_files`, :func:`model_bytes_estimate`).

The file must exist, be at most 2 GB (protobuf's limit) and parse as a ModelProto with a graph;
then it is validated (:mod:`bnfold.io.validate`) before onnx_ir deserializes it. Weights stay
memory-mapped by onnx_ir; nothing is read until it is needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from bnfold._text import first_line as _first_line
from bnfold.errors import ExternalDataError, InputNotFoundError, InvalidModelError, ResourceError

from .validate import TWO_GB, _check_external_data, _check_model_proto, check_data_budget


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx_ir with external weights memory-mapped, validating as it goes."""
    p = Path(path)
    try:
        if not p.exists():
            raise InputNotFoundError(f"{p}: no such file")
        if p.is_dir():
            raise InputNotFoundError(f"{p}: is a directory, not an ONNX file")
        if not p.is_file():
            raise InputNotFoundError(f"{p}: not a regular file")
        size = p.stat().st_size
    except (OSError, ValueError) as exc:
        raise InputNotFoundError(f"{p}: {getattr(exc, 'strerror', None) or exc}") from None
    if size == 0:
        raise InvalidModelError(f"{p}: empty file, not an ONNX model")
    if size > TWO_GB:
        raise InvalidModelError(
            f"{p}: {size / 2**30:.1f} GiB, beyond protobuf's 2 GB limit; a model this big keeps its "
            "weights in external data"
        )
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except MemoryError:
        raise ResourceError(f"{p}: out of memory while reading the model") from None
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{p}: not a valid ONNX model ({_first_line(exc)})") from None
    except Exception as exc:  # protobuf may raise its own error types on corrupt input
        raise InvalidModelError(f"{p}: not a valid ONNX model ({_first_line(exc)})") from None
    _check_model_proto(proto, str(p))
    try:
        _check_external_data(proto, p.parent)
    except ExternalDataError as exc:
        raise ExternalDataError(f"{p}: {exc}") from None
    check_data_budget(proto, p.parent, str(p))
    model = _deserialize(proto, str(p))
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    for fn in model.functions.values():
        ir.external_data.set_base_dir(fn.graph if hasattr(fn, "graph") else fn, str(p.parent))  # type: ignore[arg-type]
    return model


def _deserialize(proto: onnx.ModelProto, where: str) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except MemoryError:
        raise ResourceError(f"{where}: out of memory while reading the model") from None
    except RecursionError:
        raise InvalidModelError(f"{where}: subgraphs are nested too deeply") from None
    except Exception as exc:  # onnx_ir raises ValueError/TypeError/KeyError on malformed graphs
        raise InvalidModelError(f"{where}: malformed ONNX model ({_first_line(exc)})") from None


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """Wrap an in-memory ModelProto (it is not modified; tensors are shared, not copied)."""
    if not isinstance(proto, onnx.ModelProto):
        raise InvalidModelError(f"expected an onnx.ModelProto, got {type(proto).__name__}")
    _check_model_proto(proto, "model")
    return _deserialize(proto, "model")


def from_bytes(data: bytes) -> ir.Model:
    """Parse a serialized ModelProto (validated like :func:`load`, without external data)."""
    try:
        proto = onnx.ModelProto.FromString(bytes(data))
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidModelError(f"not a valid ONNX model ({_first_line(exc)})") from None
    _check_model_proto(proto, "model")
    return _deserialize(proto, "model")


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node: the main graph, its subgraphs, functions and their subgraphs."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for fn in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(fn)


def _attribute_tensors(model: ir.Model) -> Iterator[tuple[ir.Node, str, object]]:
    """(node, attribute name, tensor) for every tensor held in a node attribute."""
    for node in _all_nodes(model):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR:
                yield node, name, attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                for t in attr.value or ():
                    yield node, name, t


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
    for _node, _name, value in _attribute_tensors(model):
        if isinstance(value, ir.ExternalTensor):
            files.add(Path(value.path).resolve())
    return files


def model_bytes_estimate(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if t is not None:
                total += int(t.nbytes)
    return total
