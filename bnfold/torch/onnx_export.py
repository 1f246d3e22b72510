"""``bnfold.torch.export``: export a module to ONNX (torch's maintained torch.export-based exporter,
``dynamo=True``, by default; the deprecated TorchScript exporter only when asked for), fold what the
export leaves with the ONNX pass, account for every BatchNorm module of the ``nn.Module``, verify the
folded model under ONNX Runtime against PyTorch's own outputs, and write it atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import InvalidModelError, UsageError
from bnfold.options import FoldOptions

from ._common import (
    _as_args,
    _check_module_state,
    _first_line,
    _flatten_outputs,
    _forward_arg_names,
    _import_torch,
    _seeded_like,
    _shapes_text,
    _to_numpy,
    warnings_to_log,
)

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.api import FoldResult
    from bnfold.compare import VerificationResult
    from bnfold.report import FoldReport

logger = logging.getLogger(__name__)


@warnings_to_log
def export(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    strict: bool = False,
    external_data: bool | None = None,
    lower_remaining: bool = False,
    duplicate_shared: bool = False,
    bench: bool = False,
    options: FoldOptions | None = None,
    exporter: str = "dynamo",
) -> FoldResult:
    """Export ``module`` to ONNX, fold it, verify it against the module itself, write it to ``path``.

    The module is exported with torch's torch.export-based exporter (``torch.onnx.export(
    dynamo=True)``, its optimizer on: it fuses ``Conv → BatchNorm`` itself), the ONNX fold pass
    folds what the export left, and the report accounts for every BatchNorm module of the
    ``nn.Module`` (a decision per module the exporter fused, status ``fused_by_exporter``; one per
    BN module that the exported graph never runs, ``not_called``). ``exporter="torchscript"`` is
    the legacy fallback (``dynamo=False, do_constant_folding=False``: every BatchNormalization
    kept for the ONNX pass), which torch deprecates; its warnings go to the log. The folded ONNX model runs under ONNX Runtime (CPU,
    optimizations disabled) on seeded inputs shaped like ``example_inputs`` (floating tensors random
    normal; with ``dynamic_batch`` a second batch of size N+1 checks the dynamic axis). Its outputs
    are compared with the PyTorch module's own outputs on the same inputs. ``path`` is written
    (atomically) only when that verification passes or could not run (ONNX Runtime lacks a kernel,
    e.g. bfloat16 Conv: ``verification.skipped_reason`` says so).

    Args:
        module: an eval-mode ``nn.Module``, a TorchScript module, or a ``torch.export``
            ``ExportedProgram`` (or its ``.module()``), whose BatchNorm mode is read from its graph.
        example_inputs: a tensor or a tuple of tensors, the forward's positional arguments.
        path: the ONNX file to write.
        input_names, output_names: ONNX names (default: the forward's argument names; ``output``
            or ``output_0``, ``output_1``...).
        dynamic_batch: make dimension 0 of every input and output dynamic (``batch``).
        opset: ONNX opset of the export (the dynamo exporter needs 18 or more: below that its own
            default opset is used, and the log says so).
        exporter: ``"dynamo"`` (default) or ``"torchscript"`` (the deprecated fallback).
        verify, atol, rtol, seed, strict, external_data, lower_remaining, duplicate_shared:
            as for :func:`bnfold.fold`.
        bench: after the write, time the unfolded export against the folded model under ONNX
            Runtime, on inputs of ``example_inputs``' shapes (``report.bench``).
        options: all of the above but the names and ``dynamic_batch`` as one
            :class:`~bnfold.options.FoldOptions` (its ``input_shapes`` and ``trust_pickle`` do not
            apply here and are refused); then leave those keywords at their defaults.

    Returns:
        The :class:`bnfold.api.FoldResult` of the fold (``.model`` is ``path``), with the
        verification against PyTorch in ``report.verification``.
    """
    opts = FoldOptions.from_keywords(
        options,
        opset=opset,
        verify=verify,
        atol=atol,
        rtol=rtol,
        seed=seed,
        strict=strict,
        external_data=external_data,
        lower_remaining=lower_remaining,
        duplicate_shared=duplicate_shared,
        bench=bench,
        exporter=exporter,
    )
    opts.refuse(
        ("input_shapes", "trust_pickle"),
        "bnfold.torch.export",
        "the module is given and example_inputs fix the shapes",
    )
    torch = _import_torch()
    _check_module_state(module)
    program = None
    if isinstance(module, torch.export.ExportedProgram):
        program, module = module, module.module()
    chosen = opts.exporter
    if chosen == "dynamo" and isinstance(module, torch.jit.ScriptModule):
        logger.warning(
            "a TorchScript module can only be exported by the legacy TorchScript exporter: "
            "using it (exporter='torchscript')"
        )
        chosen = "torchscript"
    names = _Names(input_names, output_names, dynamic_batch, chosen, program)
    return _export(module, example_inputs, path, opts, names)


@contextlib.contextmanager
def exported_onnx(
    module: Any,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Iterator[Path]:
    """The module exported to ONNX with every BatchNorm kept (the TorchScript exporter without
    constant folding, so no exporter fuses a BN unreported), unfolded, in a temporary folder removed
    on exit: what ``bnfold inspect`` and ``bnfold check`` read for a PyTorch file."""
    torch = _import_torch()
    _check_module_state(module)
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    args = _as_args(example_inputs)
    _, references = _reference_outputs(module, args, 0, dynamic_batch=False)
    names = _Names(input_names, None, dynamic_batch)
    names_in, names_out, dynamic_axes = _onnx_names(module, args, references[0], names)
    work = Path(tempfile.mkdtemp(prefix="bnfold-torch-"))
    try:
        exported = work / "exported.onnx"
        # Every BatchNorm kept (TorchScript exporter, no constant folding), so that each gets a
        # decision of its own in inspect/check; an internal choice, logged at debug level.
        spec = _ExportSpec(names_in, names_out, dynamic_axes, opset, "torchscript", announce=False)
        _torch_onnx_export(module, args, exported, spec)
        yield exported
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Names:
    """The ONNX input/output names asked for, and whether dimension 0 is dynamic."""

    inputs: Sequence[str] | None
    outputs: Sequence[str] | None
    dynamic_batch: bool
    exporter: str = "dynamo"
    program: Any = None  # the ExportedProgram given, which the dynamo exporter takes as it is


def _export(
    module: Any, example_inputs: Any, path: str | os.PathLike, opts: FoldOptions, names: _Names
) -> FoldResult:
    """:func:`export` after the module's state was checked: its phases, in order."""
    from bnfold import io as _io
    from bnfold.api import FoldResult

    torch = _import_torch()
    args = _as_args(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise UsageError(
            "export needs example_inputs made of tensors (the forward's positional arguments)"
        )
    out_path = _io.check_output_path(path, input_path=None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    samples, references = _reference_outputs(module, args, opts.seed, names.dynamic_batch)
    names_in, names_out, dynamic_axes = _onnx_names(module, args, references[0], names)
    timings["run"] = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix="bnfold-torch-"))
    try:
        exported = work / "exported.onnx"
        t1 = time.perf_counter()
        spec = _ExportSpec(names_in, names_out, dynamic_axes, opts.opset, names.exporter)
        source = (
            names.program if names.program is not None and spec.exporter == "dynamo" else module
        )
        if not _torch_onnx_export(source, args, exported, spec):
            samples, references = samples[:1], references[:1]  # exported with a static batch
        elif spec.dynamic_axes and len(samples) > 1 and _batch_fixed(exported, names_in, samples):
            logger.warning(
                "the %s exporter fixed the batch size inside the graph (the export does not run "
                "at batch %d): exporting static shapes",
                spec.exporter,
                int(samples[1][0].shape[0]),
            )
            spec = _ExportSpec(names_in, names_out, None, opts.opset, spec.exporter)
            _torch_onnx_export(source, args, exported, spec)
            samples, references = samples[:1], references[:1]
        timings["export"] = time.perf_counter() - t1
        report, ir_model = _fold_export(exported, opts, module, out_path, timings)
        if names.exporter == "dynamo":
            from ._accounting import account_bn_modules

            account_bn_modules(module, exported, report)
        check = _Check(exported, names_in, samples, references)
        _write_verified(ir_model, report, out_path, check, opts, timings)
        if opts.bench and report.written:
            report.bench = _bench_export(exported, out_path, names_in, samples[0], opts.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.timings = timings
    return FoldResult(model=out_path, report=report)


def _reference_outputs(
    module: Any, args: tuple, seed: int, dynamic_batch: bool
) -> tuple[list[tuple], list[list[tuple[str, Any]]]]:
    """The module's own outputs on the verification inputs (this also checks the inputs fit):
    one seeded sample shaped like ``args``, and with ``dynamic_batch`` one of batch size N+1."""
    torch = _import_torch()
    samples = [_seeded_like(args, seed)]
    if dynamic_batch and all(a.dim() >= 1 for a in args):
        samples.append(_seeded_like(args, seed + 1, batch=int(args[0].shape[0]) + 1))
    references: list[list[tuple[str, Any]]] = []
    for k, feeds in enumerate(samples):
        try:
            with torch.no_grad():
                references.append(_flatten_outputs(module(*feeds)))
        except Exception as exc:
            if k == 0:
                raise UsageError(
                    f"the module failed to run on inputs {_shapes_text(feeds)}: {_first_line(exc)}"
                ) from None
            logger.warning(
                "the module does not run at batch size %d (%s); verifying at the "
                "example batch size only",
                int(feeds[0].shape[0]),
                _first_line(exc),
            )
            samples = samples[:1]
            break
    if not references[0]:
        raise UsageError("the module's forward returns no tensors; nothing to export")
    return samples, references


def _onnx_names(
    module: Any, args: tuple, outputs: list[tuple[str, Any]], names: _Names
) -> tuple[list[str], list[str], dict[str, dict[int, str]] | None]:
    """Input names, output names and the dynamic axes of the export."""
    names_in = (
        list(names.inputs) if names.inputs is not None else _forward_arg_names(module, len(args))
    )
    if len(names_in) != len(args):
        raise UsageError(f"input_names has {len(names_in)} names for {len(args)} inputs")
    names_out = (
        list(names.outputs)
        if names.outputs is not None
        else (["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    )
    if len(names_out) != len(outputs):
        raise UsageError(f"output_names has {len(names_out)} names for {len(outputs)} outputs")
    if not names.dynamic_batch:
        return names_in, names_out, None
    dynamic_axes = {n: {0: "batch"} for n, a in zip(names_in, args, strict=True) if a.dim() >= 1}
    dynamic_axes.update(
        {n: {0: "batch"} for n, (_, t) in zip(names_out, outputs, strict=True) if t.dim() >= 1}
    )
    return names_in, names_out, dynamic_axes


@dataclass
class _ExportSpec:
    names_in: list[str]
    names_out: list[str]
    dynamic_axes: dict[str, dict[int, str]] | None
    opset: int
    exporter: str
    #: Log the legacy exporter's use (and torch's deprecation) as a warning: the user chose it.
    announce: bool = True


def _torch_onnx_export(module: Any, args: tuple, exported: Path, spec: _ExportSpec) -> bool:
    """Run torch's exporter (``spec.exporter``), writing the unfolded model to ``exported``.
    False when the batch dimension asked to be dynamic had to be exported static."""
    torch = _import_torch()
    common = {
        "input_names": spec.names_in,
        "output_names": spec.names_out,
        "dynamic_axes": spec.dynamic_axes,
        "export_params": True,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if spec.exporter == "torchscript":
                logger.log(
                    logging.WARNING if spec.announce else logging.DEBUG,
                    "exporting with the legacy TorchScript exporter (exporter='torchscript'), "
                    "which torch deprecates; the default is the torch.export-based exporter",
                )
                torch.onnx.export(
                    module,
                    tuple(args),
                    str(exported),
                    dynamo=False,
                    do_constant_folding=False,  # it would fuse Conv+BN itself, unreported
                    opset_version=spec.opset,
                    keep_initializers_as_inputs=False,
                    training=torch.onnx.TrainingMode.PRESERVE,  # checked above: eval
                    **common,
                )
                return True
            else:
                return _dynamo_export(torch, module, args, exported, spec.opset, common)
        except Exception as exc:
            raise InvalidModelError(
                f"torch.onnx.export ({spec.exporter} exporter) failed: {_first_line(exc)}"
                + (
                    "; exporter='torchscript' (--exporter torchscript) is the legacy fallback"
                    if spec.exporter == "dynamo"
                    else ""
                )
            ) from None
        finally:
            # torch's warnings go to the log: the TorchScript exporter's deprecation as a warning
            level = (
                logging.WARNING
                if spec.exporter == "torchscript" and spec.announce
                else logging.DEBUG
            )
            for w in caught:
                logger.log(level, "torch.onnx.export: %s", _first_line(Exception(str(w.message))))


def _dynamo_export(
    torch: Any, module: Any, args: tuple, exported: Path, opset: int, common: dict[str, Any]
) -> bool:
    """torch.onnx.export(dynamo=True); False when the batch could not be exported dynamic."""
    opset_version = opset if opset >= 18 else None
    if opset_version is None:
        logger.info("opset %d is below the dynamo exporter's minimum (18): its default", opset)

    def run(keywords: dict[str, Any]) -> Any:
        return torch.onnx.export(
            module,
            tuple(args),
            dynamo=True,
            optimize=True,  # onnxscript's optimizer: constant folding, Conv+BN fusion (accounted)
            opset_version=opset_version,
            verbose=False,
            **keywords,
        )

    dynamic = common.get("dynamic_axes") is not None
    try:
        program = run(common)
    except Exception as exc:
        if not dynamic:
            raise
        logger.warning(
            "the dynamo exporter cannot export the batch dimension as dynamic (%s): exporting "
            "static shapes",
            _first_line(exc),
        )
        program = run({**common, "dynamic_axes": None})
        dynamic = False
    if program is None:  # pragma: no cover - torch returns the ONNXProgram with dynamo=True
        raise InvalidModelError("torch.onnx.export returned no program")
    program.save(str(exported))
    return dynamic


def _batch_fixed(exported: Path, names_in: list[str], samples: list[tuple]) -> bool:
    """Whether ONNX Runtime runs the (unfolded) export at the example batch but not at N+1: its
    batch axis is declared dynamic, yet the exporter fixed the size inside the graph."""
    from bnfold import _ort

    try:
        session = _ort.make_session(str(exported), level="disable")
    except InvalidModelError:
        return False  # no kernel, ...: the verification says so
    wanted = {i.name for i in session.get_inputs()}

    def runs(feeds: tuple) -> bool:
        arrays = {n: _to_numpy(a) for n, a in zip(names_in, feeds, strict=True) if n in wanted}
        try:
            _ort.run(session, arrays)
        except _ort.OrtRunError:
            return False
        return True

    return runs(samples[0]) and not runs(samples[1])


def _fold_export(
    exported: Path, opts: FoldOptions, module: Any, out_path: Path, timings: dict[str, float]
) -> tuple[FoldReport, Any]:
    """The ONNX fold pass on the export (in memory; verified against PyTorch afterwards)."""
    from bnfold.api import fold_with

    fold_opts = FoldOptions(
        verify=False,
        lower_remaining=opts.lower_remaining,
        duplicate_shared=opts.duplicate_shared,
        allow_slower_folds=opts.allow_slower_folds,
    )
    folded = fold_with(exported, None, fold_opts)
    report = folded.report
    timings.update(report.timings)
    report.input = f"{type(module).__name__} (torch.onnx.export)"
    report.output = str(out_path)
    report.strict = opts.strict
    report.accept_unverified = opts.accept_unverified
    if not opts.verify:
        report.unverified_note = "--no-verify"
    return report, folded.model


@dataclass
class _Check:
    """What verification compares against: the unfolded export and PyTorch's own outputs."""

    exported: Path
    input_names: list[str]
    samples: list[tuple]
    references: list[list[tuple[str, Any]]]


def _write_verified(
    ir_model: Any,
    report: FoldReport,
    out_path: Path,
    check: _Check,
    opts: FoldOptions,
    timings: dict[str, float],
) -> None:
    """Stage the folded model, verify it against PyTorch, commit it only when that passed."""
    from bnfold import io as _io

    use_external = (
        _io.needs_external_data(ir_model) if opts.external_data is None else opts.external_data
    )
    t2 = time.perf_counter()
    staged = _io.StagedOutput(out_path)
    try:
        staged.write(ir_model, external=use_external)
        timings["save"] = time.perf_counter() - t2
        if opts.verify:
            t3 = time.perf_counter()
            report.verification = _verify_onnx(
                staged.path,
                check.exported,
                check.input_names,
                check.samples,
                check.references,
                seed=opts.seed,
                atol=opts.atol,
                rtol=opts.rtol,
            )
            timings["verify"] = time.perf_counter() - t3
        from bnfold.api import _may_write

        if _may_write(report):
            staged.commit()
            report.written = True
    finally:
        if not staged.committed:
            staged.discard()


def _bench_export(
    exported: Path, out_path: Path, names_in: list[str], feeds: tuple, seed: int
) -> Any:
    """Time the unfolded export against the folded model, at the example inputs' shapes."""
    from bnfold.latency import bench as run_bench

    shapes = {n: tuple(int(d) for d in a.shape) for n, a in zip(names_in, feeds, strict=True)}
    return run_bench(
        [str(exported), str(out_path)],
        input_shapes=shapes,
        seed=seed,
        labels=["original", "folded"],
    )


def _verify_onnx(
    candidate: Path,
    exported: Path,
    input_names: list[str],
    samples: list[tuple],
    references: list[list[tuple[str, Any]]],
    *,
    seed: int,
    atol: float | None,
    rtol: float | None,
) -> VerificationResult:
    """Run the folded ONNX model under ORT on each sample and compare with PyTorch's outputs."""
    from bnfold import _ort
    from bnfold.compare import VerificationResult, _Accumulator, default_tolerances

    started = time.perf_counter()

    def result(**kw: Any) -> VerificationResult:
        kw.setdefault("passed", False)
        return VerificationResult(
            seed=seed, samples=len(samples), seconds=time.perf_counter() - started, **kw
        )

    try:
        session = _ort.make_session(str(candidate), level="disable")
    except InvalidModelError as error:
        try:  # does ONNX Runtime run the unfolded export? If not, it lacks a kernel: unverified
            _ort.make_session(str(exported), level="disable")
        except InvalidModelError as unfolded_error:
            return result(
                skipped_reason="ONNX Runtime cannot run the exported model either: "
                f"{_ort_reason(unfolded_error).replace(str(exported), 'exported.onnx')}"
            )
        return result(message=f"ONNX Runtime cannot run the folded model: {_ort_reason(error)}")
    wanted = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    shapes = {
        n: [int(d) for d in a.shape]
        for n, a in zip(input_names, samples[0], strict=True)
        if n in wanted
    }
    missing = [n for n in wanted if n not in input_names]
    if missing:
        return result(
            input_shapes=shapes,
            message=(
                f"the exported model has inputs {', '.join(map(repr, missing))} that are not the module's "
                f"arguments ({', '.join(map(repr, input_names))})"
            ),
        )
    if len(out_names) != len(references[0]):
        return result(
            input_shapes=shapes,
            message=(
                f"the exported model has {len(out_names)} outputs for the module's {len(references[0])}"
            ),
        )
    accumulators = []
    for name, (_, t) in zip(out_names, references[0], strict=True):
        d_atol, d_rtol = default_tolerances(_to_numpy(t.reshape(-1)[:1]).dtype)
        accumulators.append(
            _Accumulator(name, d_atol if atol is None else atol, d_rtol if rtol is None else rtol)
        )
    for k, (feeds, ref) in enumerate(zip(samples, references, strict=True)):
        arrays = {n: _to_numpy(a) for n, a in zip(input_names, feeds, strict=True) if n in wanted}
        try:
            produced = _ort.run(session, arrays)
        except _ort.OrtRunError as error:
            return result(
                input_shapes=shapes,
                message=f"ONNX Runtime cannot run the folded model: {_ort_reason(error)}",
            )
        for acc, (_, want), got in zip(accumulators, ref, produced, strict=True):
            acc.add(_to_numpy(want), np.asarray(got), sample=k)
    comparisons = tuple(a.finish() for a in accumulators)
    return result(
        passed=all(c.passed for c in comparisons), outputs=comparisons, input_shapes=shapes
    )


def _ort_reason(error: Exception) -> str:
    text = str(error)
    for prefix in (
        "ONNX Runtime cannot load the model: ",
        "ONNX Runtime failed to run the model: ",
    ):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text
