"""Validation of an untrusted ModelProto before anything trusts it.

The graph must be well formed: every name a node reads is defined (in its graph or an enclosing
one), no name is defined twice in one graph, there is no cycle (nodes out of order are accepted, as
ONNX Runtime accepts them), the ops bnfold reads (BatchNormalization, Conv, Gemm, MaxPool...) have
the arity, attribute types and attribute ranges of their schema, text is valid UTF-8, and every
tensor's data matches its declared dtype and shape (so nothing is allocated for absurd dimensions).

The external-data firewall: every external-data reference must stay inside the model's folder (no
absolute paths, no ``..``, no symlink that leads out), name an existing regular file with one hard
link, and lie within it. The data budget: every external file must store the bytes the model
declares from it (no sparse-file bombs), and the total must fit the machine's memory plus free disk.

Any violation is an :class:`~bnfold.errors.InvalidModelError` (the external-data firewall:
:class:`~bnfold.errors.ExternalDataError`; the budget: :class:`~bnfold.errors.ResourceError`) with
one line that names the culprit.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import onnx

from bnfold.errors import ExternalDataError, InvalidModelError, ResourceError

from .walk import _MAX_NESTING, _iter_tensor_protos

TWO_GB = 2**31 - 1  # protobuf's hard limit on one serialized message
_MAX_ELEMENTS = 1 << 40  # more elements than this in one tensor is an absurd (hostile) declaration


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
