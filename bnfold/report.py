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
        {"name": str, "graph": str, "status": "folded" | "kept",
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

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import VerificationResult
    from .latency import BenchResult

SCHEMA_VERSION = 1


class SkipReason(str, enum.Enum):
    """Why a BatchNormalization was kept. The value is the stable string used in JSON."""

    TRAINING_MODE = "training_mode"
    STATS_OUTPUTS_USED = "stats_outputs_used"
    NON_CONSTANT_PARAMS = "non_constant_params"
    OVERRIDABLE_PARAMS = "overridable_params"
    PER_ELEMENT_STATS = "per_element_stats"
    INVALID_PARAMS = "invalid_params"
    OVERFLOW = "overflow"
    SHAPE_MISMATCH = "shape_mismatch"
    NO_PRODUCER = "no_producer"
    UNSUPPORTED_PRODUCER = "unsupported_producer"
    PRODUCER_OUTPUT_SHARED = "producer_output_shared"
    NON_CONSTANT_WEIGHT = "non_constant_weight"
    OVERRIDABLE_WEIGHT = "overridable_weight"
    UNSUPPORTED_LAYOUT = "unsupported_layout"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    IN_SUBGRAPH = "in_subgraph"
    PRECISION_LOSS = "precision_loss"
    # PyTorch modules (bnfold.torch.fold_module)
    NOT_TRACEABLE = "not_traceable"
    NOT_CALLED = "not_called"
    MODULE_REUSED = "module_reused"
    UNKNOWN_LAYOUT = "unknown_layout"
    HAS_HOOKS = "has_hooks"
    PADDED_CONSUMER = "padded_consumer"
    NON_POSITIVE_SCALE = "non_positive_scale"
    UNKNOWN_SHAPE = "unknown_shape"

    @property
    def explanation(self) -> str:
        return _EXPLANATIONS[self]


_EXPLANATIONS = {
    SkipReason.TRAINING_MODE: "the BN runs in training mode; it normalises with batch statistics",
    SkipReason.STATS_OUTPUTS_USED: "the BN's running/saved statistics outputs are consumed",
    SkipReason.NON_CONSTANT_PARAMS: "a BN parameter is not a constant",
    SkipReason.OVERRIDABLE_PARAMS: "a BN parameter is an initializer that is also a graph input (IR ≥ 4), so a caller may override it",
    SkipReason.PER_ELEMENT_STATS: "per-element statistics (spatial=0) that vary within a channel",
    SkipReason.INVALID_PARAMS: "BN parameters are NaN/Inf, have the wrong shape, or var + epsilon ≤ 0",
    SkipReason.OVERFLOW: "a folded value would overflow the weight's dtype",
    SkipReason.SHAPE_MISMATCH: "BN channel count does not match the producer's output channels",
    SkipReason.NO_PRODUCER: "the BN input is a graph input or constant, not the output of a node",
    SkipReason.UNSUPPORTED_PRODUCER: "the node before the BN is not Conv/ConvTranspose/Gemm/MatMul, and no node after it can take the fold",
    SkipReason.PRODUCER_OUTPUT_SHARED: "the producer's output is also used elsewhere (another node or a graph output)",
    SkipReason.NON_CONSTANT_WEIGHT: "the producer's weight or bias is not a constant",
    SkipReason.OVERRIDABLE_WEIGHT: "the producer's weight or bias is an initializer that is also a graph input (IR ≥ 4)",
    SkipReason.UNSUPPORTED_LAYOUT: "the BN channel axis is not the producer's output-feature axis",
    SkipReason.UNSUPPORTED_DTYPE: "the weight's dtype is not float16/bfloat16/float32/float64",
    SkipReason.PRECISION_LOSS: "a float16/bfloat16 BN whose mean is more than 16x its spread: the fold would lose precision",
    SkipReason.IN_SUBGRAPH: "the BN is inside a subgraph or function and depends on what is bound outside it (a function or loop-body input, or a producer in an enclosing graph)",
    SkipReason.NOT_TRACEABLE: "the BN is called by forward code that torch.fx cannot trace, so what feeds it is unknown",
    SkipReason.NOT_CALLED: "no traced forward calls the BN module (unused, or called only on a path the trace did not take)",
    SkipReason.MODULE_REUSED: "the producer or the BN is also used elsewhere and that call site cannot be rewritten",
    SkipReason.UNKNOWN_LAYOUT: "which axis the BN normalises is unknown (Linear → BatchNorm1d on an input of unknown rank)",
    SkipReason.HAS_HOOKS: "the BN or its producer has forward hooks, which could observe or change the value between them",
    SkipReason.PADDED_CONSUMER: "forward fold: the next Conv pads with zeros (or an AveragePool counts its padding), which the BN's shift would move, and the border cannot be compensated (unknown spatial size, or too large a correction)",
    SkipReason.NON_POSITIVE_SCALE: "forward fold through MaxPool: max commutes with the BN only where its scale is > 0",
    SkipReason.UNKNOWN_SHAPE: "forward fold: the static shape it needs (e.g. the size flattened before a Gemm) is unknown",
}


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

    @property
    def status(self) -> str:
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


# --- re-exported for bnfold/cli until the merge ------------------------------------------------------
# The renderers live in bnfold/render/ (console.py, markdown.py). cli.py still imports them from
# here; once cli imports them from bnfold.render.console / bnfold.render.markdown, delete this block.
from .render.console import (  # noqa: E402, F401
    render,
    render_batch,
    render_bench,
    render_check,
    render_verification,
)
from .render.markdown import (  # noqa: E402, F401
    batch_markdown,
    check_markdown,
    fold_markdown,
    verification_markdown,
)

# --- end of the temporary re-export block ------------------------------------------------------------
