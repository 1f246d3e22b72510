"""Why a BatchNormalization is kept, and the one exception that says so.

A leaf module: every layer (numerics, the pass, the PyTorch front end, the report) imports it, and it
imports nothing of bnfold. A refusal is always a :class:`Refusal` carrying a :class:`SkipReason`
member, so a reason can never be a misspelt string.
"""

from __future__ import annotations

__all__ = ["Direction", "Refusal", "SkipReason"]

import enum
from typing import Literal

#: How a BN was folded (or, for "lowered", rewritten while kept); the report's ``direction`` values.
Direction = Literal["backward", "forward", "decomposed", "branch", "lowered"]


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
    SLOWER_FOLD = "slower_fold"
    # PyTorch: a BatchNorm subclass / BN-like module whose forward bnfold cannot reduce to an affine
    CUSTOM_FORWARD = "custom_forward"

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
    SkipReason.SLOWER_FOLD: "kept for cost: the forward fold needs a border-correction Add into a padded Conv, which would make the model slower under ONNX Runtime's default optimizations (force it with --allow-slower-folds)",
    SkipReason.CUSTOM_FORWARD: "a BatchNorm subclass (or BN-like module) whose forward is not batch_norm followed by other modules, nor a fixed per-channel affine",
}


class Refusal(ValueError):
    """A fold that cannot be done: the BN is kept for ``reason`` (``detail`` says what was found).

    Raised by :mod:`bnfold.numerics` (a fold that would not be exact or representable) and by the
    pass's matchers; the pass turns it into a kept :class:`~bnfold.report.BNDecision`.
    """

    def __init__(self, reason: SkipReason, detail: str) -> None:
        if not isinstance(reason, SkipReason):
            raise TypeError(f"a Refusal needs a SkipReason, not {reason!r}")
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
