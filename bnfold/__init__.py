"""bnfold: fold inference-mode BatchNormalization into Conv/ConvTranspose/Gemm/MatMul, prove the
folded model computes the same function, and measure what it buys under ONNX Runtime.

Public API (imported lazily, so ``import bnfold`` stays cheap and never imports torch or
onnxruntime)::

    result = bnfold.fold("model.onnx", "folded.onnx")   # FoldResult; truthy when it passed
    for d in result.decisions: print(d.name, d.status, d.reason, d.detail)

    bnfold.BatchNormFoldPass()                            # the onnx_ir pass, for your own pipeline
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "fold",
    "fold_model",
    "FoldResult",
    "FoldReport",
    "BNDecision",
    "SkipReason",
    "BatchNormFoldPass",
    "BnfoldError",
    "verify_models",
    "VerificationResult",
]

_LAZY = {
    "fold": ("bnfold.api", "fold"),
    "fold_model": ("bnfold.api", "fold_model"),
    "FoldResult": ("bnfold.api", "FoldResult"),
    "FoldReport": ("bnfold.report", "FoldReport"),
    "BNDecision": ("bnfold.report", "BNDecision"),
    "SkipReason": ("bnfold.report", "SkipReason"),
    "BatchNormFoldPass": ("bnfold.passes", "BatchNormFoldPass"),
    "BnfoldError": ("bnfold.errors", "BnfoldError"),
    "verify_models": ("bnfold.verify", "verify_models"),
    "VerificationResult": ("bnfold.verify", "VerificationResult"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
