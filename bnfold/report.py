"""The FoldReport value: one decision per BatchNormalization, totals, verification and timings.

The report is plain data (dataclasses); :meth:`FoldReport.to_dict` is its JSON form (schema below,
``schema_version`` bumps on any incompatible change). Drawing it for people is
:mod:`bnfold.render` 's job (``render.console.render``, ``render.markdown.fold_markdown``).

JSON schema, version 1::

    {
      "schema_version": 1, "bnfold_version": str,
      "input": str | null, "output": str | null,
      "written": bool,                     # false when verification failed: nothing at "output"
      "passed": bool,                      # verification did not fail (passed or was skipped) and --strict held
      "strict": bool,
      "totals": {"batchnorms": int, "folded": int, "kept": int},
      "batchnorms": [
        {"name": str, "graph": str, "status": "folded" | "kept" | "fused_by_exporter",
         "direction": "backward" | "forward" | "decomposed" | "lowered" | null,
                                           # how it was folded (or, for "lowered", rewritten while kept)
         "target": str | null, "target_op": str | null,   # the node it was folded into
         "reason": str | null,             # a SkipReason value when kept
         "detail": str}
      ],
      "verification": null | VerificationResult.to_dict(),
      "bench": null | BenchResult.to_dict(),   # with fold --bench
      "timings": {"load": float, "fold": float, "save": float, "verify": float},   # seconds
      "nodes_before": int, "nodes_after": int
    }
"""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "SkipReason",
    "BNDecision",
    "FoldReport",
]

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import VerificationResult
    from .latency import BenchResult

from .reasons import SkipReason

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BNDecision:
    """What happened to one BatchNormalization node."""

    name: str
    folded: bool
    detail: str
    graph: str = "main"
    # "backward": folded into its producer; "forward": into the node(s) that consume its output;
    # "decomposed": a BN lowered to Mul/Add/Sub/Div, folded into its producer; "lowered": kept, but
    # rewritten to Mul + Add (fold --lower-remaining).
    direction: str | None = None
    target: str | None = None  # name of the node folded into
    target_op: str | None = None
    reason: SkipReason | None = None
    # bnfold.torch.export: the BN module was fused into its Conv/Gemm by the exporter's own
    # optimizer before bnfold saw the graph (``folded`` is True: it is gone from the output).
    fused_by_exporter: bool = False

    @property
    def status(self) -> str:
        if self.folded and self.fused_by_exporter:
            return "fused_by_exporter"
        return "folded" if self.folded else "kept"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "graph": self.graph,
            "status": self.status,
            "direction": self.direction,
            "target": self.target,
            "target_op": self.target_op,
            "reason": self.reason.value if self.reason else None,
            "detail": self.detail,
        }


@dataclass
class FoldReport:
    """Everything ``bnfold fold`` did to one model. Truthy when it passed."""

    decisions: list[BNDecision] = field(default_factory=list)
    verification: VerificationResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    input: str | None = None
    output: str | None = None
    strict: bool = False
    nodes_before: int = 0
    nodes_after: int = 0
    written: bool = False  # the output file was written (it is not when verification fails)
    bench: BenchResult | None = None  # fold --bench: original vs folded

    @property
    def folded(self) -> list[BNDecision]:
        return [d for d in self.decisions if d.folded]

    @property
    def kept(self) -> list[BNDecision]:
        return [d for d in self.decisions if not d.folded]

    @property
    def verified(self) -> bool:
        """True when verification ran and passed; False when it failed, was skipped or did not run."""
        return self.verification is not None and bool(self.verification)

    @property
    def verification_failed(self) -> bool:
        """Verification ran and found a difference. A skipped verification (ONNX Runtime cannot
        run the original model, e.g. a custom-op domain) is not a failure; the report says so."""
        v = self.verification
        return v is not None and not bool(v) and not getattr(v, "skipped_reason", None)

    @property
    def passed(self) -> bool:
        """Verification did not fail, and under ``strict`` no BN was kept."""
        return not self.verification_failed and not (self.strict and self.kept)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "bnfold_version": __version__,
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "passed": self.passed,
            "strict": self.strict,
            "totals": {
                "batchnorms": len(self.decisions),
                "folded": len(self.folded),
                "kept": len(self.kept),
            },
            "batchnorms": [d.to_dict() for d in self.decisions],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "bench": self.bench.to_dict() if self.bench is not None else None,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }
