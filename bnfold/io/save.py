"""Writing a model straight to a path (no staging): :func:`save_ir_to` and :func:`save_proto_to`,
used to stage an original for verification; :func:`needs_external_data` (when an output keeps its
weights in a data file); and :func:`_attribute_data_inline`, which every writer (also
:class:`~bnfold.io.staging.StagedOutput`) uses so that an output never points at the input's data
file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from .load import _all_nodes, has_external_data, model_bytes_estimate, to_proto
from .validate import TWO_GB

_HEADROOM = 64 << 20  # leave room for the graph itself when deciding on external data


@contextlib.contextmanager
def _attribute_data_inline(model: ir.Model) -> Iterator[None]:
    """While writing: node-attribute tensors (``Constant`` values, in every graph, subgraph and
    function) that live in external data are carried inline, so the output never points at the
    input's data file (which is not copied). The model is restored afterwards."""
    originals: list[tuple[ir.Node, str, ir.Attr]] = []
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
