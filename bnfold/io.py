"""Loading and saving models: the only module that touches ``onnx`` protobuf.

Loading validates before it trusts. The file must exist, be at most 2 GB (protobuf's limit) and parse
as a ModelProto with a graph. The graph must be well formed: every name a node reads is defined (in
its graph or an enclosing one), no name is defined twice in one graph, there is no cycle (nodes out
of order are accepted, as ONNX Runtime accepts them), the ops bnfold reads (BatchNormalization, Conv,
Gemm, MaxPool...) have the arity, attribute types and attribute ranges of their schema, text is valid
UTF-8, and every tensor's data matches its declared dtype and shape (so nothing is allocated for
absurd dimensions). Every external-data reference must stay inside the model's folder (no absolute paths, no
``..``, no symlink that leads out), name an existing regular file, and lie within it. Any violation is
an :class:`~bnfold.errors.InvalidModelError` with one line that names the culprit. Weights stay
memory-mapped by onnx_ir; nothing is read until it is needed.

Saving is atomic and crash-safe. The model (and its external data, if any) is written and fsynced in a
private staging folder next to the destination (``.NAME.bnfold-PID-XXXX``); only after it is complete
(and, in ``bnfold fold``, verified) is it moved into place. The external data gets a name that no
existing file has (``NAME.data``, or ``NAME.<8 hex>.data`` when that is taken) and is linked into
place first; then the model file is replaced with ``os.replace``. So a SIGKILL at any moment leaves
the destination either as it was (old model + the data it references) or complete and new, never a
new data file under an old model. After the switch, the data files that the *previous* model at the
destination referenced and that follow bnfold's naming are removed. Staging folders left by a killed
run are removed by a later run once their process is gone and they are older than ten minutes.
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
    "check_report_path",
    "protecting",
    "input_files",
    "check_data_budget",
    "StagedOutput",
    "remove_stale_staging",
    "TWO_GB",
]

import contextlib
import contextvars
import errno
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ._text import first_line as _first_line
from .errors import (
    ExternalDataError,
    InputNotFoundError,
    InvalidModelError,
    OutputError,
    ResourceError,
)

TWO_GB = 2**31 - 1  # protobuf's hard limit on one serialized message
_HEADROOM = 64 << 20  # leave room for the graph itself when deciding on external data
_MAX_ELEMENTS = 1 << 40  # more elements than this in one tensor is an absurd (hostile) declaration
_MAX_NESTING = 64  # subgraphs nested deeper than this are refused (protobuf stops near 33 anyway)
_STALE_STAGING_S = 600  # a staging folder of a dead process older than this is removed


# ------------------------------------------------------------------------------ structure checks
#: Ops whose attributes and arity the fold pass reads; checked against their schema on load.
_SCHEMA_CHECKED_OPS = frozenset(
    {
        "BatchNormalization",
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Identity",
        "Constant",
        "ConstantOfShape",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Expand",
        "Cast",
        "CastLike",
        "Shape",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "MaxPool",
        "AveragePool",
        "GlobalMaxPool",
        "GlobalAveragePool",
        "Flatten",
        "Dropout",
    }
)
#: attribute values the spec bounds, for the ops the fold reads: (op types, attribute, lowest value)
_ATTRIBUTE_MINIMUM = [
    (("Conv", "ConvTranspose", "MaxPool", "AveragePool"), "strides", 1),
    (("Conv", "ConvTranspose", "MaxPool", "AveragePool"), "dilations", 1),
    (("Conv", "ConvTranspose", "MaxPool", "AveragePool"), "kernel_shape", 1),
    (("Conv", "ConvTranspose", "MaxPool", "AveragePool"), "pads", 0),
    (("ConvTranspose",), "output_padding", 0),
    (("Conv", "ConvTranspose"), "group", 1),
]
_ATTRIBUTE_FLAGS = {
    ("Gemm", "transA"),
    ("Gemm", "transB"),
    ("BatchNormalization", "training_mode"),
    ("BatchNormalization", "spatial"),
    ("BatchNormalization", "is_test"),
}
_SUB_BYTE_BITS = {
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.INT4: 4,
    **{getattr(onnx.TensorProto, n): 4 for n in ("FLOAT4E2M1",) if hasattr(onnx.TensorProto, n)},
    **{getattr(onnx.TensorProto, n): 2 for n in ("UINT2", "INT2") if hasattr(onnx.TensorProto, n)},
}


def _node_label(node: onnx.NodeProto) -> str:
    if node.name:
        return f"{node.op_type} {node.name!r}"
    out = next((o for o in node.output if o), None)
    return f"{node.op_type} → {out!r}" if out else f"unnamed {node.op_type}"


def _tensor_nbytes(tensor: onnx.TensorProto, where: str) -> int | None:
    """The byte size the tensor's dtype and dims declare; None for strings and unknown packings."""
    name = tensor.name or "<unnamed>"
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise InvalidModelError(f"{where}: tensor {name!r} has a negative dimension in {dims}")
    count = math.prod(dims)
    if count > _MAX_ELEMENTS:
        raise InvalidModelError(
            f"{where}: tensor {name!r} declares {count:.3g} elements (dims {dims}), an absurd size"
        )
    dt = tensor.data_type
    if dt == onnx.TensorProto.UNDEFINED or dt not in onnx.TensorProto.DataType.values():
        raise InvalidModelError(
            f"{where}: tensor {name!r} has an undefined or unknown data type ({dt})"
        )
    if dt == onnx.TensorProto.STRING:
        return None
    if dt in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[dt] + 7) // 8
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(dt).itemsize
    except Exception:  # a type this onnx knows but cannot map (e.g. 6-bit floats): not checked
        return None
    return count * itemsize


_TYPED_FIELDS = (
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
    "string_data",
)


def _check_tensor_data(tensor: onnx.TensorProto, where: str) -> None:
    """Inline data must match the declared dtype and shape (external data: see _check_external_data)."""
    nbytes = _tensor_nbytes(tensor, where)
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.HasField("segment"):
        return
    name = tensor.name or "<unnamed>"
    dims = list(tensor.dims)
    count = math.prod(dims)
    if tensor.raw_data:
        if nbytes is not None and len(tensor.raw_data) != nbytes:
            raise InvalidModelError(
                f"{where}: tensor {name!r} of shape {dims} needs {nbytes} bytes of data but has "
                f"{len(tensor.raw_data)}"
            )
        return
    if (
        tensor.data_type in _SUB_BYTE_BITS
        or nbytes is None
        and tensor.data_type != onnx.TensorProto.STRING
    ):
        return  # packed typed data: not checked
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    per_element = (
        2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
    )
    have = len(getattr(tensor, field))
    if have != count * per_element:
        others = [f for f in _TYPED_FIELDS if f != field and len(getattr(tensor, f))]
        extra = f" (and values in {others[0]}, the wrong field for its dtype)" if others else ""
        raise InvalidModelError(
            f"{where}: tensor {name!r} of shape {dims} has {have} values in {field}, expected "
            f"{count * per_element}{extra}"
        )


def _check_value_info(vi: onnx.ValueInfoProto, where: str, what: str) -> None:
    if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims):
            raise InvalidModelError(f"{where}: {what} {vi.name!r} has a negative dimension")
        if math.prod(dims) > _MAX_ELEMENTS:
            raise InvalidModelError(
                f"{where}: {what} {vi.name!r} declares {math.prod(dims):.3g} elements, an absurd size"
            )


class _StructureChecker:
    """Well-formedness of the graph, its subgraphs and functions; see the module docstring."""

    def __init__(self, model: onnx.ModelProto, where: str) -> None:
        self.where = where
        self.model = model
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.opsets.setdefault("ai.onnx", self.opsets.get("", 1))

    def run(self) -> None:
        m = self.model
        if len(m.graph.sparse_initializer):
            raise InvalidModelError(
                f"{self.where}: the graph has sparse initializers, which bnfold cannot carry over"
            )
        self.graph(m.graph, outer=frozenset(), depth=0, label=f"graph {m.graph.name!r}")
        seen: set[tuple[str, str, str]] = set()
        for fn in m.functions:
            key = (fn.domain, fn.name, getattr(fn, "overload", ""))
            if key in seen:
                raise InvalidModelError(
                    f"{self.where}: function {fn.domain}::{fn.name} is defined twice"
                )
            seen.add(key)
            self.nodes(
                fn.node,
                defined=set(fn.input),
                outer=frozenset(),
                depth=0,
                label=f"function {fn.domain}::{fn.name}",
                outputs=list(fn.output),
                in_function=True,
            )

    def graph(self, g: onnx.GraphProto, outer: frozenset[str], depth: int, label: str) -> set[str]:
        """Check ``g``; return the names it reads from enclosing scopes."""
        if depth > _MAX_NESTING:
            raise InvalidModelError(
                f"{self.where}: subgraphs are nested more than {_MAX_NESTING} deep"
            )
        if len(g.sparse_initializer):
            raise InvalidModelError(
                f"{self.where}: {label} has sparse initializers, which bnfold cannot carry over"
            )
        defined: set[str] = set()
        for vi in g.input:
            if not vi.name:
                raise InvalidModelError(f"{self.where}: {label} has an input without a name")
            if vi.name in defined:
                raise InvalidModelError(f"{self.where}: {label} declares input {vi.name!r} twice")
            defined.add(vi.name)
            _check_value_info(vi, self.where, "input")
        inits: set[str] = set()
        for t in g.initializer:
            if not t.name:
                raise InvalidModelError(f"{self.where}: {label} has an initializer without a name")
            if t.name in inits:
                raise InvalidModelError(
                    f"{self.where}: {label} has two initializers named {t.name!r}"
                )
            inits.add(t.name)
            _check_tensor_data(t, self.where)
        defined |= inits  # an initializer may also be an input (IR < 4, or an overridable default)
        return self.nodes(g.node, defined, outer, depth, label, outputs=[o.name for o in g.output])

    def nodes(
        self,
        nodes,
        defined: set[str],
        outer: frozenset[str],
        depth: int,
        label: str,
        outputs: list[str],
        in_function: bool = False,
    ) -> set[str]:
        producer: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for o in node.output:
                if not o:
                    continue
                if o in defined or o in producer:
                    raise InvalidModelError(
                        f"{self.where}: {label}: {_node_label(node)} defines {o!r}, which is already "
                        "defined (names must be assigned once)"
                    )
                producer[o] = i
        local = defined | producer.keys()
        visible = outer | local
        free: set[str] = set()
        deps: list[set[int]] = []
        for node in nodes:
            self.node(node, in_function)
            reads = [n for n in node.input if n]
            for attr in node.attribute:
                if attr.HasField("t"):
                    _check_tensor_data(attr.t, self.where)
                for t in attr.tensors:
                    _check_tensor_data(t, self.where)
                subgraphs = [attr.g] if attr.HasField("g") else []
                subgraphs.extend(attr.graphs)
                for sg in subgraphs:
                    reads.extend(
                        self.graph(
                            sg,
                            frozenset(visible),
                            depth + 1,
                            f"subgraph {attr.name!r} of {_node_label(node)}",
                        )
                    )
            for name in reads:
                if name not in visible:
                    raise InvalidModelError(
                        f"{self.where}: {label}: {_node_label(node)} reads {name!r}, which is not "
                        "defined (not an input, an initializer or a node output)"
                    )
                if name not in local:
                    free.add(name)
            deps.append({producer[n] for n in reads if n in producer})
        for name in outputs:
            if name and name not in visible:
                raise InvalidModelError(f"{self.where}: {label} output {name!r} is not defined")
            if name and name not in local:
                free.add(name)
        self._acyclic(nodes, deps, label)
        return free

    def _acyclic(self, nodes, deps: list[set[int]], label: str) -> None:
        """Kahn's algorithm; node order need not be topological (ONNX Runtime sorts), cycles are refused."""
        if all(d < i for i, ds in enumerate(deps) for d in ds):
            return  # already in topological order: the common case, checked in one pass
        users: list[list[int]] = [[] for _ in deps]
        pending = [len(ds) for ds in deps]
        for i, ds in enumerate(deps):
            for d in ds:
                users[d].append(i)
        ready = [i for i, n in enumerate(pending) if n == 0]
        done = 0
        while ready:
            i = ready.pop()
            done += 1
            for u in users[i]:
                pending[u] -= 1
                if pending[u] == 0:
                    ready.append(u)
        if done < len(deps):
            stuck = [_node_label(nodes[i]) for i, n in enumerate(pending) if n][:3]
            raise InvalidModelError(
                f"{self.where}: {label} has a cycle (through {', '.join(stuck)})"
            )

    def node(self, node: onnx.NodeProto, in_function: bool) -> None:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx") or node.op_type not in _SCHEMA_CHECKED_OPS:
            return
        version = self.opsets.get(domain)
        if version is None:
            return
        try:
            schema = onnx.defs.get_schema(node.op_type, version, "")
        except Exception:  # not defined at this opset: ONNX Runtime will say so
            return
        n_in, n_out = len(node.input), len(node.output)
        for what, n, low, high in (
            ("inputs", n_in, schema.min_input, schema.max_input),
            ("outputs", n_out, schema.min_output, schema.max_output),
        ):
            if not low <= n <= high:
                allowed = f"exactly {low}" if low == high else f"{low} to {high}"
                raise InvalidModelError(
                    f"{self.where}: {_node_label(node)} has {n} {what}; opset {version} allows {allowed}"
                )
        names = set()
        for attr in node.attribute:
            if attr.name in names:
                raise InvalidModelError(
                    f"{self.where}: {_node_label(node)} has attribute {attr.name!r} twice"
                )
            names.add(attr.name)
            if attr.ref_attr_name:
                if not in_function:
                    raise InvalidModelError(
                        f"{self.where}: {_node_label(node)}: attribute {attr.name!r} refers to a "
                        "function attribute outside a function"
                    )
                continue
            spec = schema.attributes.get(attr.name)
            if (
                spec is not None
                and attr.type != onnx.AttributeProto.UNDEFINED
                and attr.type != spec.type
            ):
                got = onnx.AttributeProto.AttributeType.Name(attr.type)
                want = onnx.AttributeProto.AttributeType.Name(spec.type)
                raise InvalidModelError(
                    f"{self.where}: {_node_label(node)}: attribute {attr.name!r} has type {got}, "
                    f"expected {want}"
                )
            values = list(attr.ints) if attr.type == onnx.AttributeProto.INTS else [attr.i]
            for ops, name, lowest in _ATTRIBUTE_MINIMUM:
                if node.op_type in ops and attr.name == name and any(v < lowest for v in values):
                    raise InvalidModelError(
                        f"{self.where}: {_node_label(node)}: attribute {name} = {values} must be "
                        f">= {lowest}"
                    )
            if (node.op_type, attr.name) in _ATTRIBUTE_FLAGS and attr.i not in (0, 1):
                raise InvalidModelError(
                    f"{self.where}: {_node_label(node)}: attribute {attr.name} = {attr.i} must be 0 or 1"
                )


def _check_text(message, where: str, path: str = "model") -> None:
    """Every text field must be valid UTF-8 (protobuf hands back ``bytes`` where it is not)."""
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in message.ListFields():
        repeated = (
            field.is_repeated
            if hasattr(field, "is_repeated")
            else field.label == field.LABEL_REPEATED
        )
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if repeated else [value]
            if any(not isinstance(v, str) for v in values):
                raise InvalidModelError(f"{where}: {path}.{field.name} is not valid UTF-8 text")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                for i, item in enumerate(value):
                    _check_text(item, where, f"{path}.{field.name}[{i}]")
            else:
                _check_text(value, where, f"{path}.{field.name}")


def _check_structure(proto: onnx.ModelProto, where: str) -> None:
    try:
        _check_text(proto, where)
        _StructureChecker(proto, where).run()
    except RecursionError:
        raise InvalidModelError(f"{where}: subgraphs are nested too deeply") from None


def _iter_graph_protos(graph: onnx.GraphProto, depth: int = 0) -> Iterator[onnx.GraphProto]:
    if depth > _MAX_NESTING:
        return  # refused by the structure check
    yield graph
    for node in graph.node:
        yield from _iter_subgraphs(node, depth)


def _iter_subgraphs(node: onnx.NodeProto, depth: int = 0) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield from _iter_graph_protos(attr.g, depth + 1)
        for g in attr.graphs:
            yield from _iter_graph_protos(g, depth + 1)


def _iter_tensor_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and node attributes, in all graphs and functions."""
    node_lists = []
    for g in _iter_graph_protos(model.graph):
        yield from g.initializer
        node_lists.append(g.node)
    for f in model.functions:
        node_lists.append(f.node)
        for node in f.node:
            for g in _iter_subgraphs(node):
                yield from g.initializer
                node_lists.append(g.node)
    for nodes in node_lists:
        for node in nodes:
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
        if "\0" in location:
            raise ExternalDataError(
                f"tensor {name!r}: external data location {location!r} contains a NUL byte"
            )
        loc = Path(location)
        if loc.is_absolute() or ".." in loc.parts or ".." in location.replace("\\", "/").split("/"):
            raise ExternalDataError(
                f"tensor {name!r}: external data location {location!r} escapes the model's folder"
            )
        full = base_dir / loc
        try:
            real = full.resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise ExternalDataError(
                f"tensor {name!r}: cannot resolve {location!r}: {exc}"
            ) from None
        if base_real != real and base_real not in real.parents:
            raise ExternalDataError(
                f"tensor {name!r}: external data {location!r} leads outside the model's folder"
            )
        if not real.exists():
            raise ExternalDataError(f"tensor {name!r}: external data file {str(full)!r} is missing")
        if not real.is_file():
            raise ExternalDataError(
                f"tensor {name!r}: external data {str(full)!r} is not a regular file"
            )
        size = files.get(real)
        if size is None:
            st = real.stat()
            if st.st_nlink > 1:
                # onnx_ir refuses these when it maps them (a hard link can bring a file from outside
                # the folder in); say so now rather than fail halfway through the fold.
                raise ExternalDataError(
                    f"tensor {name!r}: external data file {str(full)!r} has {st.st_nlink} hard links; "
                    "hard-linked external data is refused (copy the file instead)"
                )
            size = files[real] = st.st_size
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise ExternalDataError(f"tensor {name!r}: malformed offset/length") from None
        needed = _tensor_nbytes(tensor, f"tensor {name!r}")
        span = length if length is not None else (needed if needed is not None else size - offset)
        if offset < 0 or span < 0 or offset + span > size:
            raise ExternalDataError(
                f"tensor {name!r}: external data [{offset}, {offset + span}) runs past the end of "
                f"{location!r} ({size} bytes)"
            )
        if length is not None and needed is not None and length != needed:
            raise ExternalDataError(
                f"tensor {name!r} of shape {list(tensor.dims)} needs {needed} bytes but its external "
                f"data declares length {length}"
            )
    return list(files)


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


_SPARSE_SLACK = 256 << 20  # declared-but-unstored bytes tolerated (st_blocks rounding, small holes)


def _machine_bytes(folder: Path) -> int:
    """Physical memory plus the free disk beside the model: more than this cannot be folded."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 0
    try:
        disk = shutil.disk_usage(folder).free
    except OSError:
        disk = 0
    return int(ram) + int(disk) if ram or disk else 1 << 62


def check_data_budget(proto: onnx.ModelProto, base_dir: Path, where: str) -> int:
    """Bound the work by what the model really stores and the machine has; returns the bytes the
    model's external data declares.

    Every external file must store (allocated blocks, ``st_blocks``) the bytes the model declares
    from it, within a slack: a sparse file that declares a 1 TiB tensor passes every size check but
    would page through a terabyte of zeros. And the total must fit the machine's memory plus free
    disk. Either failure is a :class:`~bnfold.errors.ResourceError` (exit 2).
    """
    ranges: dict[Path, list[tuple[int, int]]] = {}
    for tensor in _iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        f = (base_dir / info.get("location", "")).resolve()
        try:
            offset = int(info.get("offset", 0) or 0)
            length = info.get("length")
            if length is None or length == "":
                length = (f.stat().st_size - offset) if f.is_file() else 0
            ranges.setdefault(f, []).append((offset, offset + int(length)))
        except (ValueError, OSError):
            continue  # refused with a clearer message by the external-data check
    total = 0
    for f, spans in ranges.items():
        declared = 0
        end = -1
        for lo, hi in sorted(spans):  # union of the byte ranges, overlaps counted once
            lo = max(lo, end)
            if hi > lo:
                declared += hi - lo
            end = max(end, hi)
        total += declared
        try:
            stored = os.stat(f).st_blocks * 512
        except (OSError, AttributeError):
            continue
        if declared - stored > max(_SPARSE_SLACK, stored):
            raise ResourceError(
                f"{where}: external data {f.name!r} declares {declared / 2**30:.1f} GiB of tensors "
                f"but stores only {stored / 2**20:.1f} MiB (a sparse file); refused"
            )
    have = _machine_bytes(base_dir)
    if total > have:
        raise ResourceError(
            f"{where}: the model declares {total / 2**30:.1f} GiB of external data, more than this "
            f"machine's memory and free disk ({have / 2**30:.1f} GiB)"
        )
    return total


def _check_model_proto(proto: onnx.ModelProto, where: str) -> None:
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{where}: not an ONNX model (no graph)")
    if proto.ir_version <= 0:
        raise InvalidModelError(f"{where}: not an ONNX model (ir_version missing)")
    if not proto.opset_import and proto.ir_version >= 3:
        raise InvalidModelError(f"{where}: ONNX model declares no opset_import")
    _check_structure(proto, where)


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


@contextlib.contextmanager
def _attribute_data_inline(model: ir.Model) -> Iterator[None]:
    """While writing: node-attribute tensors (``Constant`` values, in every graph, subgraph and
    function) that live in external data are carried inline, so the output never points at the
    input's data file (which is not copied). The model is restored afterwards."""
    originals: list[tuple[ir.Node, str, object]] = []
    try:
        for node in list(_all_nodes(model)):
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR:
                    if isinstance(attr.value, ir.ExternalTensor):
                        t = attr.value
                        originals.append((node, name, attr))
                        node.attributes[name] = ir.AttrTensor(
                            name, ir.Tensor(t.numpy(), name=t.name, doc_string=t.doc_string)
                        )
                elif attr.type == ir.AttributeType.TENSORS:
                    values = list(attr.value or ())
                    if any(isinstance(t, ir.ExternalTensor) for t in values):
                        originals.append((node, name, attr))
                        node.attributes[name] = ir.AttrTensors(
                            name,
                            [
                                ir.Tensor(t.numpy(), name=t.name)
                                if isinstance(t, ir.ExternalTensor)
                                else t
                                for t in values
                            ],
                        )
        yield
    finally:
        for node, name, attr in originals:
            node.attributes[name] = attr


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
    for _node, _name, t in _attribute_tensors(model):
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
    output: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None,
    protected: Collection[Path] = frozenset(),
) -> Path:
    """Refuse outputs that would overwrite the input or its external data, or that cannot be written."""
    out = Path(output)
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name for the output")
    _refuse_non_regular(out)
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
            raise OutputError(
                f"{out}: is the input file; bnfold never modifies its input, choose another -o"
            )
    for f in protected:
        if out_real == f or data_real == f:
            raise OutputError(
                f"{out}: would overwrite the input's external data {str(f)!r}; choose another -o"
            )
    return out


def _refuse_non_regular(out: Path) -> None:
    """An existing output must be a regular file: a device node (``-o /dev/null``), FIFO or socket
    would be replaced by a regular file (os.replace), so it is refused; there is no discard sink
    (``--no-verify`` with a temporary path does that job)."""
    try:
        st = os.stat(out)
    except OSError:
        return  # a new path, a dangling link, a parent that is no folder: checked elsewhere
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{out}: is a directory; give a file name for the output")
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a device node"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        raise OutputError(
            f"{out}: is {kind}; bnfold writes only regular files (give a new or regular file path)"
        )


def check_report_path(path: str | os.PathLike) -> Path:
    """Refuse a report destination (``--json``, ``--markdown``, ``$GITHUB_STEP_SUMMARY``) that
    cannot be written, before anything is committed: exit 2 then means nothing was written.

    An existing path must be writable and not a folder (a FIFO or ``/dev/stdout`` is fine: reports
    are written in place, not replaced); a new path needs an existing, writable folder. Creates
    nothing. Returns the path.
    """
    p = Path(path)
    if p.exists():
        if p.is_dir():
            raise OutputError(f"{p}: is a directory; cannot write the report there")
        if not os.access(p, os.W_OK):
            raise OutputError(f"{p}: report file is not writable")
        return p
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{p}: folder {str(parent)!r} for the report does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: folder {str(parent)!r} for the report is not writable")
    return p


_STAGING_MARK = ".bnfold-"
_PREVIOUS_MODEL_MAX = 256 << 20  # previous outputs bigger than this are not parsed for cleanup


def _staging_prefix(name: str) -> str:
    """``.NAME.bnfold-``; the name is shortened so the folder name stays within NAME_MAX."""
    return f".{name[:120]}{_STAGING_MARK}"


def _data_name_pattern(name: str) -> re.Pattern[str]:
    """The names bnfold gives the external data of an output called ``name``."""
    return re.compile(re.escape(name) + r"(\.[0-9a-f]{8})?\.data")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists; anything else: assume it does
        return True
    return True


def remove_stale_staging(
    folder: Path, name: str, *, max_age_s: float = _STALE_STAGING_S
) -> list[Path]:
    """Remove staging folders of output ``name`` in ``folder`` left by a killed run.

    A folder is stale when the process that made it (its pid is in its name) no longer runs and it
    has not changed for ``max_age_s`` seconds. Returns the folders removed.
    """
    prefix = _staging_prefix(name)
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        if age < max_age_s:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _fsync(path: Path) -> None:
    """Flush a file (or folder) to disk, so a crash of the machine cannot undo a rename's content."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise the commits of concurrent bnfold runs into one folder (flock on the folder)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locking on this file system
        yield
    finally:
        os.close(fd)  # releases the lock


_PROTECTED: contextvars.ContextVar[frozenset[Path]] = contextvars.ContextVar(
    "bnfold_protected", default=frozenset()
)


@contextlib.contextmanager
def protecting(paths: set[Path] | frozenset[Path]) -> Iterator[None]:
    """Within this block no commit's cleanup removes any of ``paths`` (resolved): a batch protects
    every input of the whole batch (and their external data) around each model's fold."""
    token = _PROTECTED.set(_PROTECTED.get() | {Path(p).resolve() for p in paths})
    try:
        yield
    finally:
        _PROTECTED.reset(token)


def input_files(path: str | os.PathLike) -> set[Path]:
    """An input file and (for ONNX) the external-data files it references, resolved; for the
    protection of a whole batch. Unreadable files protect just themselves."""
    p = Path(path)
    files = {p.resolve()}
    try:
        if p.is_file() and p.stat().st_size <= TWO_GB and p.suffix != ".pt2":
            proto = onnx.load(str(p), load_external_data=False)
            for tensor in _iter_tensor_protos(proto):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
                    if loc and "\0" not in loc:
                        files.add((p.parent / loc).resolve())
    except Exception:  # noqa: BLE001 - not ONNX (PyTorch) or unreadable: the file alone
        pass
    return files


def _referenced_data(model_path: Path) -> dict[Path, int]:
    """External-data files, following bnfold's naming, that the model at ``model_path`` reads, with
    the end of the last byte it reads from each (``{}`` when it is not a model we can read)."""
    try:
        if not model_path.is_file() or model_path.stat().st_size > _PREVIOUS_MODEL_MAX:
            return {}
        proto = onnx.load(str(model_path), load_external_data=False)
        pattern = _data_name_pattern(model_path.name)
        found: dict[Path, int] = {}
        for tensor in _iter_tensor_protos(proto):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            if pattern.fullmatch(location):
                f = model_path.with_name(location)
                end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
                found[f] = max(found.get(f, 0), end)
        return found
    except Exception:  # not a model we can read: leave its files alone
        return {}


def _own_data(path: Path, end: int, keep: set[Path]) -> bool:
    """``path`` is provably the previous output's own data: bnfold-named (checked by the caller),
    not protected, a regular file (no link), one hard link, and exactly as long as the data the
    previous model reads from it (bnfold writes nothing else into it)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    if path.resolve() in keep:
        return False
    return end > 0 and st.st_size == end


def _publish_data(staged: Path, final: Path) -> None:
    """Put the staged data file at ``final``, which must not exist (never overwrites)."""
    try:
        os.link(staged, final)  # atomic, and fails when ``final`` exists
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "File exists", str(final)) from None
        os.rename(staged, final)
        return
    os.unlink(staged)  # one link left, as onnx_ir requires of external data


def _replace_model(staged: Path, final: Path) -> None:
    os.replace(staged, final)


def _remove_files(paths: Iterator[Path] | set[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _relocate(model_path: Path, old: str, new: str) -> None:
    """Point the staged model's external references from data file ``old`` to ``new``."""
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in _iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    tmp = model_path.with_name(model_path.name + ".relocating")
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, model_path)


class StagedOutput:
    """Write a model into a staging folder beside ``final``; :meth:`commit` moves it into place.

    ``path`` is the staged model file, which can be loaded (e.g. by ONNX Runtime for verification)
    exactly as it will be at the destination, since external data is referenced by a relative name.
    The external data's final name is chosen in :meth:`commit`, under the folder lock (the staged
    model is re-pointed if another run took the provisional name meanwhile), so concurrent runs on
    the same ``-o`` never fail on a name clash. ``protected`` files (the input model and its
    external data; in a batch, every input of the batch) are never removed by the cleanup that
    follows a commit, and nothing else is removed unless it is provably the previous output's own
    data (:func:`_own_data`).
    """

    def __init__(
        self, final: str | os.PathLike, *, protected: set[Path] | frozenset[Path] = frozenset()
    ) -> None:
        self.final = Path(final)
        self.folder = self.final.parent if str(self.final.parent) else Path(".")
        self.protected = {Path(p).resolve() for p in protected}
        _refuse_non_regular(self.final)
        remove_stale_staging(self.folder, self.final.name)
        try:
            self._dir = Path(
                tempfile.mkdtemp(
                    prefix=f"{_staging_prefix(self.final.name)}{os.getpid()}-", dir=self.folder
                )
            )
        except OSError as exc:
            raise OutputError(
                f"{self.final}: cannot write in {str(self.folder)!r} ({exc.strerror or exc})"
            ) from None
        self.path = self._dir / self.final.name
        self.data_name: str | None = None
        self.committed = False

    def _fresh_data_name(self) -> str:
        """``NAME.data`` when no such file exists, else ``NAME.<8 hex>.data``: never an existing file,
        so the data an existing model at the destination reads is not touched before the switch.
        Called under the folder lock."""
        name = self.final.name + ".data"
        while os.path.lexists(self.folder / name):
            name = f"{self.final.name}.{secrets.token_hex(4)}.data"
        return name

    def write(
        self,
        model: ir.Model,
        *,
        external: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        try:
            with _attribute_data_inline(model):
                if external:
                    # provisional: the staging folder is private; commit picks the final name
                    self.data_name = self.final.name + ".data"

                    def callback(tensor, info) -> None:  # noqa: ANN001 - onnx_ir signature
                        if progress is not None:
                            progress(info.index + 1, info.total)

                    ir.save(model, self.path, external_data=self.data_name, callback=callback)
                    _fsync(self._dir / self.data_name)
                    _fsync(self.path)
                else:
                    proto = to_proto(model)
                    if proto.ByteSize() > TWO_GB:
                        raise OutputError(
                            "the model exceeds 2 GB as one file; write it with external data"
                        )
                    with open(self.path, "wb") as f:
                        f.write(proto.SerializeToString())
                        f.flush()
                        os.fsync(f.fileno())
        except OSError as exc:
            self.discard()
            raise OutputError(f"{self.final}: cannot write ({exc.strerror or exc})") from None

    def commit(self, *, protected: set[Path] | frozenset[Path] = frozenset()) -> Path:
        """Move the staged files to the destination.

        Under the folder lock: the data file gets a name no file has and goes in first, then the
        model replaces the old one in one ``os.replace``: at every instant the destination is the
        old pair or the new pair. Afterwards the data files the old model read are removed when
        they are provably its own (see :func:`_own_data`) and not in ``protected``,
        ``self.protected`` or the set of :func:`protecting`.
        """
        keep = self.protected | {Path(p).resolve() for p in protected} | set(_PROTECTED.get())
        try:
            with _folder_lock(self.folder):
                _refuse_non_regular(self.final)
                previous = _referenced_data(self.final)
                published: Path | None = None
                try:
                    if self.data_name:
                        name = self._fresh_data_name()
                        if name != self.data_name:
                            os.rename(self._dir / self.data_name, self._dir / name)
                            _relocate(self.path, self.data_name, name)
                            self.data_name = name
                        published = self.folder / name
                        _publish_data(self._dir / name, published)
                    _replace_model(self.path, self.final)
                except OSError as exc:
                    if published is not None and not isinstance(exc, FileExistsError):
                        _remove_files({published})
                    if isinstance(exc, FileExistsError):
                        raise OutputError(
                            f"{self.final}: its data file appeared while bnfold was writing "
                            "(another program is writing the same output); run again"
                        ) from None
                    raise OutputError(
                        f"{self.final}: cannot write ({exc.strerror or exc})"
                    ) from None
                self.committed = True
                _fsync(self.folder)
                if published is not None:
                    keep.add(published.resolve())
                _remove_files(p for p, end in previous.items() if _own_data(p, end, keep))
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
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
    with _attribute_data_inline(model):
        if needs_external_data(model):
            ir.save(model, path, external_data=path.name + ".data")
        else:
            save_proto_to(to_proto(model), path)
