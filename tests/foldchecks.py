"""Checks for folds beyond helpers' backward-only ``assert_folds``: forward folds, decomposed BNs,
subgraphs and functions, the fold options. Each still checks three things: structure (here: what the
caller asserts plus the BN count everywhere, no unused initializer), equivalence under ONNX Runtime
with optimizations disabled, and ``onnx.checker`` (full check) on the output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from helpers import assert_close, const_values, node_signature, random_feeds, run_ort

from bnfold.api import FoldResult
from bnfold.api import fold as bnfold_fold


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _graphs(g)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node: main graph, subgraphs at any depth, functions."""
    nodes = [n for g in _graphs(model.graph) for n in g.node]
    for f in model.functions:
        for n in f.node:
            nodes.append(n)
            for attr in n.attribute:
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    nodes.extend(m for sg in _graphs(g) for m in sg.node)
    return nodes


def count_all(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in all_nodes(model))


def unused_initializers(model: onnx.ModelProto) -> set[str]:
    """Initializers of any graph that no node (in any scope) reads and that are no graph output."""
    used = {name for n in all_nodes(model) for name in n.input}
    inits, outputs = set(), set()
    for g in _graphs(model.graph):
        inits.update(i.name for i in g.initializer)
        outputs.update(o.name for o in g.output)
    return inits - used - outputs


def fold_checked(model: onnx.ModelProto, **options) -> FoldResult:
    """``bnfold.fold`` (no verification of its own) plus the invariants of every run: the input is not
    modified, every BatchNormalization has exactly one decision, names are unique, the output passes
    the full checker and keeps no unused initializer."""
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString(deterministic=True)
    result = bnfold_fold(model, verify=False, **options)
    assert model.SerializeToString(deterministic=True) == before, (
        "the input ModelProto was modified"
    )
    real = [d for d in result.decisions if d.source == "node"]
    assert len(real) == count_all(model, "BatchNormalization"), result.decisions
    assert len({d.name for d in result.decisions}) == len(result.decisions)
    for d in result.decisions:
        assert d.detail.strip()
        assert d.folded == (d.direction in ("backward", "forward", "decomposed", "branch"))
        assert (d.reason is None) == d.folded
    folded = result.model
    onnx.checker.check_model(folded, full_check=True)
    assert not unused_initializers(folded), unused_initializers(folded)
    kept = sum(
        not d.folded and d.direction != "lowered" and d.source == "node" for d in result.decisions
    )
    assert count_all(folded, "BatchNormalization") == kept
    return result


def assert_equivalent(
    model: onnx.ModelProto,
    folded: onnx.ModelProto,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    run: Callable = run_ort,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    feeds = random_feeds(model) if feeds is None else feeds
    assert_close(run(folded, feeds), run(model, feeds), rtol=rtol, atol=atol)


def assert_folded(
    model: onnx.ModelProto,
    direction: str,
    n: int = 1,
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    run: Callable | None = run_ort,
    rtol: float | None = None,
    atol: float | None = None,
    **options,
) -> FoldResult:
    """Fold, check that exactly ``n`` decisions folded with ``direction`` and none was kept, and that
    the result is equivalent and valid."""
    result = fold_checked(model, **options)
    folded = [d for d in result.decisions if d.folded]
    assert len(folded) == n and all(d.direction == direction for d in folded), [
        (d.name, d.direction, d.reason, d.detail) for d in result.decisions
    ]
    assert not result.report.kept, [(d.name, d.reason, d.detail) for d in result.report.kept]
    for d in folded:
        assert d.target and d.target_op
    if run is not None:
        assert_equivalent(model, result.model, feeds=feeds, run=run, rtol=rtol, atol=atol)
    return result


def assert_not_folded(model: onnx.ModelProto, **options) -> FoldResult:
    """Nothing folded, nothing reported (no BatchNormalization), and the model unchanged."""
    result = fold_checked(model, **options)
    assert result.decisions == [], result.decisions
    assert node_signature(result.model.graph) == node_signature(model.graph)
    old_c, new_c = const_values(model), const_values(result.model)
    assert old_c.keys() == new_c.keys()
    for name, value in old_c.items():
        np.testing.assert_array_equal(new_c[name], value)
    return result


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
