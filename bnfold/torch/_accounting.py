"""``bnfold.torch.export`` on the dynamo exporter: one decision per BatchNorm module of the module.

The exporter's optimizer (onnxscript's rewrite rules) fuses ``Conv → BatchNormalization`` before
bnfold sees the graph, so the ONNX pass alone would not report those BNs. Each node the dynamo
exporter writes carries the module path it came from (metadata ``pkg.torch.onnx.name_scopes``; a
fused Conv keeps the BN's scope). With it every BatchNorm-like module of the ``nn.Module`` is
accounted for: its ONNX decision (folded or kept by bnfold) names the module in its detail; a module
whose scope holds a Conv/ConvTranspose/Gemm but no decision was fused by the exporter (status
``fused_by_exporter``); a module no exported node comes from is ``not_called``.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfold.report import BNDecision, FoldReport, SkipReason

from ._common import _import_torch

logger = logging.getLogger(__name__)

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_CLASSES_KEY = "pkg.torch.onnx.class_hierarchy"
_FUSED_INTO = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class _Node:
    op: str
    scopes: list[str]  # the module paths it came from, outermost first, then the op's own name
    origin: str  # the last class of its class hierarchy: the aten op it was made from


def _literal_list(raw: str | None) -> list[str]:
    if not raw:
        return []
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return []
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _nodes(exported: Path) -> dict[str, _Node]:
    """ONNX node name -> what the exporter recorded about it (main graph)."""
    from bnfold import io as _io

    model = _io.load(exported)
    out: dict[str, _Node] = {}
    for node in model.graph:
        classes = _literal_list(node.metadata_props.get(_CLASSES_KEY))
        scopes = [v for v in _literal_list(node.metadata_props.get(_SCOPES_KEY)) if v]
        out[node.name or ""] = _Node(node.op_type, scopes, classes[-1] if classes else "")
    return out


def _bn_modules(module: Any) -> list[tuple[str, Any]]:
    torch = _import_torch()
    from .bn_like import Recognizer

    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        return []
    rec = Recognizer()
    return [(p, m) for p, m in module.named_modules() if p and rec.is_site(m)]


def _fused_by_exporter(nodes: dict[str, _Node]) -> dict[str, tuple[str, _Node]]:
    """Module path (or node name) -> the Conv/Gemm node that the exporter made from a batch_norm
    op: its optimizer fuses the BN into the Conv and keeps the BN's metadata on the result."""
    fused: dict[str, tuple[str, _Node]] = {}
    for name, n in nodes.items():
        if n.op in _FUSED_INTO and "batch_norm" in n.origin:
            key = n.scopes[-2] if len(n.scopes) >= 2 else name
            fused.setdefault(key, (name, n))
    return fused


def account_bn_modules(module: Any, exported: Path, report: FoldReport) -> None:
    """Name the module of each ONNX decision; add one per BN the exporter fused, and one per BN
    module of ``module`` that no exported node comes from."""
    bns = _bn_modules(module)
    paths = {p for p, _ in bns}
    classes = {p: type(m).__name__ for p, m in bns}
    nodes = _nodes(exported)

    def owner(scopes: list[str]) -> str | None:
        mine = [sc for sc in scopes if sc in paths]
        return mine[-1] if mine else None  # the innermost BN module

    decided: set[str] = set()
    for i, d in enumerate(report.decisions):
        parts = d.name.split(" + ")  # a decomposed BN is named by its nodes, "Mul + Add"
        scopes = [sc for part in parts if part in nodes for sc in nodes[part].scopes]
        p = owner(scopes) if d.graph == "main" else None
        if p is not None:
            decided.add(p)
            detail = f"{d.detail}; module {p!r}" if d.detail else f"module {p!r}"
            report.decisions[i] = dataclasses.replace(d, detail=detail)
    for key, (target, n) in _fused_by_exporter(nodes).items():
        if key in decided:
            continue
        decided.add(key)
        name = f"{key} ({classes[key]})" if key in classes else key
        report.decisions.append(
            BNDecision(
                name=name,
                folded=True,
                fused_by_exporter=True,
                direction="backward",
                target=target,
                target_op=n.op,
                detail=f"fused into {n.op} {target!r} by the exporter's optimizer "
                "(torch.onnx.export dynamo=True, optimize=True) before bnfold saw the graph",
            )
        )
    for path, _m in bns:
        if path not in decided:
            report.decisions.append(_undecided(path, classes[path], nodes, owner))
    # in the order the exported graph runs them (a fused BN where its Conv is), main graph first
    position = {name: i for i, name in enumerate(nodes)}

    def where(d: BNDecision) -> tuple[int, int]:
        if d.graph != "main":
            return (1, 0)
        names = [d.target] if d.fused_by_exporter else d.name.split(" + ")
        return (0, min((position[n] for n in names if n in position), default=len(position)))

    report.decisions.sort(key=where)


def _undecided(path: str, cls: str, nodes: dict[str, _Node], owner: Any) -> BNDecision:
    """A BN module of the nn.Module that neither bnfold nor the exporter folded."""
    ops = sorted({n.op for n in nodes.values() if owner(n.scopes) == path})
    name = f"{path} ({cls})"
    if not ops:
        return BNDecision(
            name=name,
            folded=False,
            reason=SkipReason.NOT_CALLED,
            detail="no node of the exported graph comes from this module: the forward does not call "
            "it on the example inputs (or the exporter removed it)",
        )
    return BNDecision(
        name=name,
        folded=False,
        reason=SkipReason.CUSTOM_FORWARD,
        detail=f"the exported graph computes it with {', '.join(ops)}, which bnfold's ONNX pass "
        "did not recognise as a BatchNorm",
    )
