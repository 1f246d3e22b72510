"""The FoldReport value: one decision per BatchNormalization, totals, verification and timings.

The report is plain data (dataclasses); :meth:`FoldReport.to_dict` is its JSON form (schema below,
``schema_version`` bumps on any incompatible change). Drawing it for people is
:mod:`bnfold.render` 's job (``render.console.render``, ``render.markdown.fold_markdown``).

JSON schema, version 1::

    {
      "schema_version": 1, "bnfold_version": str,
      "input": str | null, "output": str | null,
      "written": bool,                     # false when verification failed or was unverified
                                           # (without --accept-unverified): nothing at "output"
      "status": "passed" | "failed" | "unverified",
                                           # unverified: --no-verify, or verification could not run
      "passed": bool,                      # status == "passed" (verified, and --strict held)
      "exit_code": 0 | 1 | 4,              # 4: unverified and not accepted (see README, Exit codes)
      "accept_unverified": bool,
      "unverified_reason": str | null,     # why, when status is "unverified"
      "strict": bool,
      "totals": {"batchnorms": int, "folded": int, "kept": int},
      "batchnorms": [
        {"name": str, "graph": str, "status": "folded" | "kept" | "fused_by_exporter",
         "direction": "backward" | "forward" | "decomposed" | "branch" | "lowered" | null,
                                           # how it was folded (or, for "lowered", rewritten while kept)
         "target": str | null, "target_op": str | null,   # the node it was folded into
         "reason": str | null,             # a SkipReason value when kept
         "detail": str,
         "kind": "batchnorm",              # added (issue 13), no schema bump
         "source": "node" | "lowered"}     # a BatchNormalization node or a Mul/Add chain (added)
      ],
      "affines": [ ... ],                  # same entries with "kind": "affine": per-channel
                                           # Mul/Div(+Add) chains that are not BNs (a layer
                                           # scale), folded; not in "totals" (added, no bump)
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

#: exit codes of a fold: 1 a difference (or --strict and a BN kept), 4 not verified (ONNX Runtime
#: cannot run the original, or the time budget ran out) and not accepted; 3 is reserved for bugs
EXIT_OK, EXIT_FAILED, EXIT_UNVERIFIED = 0, 1, 4


def worst_exit_code(codes: list[int] | tuple[int, ...]) -> int:
    """The exit code of several results: a bug (3) over bad input (2) over a difference (1) over
    unverified (4) over success (0); anything else (a signal's 128+n) first of all."""
    rank = {0: 0, 4: 1, 1: 2, 2: 3, 3: 4}
    return max(codes, key=lambda c: rank.get(c, 5), default=0)


@dataclass(frozen=True)
class BNDecision:
    """What happened to one BatchNormalization node."""

    name: str
    folded: bool
    detail: str
    graph: str = "main"
    # "backward": folded into its producer; "forward": into the node(s) that consume its output;
    # "decomposed": a BN lowered to Mul/Add/Sub/Div, folded into its producer; "branch": an
    # identity-branch BN summed with a sibling Conv of the same input, folded into that Conv's centre
    # tap (RepVGG/MobileOne); "lowered": kept, but rewritten to Mul + Add (fold --lower-remaining).
    direction: str | None = None
    target: str | None = None  # name of the node folded into
    target_op: str | None = None
    reason: SkipReason | None = None
    # "batchnorm": a BatchNormalization node or an exporter's lowering of one (Mul + Add,
    # Sub -> Mul -> Add, per channel); "affine": another per-channel Mul/Div(+Add) that bnfold
    # folded (a layer scale), reported under "affines" and not counted among the BatchNorms.
    kind: str = "batchnorm"
    # "node": a BatchNormalization node; "lowered": an exporter's Mul/Sub/Add/Div chain.
    source: str = "node"
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
            "kind": self.kind,
            "source": self.source,
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
    accept_unverified: bool = False  # write an unverified output anyway (never under strict)
    unverified_note: str | None = None  # why verification did not run, when it did not

    @property
    def batchnorms(self) -> list[BNDecision]:
        """The decisions about BatchNorms (nodes and lowered ones), not other affines."""
        return [d for d in self.decisions if d.kind == "batchnorm"]

    @property
    def affines(self) -> list[BNDecision]:
        """Folded per-channel affines that are not BatchNorms (e.g. a layer-scale Mul)."""
        return [d for d in self.decisions if d.kind != "batchnorm"]

    @property
    def folded(self) -> list[BNDecision]:
        return [d for d in self.batchnorms if d.folded]

    @property
    def kept(self) -> list[BNDecision]:
        return [d for d in self.batchnorms if not d.folded]

    @property
    def verified(self) -> bool:
        """True when verification ran and passed; False when it failed, was skipped or did not run."""
        return self.verification is not None and bool(self.verification)

    @property
    def verification_failed(self) -> bool:
        """Verification ran and found a difference (or the folded model does not run)."""
        v = self.verification
        return v is not None and v.status == "failed"

    @property
    def verification_status(self) -> str:
        """``"passed"``, ``"failed"``, ``"unverified"`` (it could not run) or ``"not_run"``
        (``--no-verify``)."""
        return "not_run" if self.verification is None else self.verification.status

    @property
    def unverified_reason(self) -> str | None:
        """Why the output is not verified (``None`` when it is, or verification failed)."""
        if self.verification is None:
            return self.unverified_note or "--no-verify"
        return self.verification.skipped_reason

    @property
    def status(self) -> str:
        """``"failed"`` (a difference, or ``strict`` and a BN kept), ``"unverified"`` (not
        verified: ``--no-verify`` or verification could not run) or ``"passed"``."""
        if self.verification_failed or (self.strict and self.kept):
            return "failed"
        return "passed" if self.verification_status == "passed" else "unverified"

    @property
    def unverified_accepted(self) -> bool:
        """An unverified output the user asked for: ``--no-verify``, or ``--accept-unverified``
        without ``--strict``."""
        if self.status != "unverified" or self.strict:
            return False
        return self.verification is None or self.accept_unverified

    @property
    def passed(self) -> bool:
        """Verified, no difference, and under ``strict`` no BN kept: ``status == "passed"``."""
        return self.status == "passed"

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        """0 passed (or unverified and accepted), 1 failed, 4 unverified and not accepted."""
        status = self.status
        if status == "failed":
            return EXIT_FAILED
        if status == "unverified" and not self.unverified_accepted:
            return EXIT_UNVERIFIED
        return EXIT_OK

    def __repr__(self) -> str:
        from bnfold.render import summary

        return summary.one_line("FoldReport", summary.fold_report(self))

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown summary (as ``bnfold fold --markdown`` writes): the model's
        row, then every kept BN with its reason."""
        from bnfold.render import summary

        return summary.fold_markdown(self)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "bnfold_version": __version__,
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "status": self.status,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "accept_unverified": self.accept_unverified,
            "unverified_reason": self.unverified_reason if self.status == "unverified" else None,
            "strict": self.strict,
            "totals": {
                "batchnorms": len(self.batchnorms),
                "folded": len(self.folded),
                "kept": len(self.kept),
            },
            "batchnorms": [d.to_dict() for d in self.batchnorms],
            "affines": [d.to_dict() for d in self.affines],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "bench": self.bench.to_dict() if self.bench is not None else None,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }
