"""``bnfold.torch.fold_module``: fold BatchNorm in an eager ``nn.Module`` with torch.fx.

How ``fold_module`` finds "a BatchNorm that follows a Conv"
------------------------------------------------------------
By dataflow, not by module order. The forward of the (deep-copied) module is traced with torch.fx;
in the graph, a ``call_module`` of a BatchNorm whose only input is the output of a ``call_module``
of a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear, with that output used by nothing else, is a
fold candidate. torch.nn layers (and subclasses of BatchNorm/Conv/Linear) are leaves of the trace,
and so is any module with forward hooks, which is then traced on its own so that its hooks keep
seeing what they saw. Forward arguments that default to None are traced as None: the trace follows
the path ``model(x)`` takes.

When the whole forward cannot be traced (data-dependent control flow, ...), its children are
traced one by one, recursively. A BatchNorm called directly by the untraceable code is kept with
``not_traceable``. The untraceable code may also call layers inside the traced children directly,
so their BNs are folded only when ``example_inputs`` are given and the real call counts match the
traced ones (otherwise: ``not_traceable``, or ``module_reused`` when the counts differ). A
BatchNorm module that no traced graph calls is kept with ``not_called``.

How a fold is applied
---------------------
* **In place** (the module keeps its class and its state_dict keys, minus the BN's): when the
  producer and the BN are each called exactly once in all traced graphs (and, with
  ``example_inputs``, as often at run time) and no traced code reads the producer's weight or
  bias directly. The producer gets *new* Parameters (a weight shared with another module is never
  changed in place: the other module keeps the original), and the BN is replaced by
  ``nn.Identity`` wherever it appears in the module tree.
* **At the call site** (``rewrite=True``, the default): otherwise (a Conv called twice, once
  followed by the BN and once not; a BN shared by two Convs; a weight also read functionally),
  when the root's forward is traceable, its graph is rewritten so that this one call uses a
  folded private copy of the producer, and the result is that ``torch.fx.GraphModule`` (with the
  root's children, parameters and attributes). The other calls are untouched. With
  ``rewrite=False``, inside an untraceable root, or with hooks on the root, such BNs are kept with
  ``module_reused``.

The formulas are :mod:`bnfold.numerics` (float64 inside, one rounding to the parameter's dtype:
float16, bfloat16, float32, float64). A Linear weight is ``[out, in]``: its rows scale. A
Linear → BatchNorm1d pair folds only when the Linear's output is known to be 2-D ``[N, C]``
(from ``example_inputs``, or from the graph: a ``flatten``/``view`` to 2-D before it); on a
``[N, L, C]`` output BatchNorm1d normalises ``L``, not the Linear's features (``unknown_layout``
/ ``unsupported_layout``).

Limits: torch.fx sees one path through ``forward``: branches on Python values are taken as they
are when tracing. A Conv used without its BN only on a path the trace did not take is not seen.
Pass ``example_inputs``: bnfold then also counts the real calls and compares the folded module's
outputs with the original's (``report.verification``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnfold.errors import UsageError
from bnfold.options import FoldOptions
from bnfold.report import BNDecision, FoldReport

from ._common import (
    _as_args,
    _check_module_state,
    _first_line,
    _flatten_outputs,
    _import_torch,
    _is_exported,
    _seeded_like,
    _shapes_text,
    _to_numpy,
    warnings_to_log,
)
from ._folder import _fold_scopes
from ._scopes import _count_layers, _discover, _Run
from .bn_like import Recognizer

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.compare import VerificationResult


@dataclass
class ModuleFoldResult:
    """What :func:`fold_module` returns: the folded module (a new object; the input is untouched)
    and the report. Truthy when it passed (verification, if run, passed; under ``strict`` nothing
    was kept)."""

    module: Any
    report: FoldReport

    @property
    def decisions(self) -> list[BNDecision]:
        return self.report.decisions

    @property
    def verification(self) -> VerificationResult | None:
        return self.report.verification

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"`` or ``"unverified"`` (no ``example_inputs``, or ``verify=False``:
        the result is then falsy, never presented as verified)."""
        return self.report.status

    def __bool__(self) -> bool:
        return self.report.passed

    def __repr__(self) -> str:
        from bnfold.render import summary

        return summary.one_line("ModuleFoldResult", summary.fold_report(self.report))

    def _repr_markdown_(self) -> str:
        return self.report.to_markdown()


@warnings_to_log
def fold_module(
    module: Any,
    example_inputs: Any = None,
    *,
    rewrite: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    strict: bool = False,
    verify: bool = True,
    options: FoldOptions | None = None,
    bn_like: Mapping[type, Callable[[Any], tuple[Any, Any]]] | None = None,
) -> ModuleFoldResult:
    """Fold every eval-mode BatchNorm that follows a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear.

    Args:
        module: an eval-mode ``torch.nn.Module``. It is deep-copied first and never modified.
        example_inputs: optional positional arguments of ``forward`` (a tensor or a tuple). When
            given, the original and the folded module run on seeded inputs of the same shapes and
            dtypes (floating tensors are replaced by seeded normal values; other arguments are
            used as given) and every output is compared (``report.verification``); the run also
            tells bnfold how often each layer is really called and the rank of each BN's input
            (needed to fold Linear → BatchNorm1d when the graph does not show it).
        rewrite: fold a BN whose producer is also used elsewhere (a Conv called twice...) into a
            private copy used at that call site only; the result is then the root's rewritten
            ``torch.fx.GraphModule`` (only a root whose forward torch.fx can trace is rewritten).
            When False such BNs are kept (``module_reused``) and the module keeps its class.
        atol, rtol: override the per-dtype tolerances of the verification.
        seed: seed of the verification inputs.
        strict: the result fails when any BatchNorm is kept.
        verify: with ``example_inputs``, compare the folded module's outputs with the original's
            (the run that counts the calls happens either way).
        options: ``verify``, ``atol``, ``rtol``, ``seed`` and ``strict`` as one
            :class:`~bnfold.options.FoldOptions`; its ONNX-only options (``lower_remaining``,
            ``duplicate_shared``, ``external_data``, ``bench``, ``input_shapes``, ``opset``,
            ``trust_pickle``) are refused: the result is a module, not an ONNX file.
        bn_like: more BatchNorm-like classes for this call, ``{cls: affine_fn}``, where
            ``affine_fn(module)`` returns the per-channel ``(scale, shift)`` of the module's
            forward ``x * scale + shift`` (axis 1); see :func:`bnfold.torch.register_bn_like`.

    Returns:
        A :class:`ModuleFoldResult` (``.module``, ``.report``, ``.decisions``); one decision per
        BatchNorm call site (per module when it is not called in any traced graph).

    Raises:
        TrainingModeError: the module (or a BatchNorm in it) is in training mode.
        NoRunningStatsError: a BatchNorm was built with ``track_running_stats=False``.
        UsageError: not an eager ``nn.Module``, bad ``example_inputs``, or the module fails to run.
    """
    opts = _module_options(options, verify=verify, atol=atol, rtol=rtol, seed=seed, strict=strict)
    _check_foldable(module)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        work = copy.deepcopy(module)
    except Exception as exc:
        raise UsageError(
            f"cannot copy the module ({_first_line(exc)}); bnfold never modifies the original"
        ) from None
    nodes_before = _count_layers(work)
    args = _as_args(example_inputs) if example_inputs is not None else None
    feeds = _seeded_like(args, opts.seed) if args is not None else None
    recognizer = Recognizer(bn_like)
    run, reference = _counted_run(work, feeds, recognizer)
    timings["run"] = time.perf_counter() - t0

    decisions, result_module = _trace_and_fold(work, run, rewrite, timings, recognizer)

    report = FoldReport(
        decisions=decisions,
        input=f"{type(module).__name__} (torch.nn.Module)",
        strict=opts.strict,
        nodes_before=nodes_before,
        unverified_note=(
            "no example_inputs: the folded module was not run, so it is unverified"
            if feeds is None
            else (None if opts.verify else "verify=False")
        ),
        nodes_after=_count_layers(result_module),
    )
    if feeds is not None and opts.verify:
        t3 = time.perf_counter()
        report.verification = _verify_module(
            result_module, feeds, reference, seed=opts.seed, atol=opts.atol, rtol=opts.rtol
        )
        timings["verify"] = time.perf_counter() - t3
    report.timings = timings
    return ModuleFoldResult(module=result_module, report=report)


def _module_options(options: FoldOptions | None, **keywords: Any) -> FoldOptions:
    """The options that apply to a module; the ONNX-only ones are refused, not ignored."""
    opts = FoldOptions.from_keywords(options, **keywords)
    opts.refuse(
        ("lower_remaining", "duplicate_shared", "external_data", "bench", "input_shapes", "opset")
        + ("trust_pickle", "allow_slower_folds", "exporter"),
        "bnfold.torch.fold_module",
        "it folds the module itself and writes no ONNX file; use bnfold.torch.export for those",
    )
    return opts


def _trace_and_fold(
    work: Any,
    run: _Run | None,
    rewrite: bool,
    timings: dict[str, float],
    recognizer: Recognizer,
) -> tuple[list[BNDecision], Any]:
    """Trace what torch.fx can trace, then decide and apply every fold."""
    t1 = time.perf_counter()
    paths = {id(m): name for name, m in work.named_modules()}
    scopes = _discover(work, paths, recognizer.is_site)
    timings["trace"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    decisions, result_module = _fold_scopes(
        work, scopes, paths, run, rewrite=rewrite, recognizer=recognizer
    )
    timings["fold"] = time.perf_counter() - t2
    return decisions, result_module


def _check_foldable(module: Any) -> None:
    """Refuse what is not an eager, eval-mode ``nn.Module`` with running statistics."""
    torch = _import_torch()
    from torch import nn

    if isinstance(module, torch.jit.ScriptModule):
        raise UsageError(
            "fold_module needs an eager nn.Module, not TorchScript; use bnfold.torch.export (or "
            "`bnfold fold model.pt`) to fold it through ONNX"
        )
    if _is_exported(module):
        raise UsageError(
            "an ExportedProgram holds no BatchNorm modules (they are aten ops now); fold it through "
            "ONNX: bnfold.torch.export(program, example_inputs, 'folded.onnx') or `bnfold fold model.pt2`"
        )
    if not isinstance(module, nn.Module):
        raise UsageError(f"fold_module takes a torch.nn.Module, got {type(module).__name__}")
    _check_module_state(module)


def _counted_run(
    work: Any, feeds: tuple | None, recognizer: Recognizer
) -> tuple[_Run | None, list[tuple[str, Any]] | None]:
    """Run the (copied) module once on ``feeds``, counting each layer's calls; its outputs are
    the reference of the verification. Nothing to do without example inputs."""
    if feeds is None:
        return None, None
    torch = _import_torch()
    run = _Run(work, recognizer.is_site)
    try:
        with torch.no_grad():
            reference = _flatten_outputs(work(*feeds))
    except Exception as exc:
        raise UsageError(
            f"the module failed to run on inputs shaped like example_inputs ({_shapes_text(feeds)}): "
            f"{_first_line(exc)}"
        ) from None
    finally:
        run.remove()
    return run, reference


def _verify_module(
    module: Any,
    feeds: tuple,
    reference: list[tuple[str, Any]],
    *,
    seed: int,
    atol: float | None,
    rtol: float | None,
) -> VerificationResult:
    """Run the folded module on ``feeds`` and compare with the original's outputs."""
    torch = _import_torch()
    from bnfold.compare import VerificationResult, compare_outputs

    started = time.perf_counter()
    shapes = {
        f"input_{i}": [int(d) for d in a.shape] for i, a in enumerate(feeds) if hasattr(a, "shape")
    }
    try:
        with torch.no_grad():
            produced = _flatten_outputs(module(*feeds))
    except Exception as exc:
        return VerificationResult(
            passed=False,
            seed=seed,
            input_shapes=shapes,
            seconds=time.perf_counter() - started,
            message=f"the folded module fails to run: {_first_line(exc)}",
        )
    if not reference:
        return VerificationResult(
            passed=False,
            seed=seed,
            input_shapes=shapes,
            seconds=time.perf_counter() - started,
            skipped_reason="the forward returns no tensors to compare",
        )
    if [n for n, _ in produced] != [n for n, _ in reference]:
        return VerificationResult(
            passed=False,
            seed=seed,
            input_shapes=shapes,
            seconds=time.perf_counter() - started,
            message="the folded module's outputs differ in structure from the original's",
        )
    outputs = tuple(
        compare_outputs(name, _to_numpy(ref), _to_numpy(got), atol=atol, rtol=rtol)
        for (name, ref), (_, got) in zip(reference, produced, strict=True)
    )
    return VerificationResult(
        passed=all(o.passed for o in outputs),
        outputs=outputs,
        seed=seed,
        input_shapes=shapes,
        seconds=time.perf_counter() - started,
    )
