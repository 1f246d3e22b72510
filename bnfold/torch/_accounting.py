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
from pathlib import Path
from typing import Any

from bnfold.report import BNDecision, FoldReport, SkipReason

from ._common import _import_torch

logger = logging.getLogger(__name__)

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_FUSED_INTO = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _node_scopes(exported: Path) -> dict[str, tuple[str, list[str]]]:
    """ONNX node name -> (op type, the module paths it came from), main graph."""
    from bnfold import io as _io

    model = _io.load(exported)
    out: dict[str, tuple[str, list[str]]] = {}
    for node in model.graph:
        raw = node.metadata_props.get(_SCOPES_KEY)
        scopes: list[str] = []
        if raw:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = None
            if isinstance(value, list):
                scopes = [v for v in value if isinstance(v, str) and v]
        out[node.name or ""] = (node.op_type, scopes)
    return out


def _bn_modules(module: Any) -> list[tuple[str, Any]]:
    torch = _import_torch()
    from .bn_like import Recognizer

    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        return []
    rec = Recognizer()
    return [(p, m) for p, m in module.named_modules() if p and rec.is_site(m)]


def account_bn_modules(module: Any, exported: Path, report: FoldReport) -> None:
    """Name the module of each ONNX decision and add one per BN module the graph does not show."""
    bns = _bn_modules(module)
    if not bns:
        return
    paths = {p for p, _ in bns}
    nodes = _node_scopes(exported)

    def owner(scopes: list[str]) -> str | None:
        mine = [s for s in scopes if s in paths]
        return mine[-1] if mine else None  # the innermost BN module

    decided: set[str] = set()
    for i, d in enumerate(report.decisions):
        parts = d.name.split(" + ")  # a decomposed BN is named by its nodes, "Mul + Add"
        scopes = [sc for part in parts for sc in nodes.get(part, ("", []))[1]]
        p = owner(scopes) if d.graph == "main" else None
        if p is not None:
            decided.add(p)
            detail = f"{d.detail}; module {p!r}" if d.detail else f"module {p!r}"
            report.decisions[i] = dataclasses.replace(d, detail=detail)
    for path, m in bns:
        if path in decided:
            continue
        report.decisions.append(_undecided(path, type(m).__name__, nodes, owner))


def _undecided(
    path: str, cls: str, nodes: dict[str, tuple[str, list[str]]], owner: Any
) -> BNDecision:
    """The decision for a BN module bnfold's ONNX pass made none for."""
    from_it = [(name, op) for name, (op, scopes) in nodes.items() if owner(scopes) == path]
    fused = [(name, op) for name, op in from_it if op in _FUSED_INTO]
    name = f"{path} ({cls})"
    if fused and not any(op == "BatchNormalization" for _, op in from_it):
        target, op = fused[0]
        return BNDecision(
            name=name,
            folded=True,
            fused_by_exporter=True,
            direction="backward",
            target=target,
            target_op=op,
            detail=f"fused into {op} {target!r} by the exporter's optimizer (torch.onnx.export "
            "dynamo=True, optimize=True) before bnfold saw the graph",
        )
    if not from_it:
        return BNDecision(
            name=name,
            folded=False,
            reason=SkipReason.NOT_CALLED,
            detail="no node of the exported graph comes from this module: the forward does not call "
            "it on the example inputs (or the exporter removed it)",
        )
    ops = ", ".join(sorted({op for _, op in from_it}))
    return BNDecision(
        name=name,
        folded=False,
        reason=SkipReason.CUSTOM_FORWARD,
        detail=f"the exported graph computes it with {ops}, which bnfold's ONNX pass did not "
        "recognise as a BatchNorm",
    )
