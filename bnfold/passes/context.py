"""The per-run state of one fold: created by ``BatchNormFoldPass.call()``, handed to every helper.

A pass instance holds its options only; everything one run learns lives here and is dropped with the
run: the names in use (for fresh names), the label of every graph, the opset in force, the undo
stack of a fold in progress, the values a fold may have left dead, the weights it replaced (to
restore their names), the shape-inference cache and the decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import onnx_ir as ir

from bnfold.report import BNDecision

from .common import node_label


@dataclass
class Inferred:
    """What ONNX shape inference found, keyed by ``id(value)`` and holding the value itself (so a
    removed value's id cannot be reused while the cache lives)."""

    shapes: dict[int, tuple[ir.Value, ir.Shape]] = field(default_factory=dict)
    dtypes: dict[int, tuple[ir.Value, ir.DataType]] = field(default_factory=dict)


@dataclass
class FoldContext:
    """Everything one run of the pass reads and writes besides the model itself."""

    model: ir.Model
    lower_remaining: bool
    duplicate_shared: bool
    model_opset: int
    #: The default-domain opset of the graph being processed (a function may declare its own).
    opset: int
    names: set[str]
    scopes: dict[int, str] = field(default_factory=dict)
    #: ids of function bodies and their subgraphs (they hold no initializers).
    function_graphs: set[int] = field(default_factory=set)
    decisions: list[BNDecision] = field(default_factory=list)
    #: Values a fold stopped reading; removed at the end when nothing else reads them.
    dead_candidates: list[ir.Value | None] = field(default_factory=list)
    #: (new constant, the value it replaced), to give folded weights their old names back.
    replaced: list[tuple[ir.Value, ir.Value]] = field(default_factory=list)
    #: Initializers the folds created in the main graph (candidates for :mod:`.sharing`).
    created: list[ir.Value] = field(default_factory=list)
    #: How to take back each step of a backward fold in progress, should it be refused midway.
    undo: list[Callable[[], None]] = field(default_factory=list)
    inferred: Inferred | None = None
    #: ids of the nodes of every lowered-BN chain already decided (each is reported once).
    affine_seen: set[int] = field(default_factory=set)
    modified: bool = False
    #: Make forward folds the cost rule expects to slow the model down (``slower_fold``).
    allow_slower_folds: bool = False
    #: Check a large folded weight's range when it is written, not up front (see ``weights``).
    defer_range_check: bool = False
    #: (graph label, BN label, what) → detail: folds that overflowed when written in an earlier run.
    known_overflow: dict[tuple[str, str, str], str] = field(default_factory=dict)
    #: (graph label, BN label) of the BN being decided.
    current_bn: tuple[str, str] | None = None

    @classmethod
    def create(
        cls,
        model: ir.Model,
        *,
        lower_remaining: bool,
        duplicate_shared: bool,
        allow_slower_folds: bool = False,
        defer_range_check: bool = False,
        known_overflow: dict[tuple[str, str, str], str] | None = None,
    ) -> FoldContext:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        ctx = cls(
            model=model,
            lower_remaining=lower_remaining,
            duplicate_shared=duplicate_shared,
            model_opset=opset,
            opset=opset,
            names=_all_names(model),
            allow_slower_folds=allow_slower_folds,
            defer_range_check=defer_range_check,
            known_overflow=dict(known_overflow or {}),
        )
        ctx.scopes.update((id(g), label) for g, label in walk_graphs(model.graph))
        for fn in model.functions.values():
            label = f"function {fn.domain}::{fn.name}" if fn.domain else f"function {fn.name}"
            for g, sub_label in walk_graphs(fn.graph, label):
                ctx.function_graphs.add(id(g))
                ctx.scopes[id(g)] = sub_label
        return ctx

    @property
    def main(self) -> ir.Graph:
        return self.model.graph

    @property
    def ir_version(self) -> int:
        return self.model.ir_version

    def function_opset(self, fn: ir.Function) -> int:
        return fn.opset_imports.get("", fn.opset_imports.get("ai.onnx", self.model_opset))

    def scope(self, graph: ir.Graph | None) -> str:
        """The label of ``graph`` in decisions and messages ("main", "function f", "If …/then_branch")."""
        return self.scopes.get(id(graph), "subgraph") if graph is not None else "?"

    def fresh(self, base: str) -> str:
        """A name no value, node or initializer of the model uses yet (and reserve it)."""
        name = base
        i = 0
        while name in self.names:
            i += 1
            name = f"{base}_bnfold{'' if i == 1 else i}"
        self.names.add(name)
        return name


def walk_graphs(graph: ir.Graph, label: str = "main") -> Iterator[tuple[ir.Graph, str]]:
    """``graph`` and every subgraph under it, at any depth, in pre-order, each with its label
    (``<parent label>/<node>/<attribute>[i]``; the main graph's children drop the "main/").

    Written by hand: onnx_ir's ``Graph.subgraphs()``/``RecursiveGraphIterator`` raise on a
    reference attribute of graph type (which a function body may hold); here it is skipped.
    """
    yield graph, label
    prefix = "" if label == "main" else f"{label}/"
    for node in graph:
        for a in node.attributes.values():
            if a.is_ref():
                continue
            if a.type == ir.AttributeType.GRAPH:
                yield from walk_graphs(a.value, f"{prefix}{node_label(node)}/{a.name}")
            elif a.type == ir.AttributeType.GRAPHS:
                for i, g in enumerate(a.value):
                    yield from walk_graphs(g, f"{prefix}{node_label(node)}/{a.name}[{i}]")


def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    graphs = [g for g, _ in walk_graphs(model.graph)]
    for fn in model.functions.values():
        graphs.extend(g for g, _ in walk_graphs(fn.graph))
    for graph in graphs:
        for v in list(graph.inputs) + list(graph.initializers.values()):
            if v.name:
                names.add(v.name)
        for node in graph:
            if node.name:
                names.add(node.name)
            for o in node.outputs:
                if o.name:
                    names.add(o.name)
    return names
