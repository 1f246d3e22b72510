"""``bnfold.fold``: load, fold, write, verify, in one call that returns a typed result."""

from __future__ import annotations

__all__ = ["FoldOptions", "FoldResult", "fold", "fold_in_place", "fold_model", "fold_with"]

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from . import io as _io
from .errors import UsageError
from .options import FoldOptions
from .passes import BatchNormFoldPass
from .passes.weights import DeferredOverflow
from .report import BNDecision, FoldReport

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


@dataclass
class FoldResult:
    """The folded model (same kind as given: a Path when written to ``output``, an
    ``onnx.ModelProto`` for a ModelProto, an ``onnx_ir.Model`` otherwise) and its report.

    Truthy only when the fold passed: verification ran and passed and, under ``strict``, nothing
    was kept. ``status`` is ``"passed"``, ``"failed"`` or ``"unverified"`` (``verify=False``, or
    verification could not run: see ``report.unverified_reason``).
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

    @property
    def status(self) -> str:
        return self.report.status

    def __bool__(self) -> bool:
        return self.report.passed

    def __repr__(self) -> str:
        from .render import summary

        return summary.one_line("FoldResult", summary.fold_report(self.report))

    def _repr_markdown_(self) -> str:
        return self.report.to_markdown()


def fold_model(
    model: ir.Model,
    *,
    lower_remaining: bool = False,
    duplicate_shared: bool = False,
    allow_slower_folds: bool = False,
) -> list[BNDecision]:
    """Run the fold pass in place on an ``onnx_ir.Model``; return one decision per BatchNorm (and per
    decomposed BN that was folded). The options are those of :class:`BatchNormFoldPass`."""
    p = BatchNormFoldPass(
        lower_remaining=lower_remaining,
        duplicate_shared=duplicate_shared,
        allow_slower_folds=allow_slower_folds,
    )
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
    allow_slower_folds: bool = False,
    bench: bool = False,
    accept_unverified: bool = False,
    verify_timeout: float | None = None,
    options: FoldOptions | None = None,
) -> FoldResult:
    """Fold every foldable inference-mode BatchNormalization of ``model``.

    Args:
        model: a path to an ``.onnx`` file, an ``onnx.ModelProto`` (not modified) or an
            ``onnx_ir.Model`` (folded in place, like any onnx_ir InPlacePass).
        output: where to write the folded model. Written atomically, and only when verification
            passes (or ``verify=False``, or it could not run and ``accept_unverified``). Required for a path input only if you want a file; otherwise the result holds
            an ``onnx_ir.Model``.
        verify: run the original and folded models in ONNX Runtime (optimizations disabled) on
            seeded random inputs and compare every output.
        input_shapes: shapes for inputs with dynamic dimensions (default: derived from the graph so
            that every weight is exercised; see :mod:`bnfold.exercise`).
        atol, rtol: judge element-wise with these instead of the calibrated default.
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
        allow_slower_folds: also fold a BN whose forward fold needs a padded Conv's
            border-correction ``Add`` that the cost rule expects to make the model slower at ONNX
            Runtime's default level (kept by default, reason ``slower_fold``).
        bench: after the output is written, time the input file against it under ONNX Runtime
            (``report.bench``); needs a model path and an ``output``.
        accept_unverified: write the output even when verification could not run (ONNX Runtime
            cannot run the original, or the time budget ran out); the status stays "unverified".
            Refused in effect under ``strict``.
        verify_timeout: verification time budget in seconds (0: none; default:
            ``$BNFOLD_VERIFY_TIMEOUT`` or 600).
        options: all of the above (but ``progress``) as one :class:`~bnfold.options.FoldOptions`;
            then leave the keywords at their defaults.

    Returns:
        A :class:`FoldResult`; a failed verification is a value (``bool(result)`` is False), not an
        exception. Bad input raises a :class:`~bnfold.errors.BnfoldError`.
    """
    opts = FoldOptions.from_keywords(
        options,
        verify=verify,
        input_shapes=input_shapes,
        atol=atol,
        rtol=rtol,
        seed=seed,
        strict=strict,
        external_data=external_data,
        lower_remaining=lower_remaining,
        duplicate_shared=duplicate_shared,
        allow_slower_folds=allow_slower_folds,
        bench=bench,
        accept_unverified=accept_unverified,
        verify_timeout=verify_timeout,
    )
    return fold_with(model, output, opts, progress=progress)


def fold_in_place(
    model: str | os.PathLike,
    options: FoldOptions | None = None,
    *,
    progress: ProgressFn | None = None,
    **keywords: Any,
) -> FoldResult:
    """Fold the ONNX file ``model`` and replace it with the folded model (``bnfold fold --in-place``,
    the ``bnfold-fold`` pre-commit hook).

    The folded model is written beside the input, verified against it, and only when that passed
    moves over it in one atomic rename, its external data first under a fresh name; the data
    files in bnfold's naming (``MODEL.data``, ``MODEL.<8 hex>.data``) that the old model read are
    removed afterwards. When verification fails, or nothing folded (no BatchNormalization, or all
    of them kept), the file is left exactly as it was. ``options``/``keywords`` are those of
    :func:`fold`; ``verify=False`` and ``bench`` are refused (in place, verification is what
    guards the input, and there is no second file to time against).
    """
    opts = FoldOptions.from_keywords(options, **keywords)
    if not opts.verify:
        raise UsageError(
            "in-place folding replaces the input only after verification passed; "
            "it cannot run without verification (--no-verify)"
        )
    if opts.bench:
        raise UsageError("--bench times the input against the output; in place they are one file")
    kind, path = _kind_of(model)
    if kind != "path":
        raise UsageError("fold_in_place takes the path of an ONNX file")
    return fold_with(path, path, opts, progress=progress, in_place=True)


def fold_with(
    model: str | os.PathLike | Any,
    output: str | os.PathLike | None,
    options: FoldOptions,
    *,
    progress: ProgressFn | None = None,
    in_place: bool = False,
) -> FoldResult:
    """:func:`fold` with its options as one :class:`FoldOptions`; the phases, in order."""
    options.refuse(("opset", "exporter"), "bnfold.fold", "it applies to PyTorch inputs only")
    # A large weight's range is checked as it is written (one read of each weight); a fold found
    # to overflow there is refused and the model folded again from the input (nothing of the first
    # attempt is written: the staged output is discarded).
    overflowed: dict[tuple[str, str, str], str] = {}
    while True:
        if progress:
            progress("load", 0, 1)
        job = _load(model, output, options, in_place=in_place)
        try:
            _keep_reference(job, model)
            if progress:
                progress("fold", 0, 1)
            report = _run_pass(job, overflowed)
            try:
                _write_and_verify(job, report, progress)
            except Exception as exc:
                found = _deferred_overflow(exc)
                if found is None or found.key in overflowed:
                    raise
                overflowed[found.key] = found.detail
                continue
            _bench(job, report, progress)
        finally:
            if job.work is not None:
                shutil.rmtree(job.work, ignore_errors=True)
        break
    report.timings = job.timings
    return FoldResult(model=_result_model(job), report=report)


def _deferred_overflow(exc: BaseException | None) -> DeferredOverflow | None:
    """The :class:`DeferredOverflow` behind ``exc`` (onnx_ir's serializer wraps what it calls)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DeferredOverflow):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@dataclass
class _Job:
    """One run of :func:`fold_with`: what was loaded, where it goes, and what each phase timed."""

    options: FoldOptions
    kind: str  # "path", "proto" or "ir"
    input_path: Path | None
    ir_model: ir.Model
    protected: set[Path]
    out_path: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    work: Path | None = None  # a scratch folder, removed at the end
    reference: str | None = None  # the original as a file, for verification
    use_external: bool = False
    staged: _io.StagedOutput | None = None
    in_place: bool = False  # the output replaces the input (fold_in_place)


def _load(
    model: Any, output: str | os.PathLike | None, options: FoldOptions, *, in_place: bool = False
) -> _Job:
    """Load the model (a path, a ModelProto or an onnx_ir.Model) and check the output path."""
    kind, input_path = _kind_of(model)
    if options.bench and (kind != "path" or not output):
        raise UsageError(
            "bench times the input file against the written output: give a model path and an output"
        )
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
    if in_place:  # the output is the input, on purpose: only the usual folder checks
        out_path = _io.check_output_path(output, input_path=None)
    elif output:
        out_path = _io.check_output_path(output, input_path=input_path, protected=protected)
    else:
        out_path = None
    job = _Job(options, kind, input_path, ir_model, protected, out_path, in_place=in_place)
    job.timings["load"] = time.perf_counter() - t0
    return job


def _keep_reference(job: _Job, model: Any) -> None:
    """Keep the original as a file for verification, before the in-place pass changes it."""
    if job.kind == "path":
        job.reference = str(job.input_path)
        return
    if not job.options.verify:
        return
    job.work = Path(tempfile.mkdtemp(prefix="bnfold-"))
    ref_file = job.work / "reference.onnx"
    if job.kind == "proto":
        _io.save_proto_to(model, ref_file)
    else:
        _io.save_ir_to(job.ir_model, ref_file)
    job.reference = str(ref_file)


def _run_pass(job: _Job, overflowed: dict[tuple[str, str, str], str]) -> FoldReport:
    """Run the fold pass in place and start the report. The range check of large folded weights
    is deferred to their write when the input can be loaded again and something is written."""
    opts = job.options
    nodes_before = _count_nodes(job.ir_model)
    # Decide before folding: folded weights are lazy tensors, no longer ExternalTensors.
    external = opts.external_data
    job.use_external = _io.needs_external_data(job.ir_model) if external is None else external
    t1 = time.perf_counter()
    fold_pass = BatchNormFoldPass(
        lower_remaining=opts.lower_remaining,
        duplicate_shared=opts.duplicate_shared,
        allow_slower_folds=opts.allow_slower_folds,
        defer_range_check=job.kind != "ir" and (job.out_path is not None or opts.verify),
        known_overflow=overflowed,
    )
    decisions = fold_pass(job.ir_model).decisions
    job.timings["fold"] = time.perf_counter() - t1
    if external is None and not job.use_external:
        job.use_external = _io.needs_external_data(job.ir_model)  # the fold may have grown it
    return FoldReport(
        decisions=decisions,
        input=str(job.input_path) if job.input_path else None,
        output=str(job.out_path) if job.out_path else None,
        strict=opts.strict,
        accept_unverified=opts.accept_unverified,
        nodes_before=nodes_before,
        nodes_after=_count_nodes(job.ir_model),
    )


def _write_and_verify(job: _Job, report: FoldReport, progress: ProgressFn | None) -> None:
    """Stage the output, verify it against the reference, commit it only when that passed."""
    verify = job.options.verify
    if job.out_path is None and not verify:
        return
    if job.in_place and not any(d.folded or d.direction == "lowered" for d in report.decisions):
        report.verification = _nothing_to_verify(job, IN_PLACE_UNCHANGED)
        return
    target = job.out_path
    if target is None:
        if job.work is None:
            job.work = Path(tempfile.mkdtemp(prefix="bnfold-"))
        target = job.work / "folded.onnx"
    t2 = time.perf_counter()
    if progress:
        progress("save", 0, 1)
    inputs = {job.input_path} if job.input_path else set()
    # In place, the input and the bnfold-named data files it read are what the commit replaces.
    protected = set() if job.in_place else job.protected | inputs
    staged = _io.StagedOutput(target, protected=protected)
    try:
        staged.write(
            job.ir_model,
            external=job.use_external,
            progress=(lambda d, n: progress("save", d, n)) if progress else None,
        )
        job.timings["save"] = time.perf_counter() - t2
        if verify and not report.decisions:
            report.verification = _nothing_to_verify(job, NOTHING_FOLDED)
        elif verify:
            report.verification = _verify(job, str(staged.path), progress)
        if job.out_path is not None and _may_write(report):
            staged.commit()
            report.written = True
    finally:
        if not staged.committed:
            staged.discard()


NOTHING_FOLDED = (
    "no BatchNormalization was found, so the output is the input model unchanged and there is "
    "nothing to compare"
)
IN_PLACE_UNCHANGED = "nothing was folded, so the file is left exactly as it was"


def _nothing_to_verify(job: _Job, why: str):  # noqa: ANN202 - bnfold.compare.VerificationResult
    """Nothing changed: say so instead of spending a verification on an identical copy (the
    output is the input re-serialized, so it computes the same function: passed, not skipped)."""
    from .compare import VerificationResult

    return VerificationResult(passed=True, seed=job.options.seed, unchanged=why)


def _may_write(report: FoldReport) -> bool:
    """Verified and equal, or unverified and accepted (``--no-verify``, ``--accept-unverified``
    without ``--strict``). ``--strict`` with a kept BN still writes a verified output."""
    status = report.verification_status
    if status == "passed":
        return True
    if status == "failed":
        return False
    return status == "not_run" or (report.accept_unverified and not report.strict)


def _verify(job: _Job, candidate: str, progress: ProgressFn | None):  # noqa: ANN202
    from .compare import verify_models

    opts = job.options
    t3 = time.perf_counter()
    if progress:
        progress("verify", 0, 1)
    result = verify_models(
        job.reference,
        candidate,
        input_shapes=dict(opts.input_shapes) or None,
        seed=opts.seed,
        atol=opts.atol,
        rtol=opts.rtol,
        timeout=opts.verify_timeout,
    )
    if progress:
        progress("verify", 1, 1)
    job.timings["verify"] = time.perf_counter() - t3
    return result


def _bench(job: _Job, report: FoldReport, progress: ProgressFn | None) -> None:
    """With ``bench``: time the input file against the written output."""
    if not (job.options.bench and report.written):
        return
    from .latency import bench as run_bench

    report.bench = run_bench(
        [job.input_path, job.out_path],
        input_shapes=dict(job.options.input_shapes) or None,
        seed=job.options.seed,
        labels=["original", "folded"],
        progress=(lambda d, n: progress("bench", d, n)) if progress else None,
    )


def _result_model(job: _Job) -> Any:
    """The same kind as given: a ModelProto, the written path, or the onnx_ir.Model."""
    if job.kind == "proto":
        return _io.to_proto(job.ir_model)
    if job.kind == "path" and job.out_path is not None:
        return job.out_path
    return job.ir_model


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
