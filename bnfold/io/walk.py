"""Walkers over a ModelProto: every graph and subgraph, and every TensorProto (initializers and
node attributes, in all graphs and functions). Shared by validation, the external-data queries of
staging and the relocation of a staged model's data references. Nesting deeper than
``_MAX_NESTING`` is not walked (the structure check of :mod:`bnfold.io.validate` refuses it)."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

_MAX_NESTING = 64  # subgraphs nested deeper than this are refused (protobuf stops near 33 anyway)


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
