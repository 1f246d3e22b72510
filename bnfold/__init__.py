"""bnfold: fold inference-mode BatchNormalization into Conv/ConvTranspose/Gemm/MatMul, prove the
folded model computes the same function, and measure what it buys under ONNX Runtime.

Public API (imported lazily, so ``import bnfold`` stays cheap and never imports torch or
onnxruntime)::

    result = bnfold.fold("model.onnx", "folded.onnx")   # FoldResult; truthy when it passed
    for d in result.decisions: print(d.name, d.status, d.reason, d.detail)

    bnfold.verify("a.onnx", "b.onnx")                     # VerificationResult; truthy when equal
    bnfold.bench(["a.onnx", "b.onnx"])                    # BenchResult: latencies and ratios
    bnfold.BatchNormFoldPass()                            # the onnx_ir pass, for your own pipeline

Module names differ from these function names on purpose (compare, latency, divergence, passes),
so importing a submodule never shadows a public function.
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "fold",
    "fold_in_place",
    "fold_model",
    "FoldResult",
    "FoldOptions",
    "FoldReport",
    "BNDecision",
    "SkipReason",
    "BatchNormFoldPass",
    "BnfoldError",
    "verify",
    "verify_models",
    "VerificationResult",
    "bench",
    "BenchResult",
    "localize",
    "LocalizeResult",
    "inspect",
]

_LAZY = {
    "fold": ("bnfold.api", "fold"),
    "fold_in_place": ("bnfold.api", "fold_in_place"),
    "fold_model": ("bnfold.api", "fold_model"),
    "FoldResult": ("bnfold.api", "FoldResult"),
    "FoldOptions": ("bnfold.options", "FoldOptions"),
    "FoldReport": ("bnfold.report", "FoldReport"),
    "BNDecision": ("bnfold.report", "BNDecision"),
    "SkipReason": ("bnfold.report", "SkipReason"),
    "BatchNormFoldPass": ("bnfold.passes", "BatchNormFoldPass"),
    "BnfoldError": ("bnfold.errors", "BnfoldError"),
    "verify": ("bnfold.compare", "verify_models"),
    "verify_models": ("bnfold.compare", "verify_models"),
    "VerificationResult": ("bnfold.compare", "VerificationResult"),
    "bench": ("bnfold.latency", "bench"),
    "BenchResult": ("bnfold.latency", "BenchResult"),
    "localize": ("bnfold.divergence", "localize"),
    "inspect": ("bnfold.dryrun", "inspect_model"),
    "LocalizeResult": ("bnfold.divergence", "LocalizeResult"),
}


def __getattr__(name: str):
    if (
        name == "torch"
    ):  # bnfold.torch.fold_module(...) without an explicit import; torch itself stays lazy
        import importlib

        return importlib.import_module("bnfold.torch")
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
