"""``bnfold.fold``: load, fold, write, verify, in one call that returns a typed result."""

from __future__ import annotations

__all__ = ["FoldResult", "fold", "fold_model"]

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from . import io as _io
from .errors import UsageError
from .passes import BatchNormFoldPass
from .report import BNDecision, FoldReport

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


@dataclass
class FoldResult:
    """The folded model (same kind as given: a Path when written to ``output``, an
    ``onnx.ModelProto`` for a ModelProto, an ``onnx_ir.Model`` otherwise) and its report.

    Truthy when the fold passed: verification (if run) passed and, under ``strict``, nothing was kept.
    """

    model: Any
    report: FoldReport

    @property
    def decisions(self) -> list[BNDecision]:
        return self.report.decisions

    @property
    def verification(self):  # noqa: ANN201 - bnfold.compare.VerificationResult | None
        return self.report.verification

    @property
    def passed(self) -> bool:
        return self.report.passed

    def __bool__(self) -> bool:
        return self.report.passed


def fold_model(
    model: ir.Model, *, lower_remaining: bool = False, duplicate_shared: bool = False
) -> list[BNDecision]:
    """Run the fold pass in place on an ``onnx_ir.Model``; return one decision per BatchNorm (and per
    decomposed BN that was folded). The options are those of :class:`BatchNormFoldPass`."""
    p = BatchNormFoldPass(lower_remaining=lower_remaining, duplicate_shared=duplicate_shared)
    p(model)
    return p.decisions


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)


def fold(
    model: str | os.PathLike | Any,
    output: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    input_shapes: Mapping[str, tuple[int, ...] | list[int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    strict: bool = False,
    external_data: bool | None = None,
    progress: ProgressFn | None = None,
    lower_remaining: bool = False,
    duplicate_shared: bool = False,
) -> FoldResult:
    """Fold every foldable inference-mode BatchNormalization of ``model``.

    Args:
        model: a path to an ``.onnx`` file, an ``onnx.ModelProto`` (not modified) or an
            ``onnx_ir.Model`` (folded in place, like any onnx_ir InPlacePass).
        output: where to write the folded model. Written atomically, and only when verification
            passes. Required for a path input only if you want a file; otherwise the result holds
            an ``onnx_ir.Model``.
        verify: run the original and folded models in ONNX Runtime (optimizations disabled) on
            seeded random inputs and compare every output.
        input_shapes: shapes for inputs with dynamic dimensions (default: 1 for each dynamic dim).
        atol, rtol: override the per-dtype default tolerances.
        seed: seed of the random verification inputs.
        strict: the result fails when any BatchNormalization is kept.
        external_data: force (True) or forbid (False) external data in the output; default: use it
            when the input had it or the output would exceed 2 GB.
        progress: optional ``progress(phase, done, total)`` callback (e.g. for a progress bar).
        lower_remaining: rewrite every BatchNormalization that stays (inference mode, constant
            parameters) into ``Mul`` + ``Add``, for runtimes without a BN kernel; its decision stays
            "kept", with direction "lowered".
        duplicate_shared: where a producer's output also feeds other nodes, fold into a copy of
            the producer (costs its compute twice; said in the decision's detail).

    Returns:
        A :class:`FoldResult`; a failed verification is a value (``bool(result)`` is False), not an
        exception. Bad input raises a :class:`~bnfold.errors.BnfoldError`.
    """
    timings: dict[str, float] = {}
    shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    kind, input_path = _kind_of(model)
    t0 = time.perf_counter()

    protected: set[Path] = set()
    if kind == "path":
        ir_model = _io.load(input_path)
        protected = _io.external_data_files(ir_model)
    elif kind == "proto":
        ir_model = _io.from_proto(model)
    else:
        ir_model = model
        protected = _io.external_data_files(ir_model)
    out_path = (
        _io.check_output_path(output, input_path=input_path, protected=protected)
        if output
        else None
    )
    timings["load"] = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix="bnfold-")) if verify and kind != "path" else None
    try:
        reference: str | None = str(input_path) if kind == "path" else None
        if verify and kind != "path":
            # The original must be kept for comparison before the in-place pass changes it.
            ref_file = work / "reference.onnx"
            if kind == "proto":
                _io.save_proto_to(model, ref_file)
            else:
                _io.save_ir_to(ir_model, ref_file)
            reference = str(ref_file)

        nodes_before = _count_nodes(ir_model)
        # Decide before folding: folded weights are lazy tensors, no longer ExternalTensors.
        use_external = _io.needs_external_data(ir_model) if external_data is None else external_data
        t1 = time.perf_counter()
        decisions = fold_model(
            ir_model, lower_remaining=lower_remaining, duplicate_shared=duplicate_shared
        )
        timings["fold"] = time.perf_counter() - t1

        report = FoldReport(
            decisions=decisions,
            input=str(input_path) if input_path else None,
            output=str(out_path) if out_path else None,
            strict=strict,
            nodes_before=nodes_before,
            nodes_after=_count_nodes(ir_model),
        )
        if external_data is None and not use_external:
            use_external = _io.needs_external_data(ir_model)  # the fold may have grown the model

        staged = None
        if out_path is not None or verify:
            target = (
                out_path
                if out_path is not None
                else (work or Path(tempfile.mkdtemp(prefix="bnfold-"))) / "folded.onnx"
            )
            if work is None and out_path is None:
                work = target.parent
            t2 = time.perf_counter()
            staged = _io.StagedOutput(
                target, protected=protected | ({input_path} if input_path else set())
            )
            staged.write(
                ir_model,
                external=use_external,
                progress=(lambda d, n: progress("save", d, n)) if progress else None,
            )
            timings["save"] = time.perf_counter() - t2

        try:
            if verify:
                from .compare import verify_models

                t3 = time.perf_counter()
                if progress:
                    progress("verify", 0, 1)
                report.verification = verify_models(
                    reference,
                    str(staged.path),
                    input_shapes=shapes or None,
                    seed=seed,
                    atol=atol,
                    rtol=rtol,
                )
                if progress:
                    progress("verify", 1, 1)
                timings["verify"] = time.perf_counter() - t3
            if out_path is not None and not report.verification_failed:
                staged.commit()
                report.written = True
        finally:
            if staged is not None and not staged.committed:
                staged.discard()
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    report.timings = timings
    if kind == "proto":
        result_model: Any = _io.to_proto(ir_model)
    elif kind == "path" and out_path is not None:
        result_model = out_path
    else:
        result_model = ir_model
    return FoldResult(model=result_model, report=report)


def _kind_of(model: Any) -> tuple[str, Path | None]:
    if isinstance(model, (str, os.PathLike)):
        return "path", Path(model)
    if isinstance(model, ir.Model):
        return "ir", None
    if type(model).__name__ == "ModelProto":
        return "proto", None
    if type(model).__module__.startswith("torch"):
        raise UsageError("bnfold.fold takes ONNX models; for a torch.nn.Module use bnfold.torch")
    raise UsageError(
        f"cannot fold a {type(model).__name__}: give a path, an onnx.ModelProto or an onnx_ir.Model"
    )
