"""Rich console rendering of fold, verify, bench, batch and check results.

Every model- or file-controlled string (paths, node/tensor names, error text) goes through
:mod:`bnfold.render.text` and reaches rich as a ``Text``, never as markup. When the console is not a
terminal (CI logs, pipes), tables are drawn at their natural width and printed as plain lines with
no trailing padding, so nothing wraps mid-word.
"""

from __future__ import annotations

__all__ = [
    "batch_progress_line",
    "check_failure_lines",
    "failure_lines",
    "make_console",
    "render",
    "render_batch",
    "render_bench",
    "render_check",
    "render_localize",
    "render_verification",
    "status_line",
    "fold_final_line",
    "verify_final_line",
    "shapes_text",
]

import io
from typing import TYPE_CHECKING, Any

from .text import inert, inert_text

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

    from bnfold.batch import BatchItem, BatchResult, CheckResult
    from bnfold.compare import VerificationResult
    from bnfold.divergence import LocalizeResult
    from bnfold.latency import BenchResult
    from bnfold.report import FoldReport

# Wide enough that no real table wraps when the output is not a terminal.
_PLAIN_WIDTH = 10_000


def make_console(*, stderr: bool = False) -> Console:
    """A console for bnfold's human output: on a terminal as rich draws it; otherwise plain,
    unwrapped lines (no colour, no control codes, no wrapping at 80 columns)."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, emoji=False)
    if not console.is_terminal:
        console = Console(
            stderr=stderr, highlight=False, emoji=False, width=_PLAIN_WIDTH, soft_wrap=True
        )
    return console


NO_BATCHNORM_HINT = (
    "No BatchNormalization in the model: nothing to fold.",
    "This is common for models exported from PyTorch: both torch.onnx exporters fold Conv+BN in "
    "eval mode by default (checked with torch 2.13: dynamo=False through do_constant_folding=True, "
    "dynamo=True as well), so the BNs are already gone.",
    "To see and check each BN, give bnfold the PyTorch model instead: 'bnfold fold model.pt2' "
    "(torch.export.save), or bnfold.torch.export(model, example_inputs, 'model.onnx') in Python.",
)


def _fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _styled(text: str, style: str) -> Text:
    from rich.text import Text

    return Text(text, style=style)


def _join(*parts: str | Text) -> Text:
    """Concatenate literal strings (never parsed as markup) and styled Texts."""
    from rich.text import Text

    out = Text()
    for part in parts:
        out.append(part)
    return out


def _table(title: str | Text | None, columns: Iterable[str], **kwargs: Any) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left", **kwargs)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _emit(console: Console, renderable: RenderableType) -> None:
    """Print a renderable; when the console is not a terminal, as plain unpadded lines at the
    renderable's natural width (a table never wraps a name mid-word)."""
    if console.is_terminal:
        console.print(renderable)
        return
    from rich.console import Console

    scratch = Console(
        file=io.StringIO(),
        width=_PLAIN_WIDTH,
        color_system=None,
        highlight=False,
        emoji=False,
        markup=False,
        force_terminal=False,
    )
    with scratch.capture() as captured:
        scratch.print(renderable)
    for line in captured.get().splitlines():
        _line(console, line.rstrip())


def _line(console: Console, text: str | Text) -> None:
    """One line of output; a plain ``str`` is printed literally (never as markup)."""
    console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


def status_line(passed: bool) -> Text:
    """The final ``PASSED``/``FAILED`` line that a CI log can grep."""
    return _styled("PASSED", "bold green") if passed else _styled("FAILED", "bold red")


def _unverified_line(
    reason: str, accepted: bool, strict: bool = False, written: bool = True
) -> Text:
    """``UNVERIFIED: <reason>; nothing written (...)`` or ``WRITTEN UNVERIFIED: <reason>``."""
    if accepted:
        head = "WRITTEN UNVERIFIED" if written else "UNVERIFIED (accepted)"
        return _join(_styled(f"{head}:", "bold yellow"), " ", inert_text(reason))
    why = "--strict refuses unverified output" if strict else "--accept-unverified writes it anyway"
    tail = (
        f"; nothing written ({why})" if written else f" ({why.replace('writes it', 'accepts it')})"
    )
    return _join(_styled("UNVERIFIED:", "bold yellow"), " ", inert_text(reason), tail)


def fold_final_line(report: FoldReport) -> Text:
    """The last line of a fold, one of ``PASSED``, ``FAILED (...)``, ``UNVERIFIED: <reason>;
    nothing written (--accept-unverified writes it anyway)``, ``WRITTEN UNVERIFIED: <reason>``
    (``--no-verify`` or ``--accept-unverified``): a CI log tells them apart with one grep."""
    status = report.status
    if status == "passed":
        return status_line(True)
    if status == "unverified":
        reason = report.unverified_reason or "not verified"
        return _unverified_line(
            reason, report.unverified_accepted, report.strict, written=report.output is not None
        )
    why = []
    if report.verification_failed:
        why.append("verification failed")
    if report.strict and report.kept:
        why.append(f"--strict and {len(report.kept)} BatchNormalization kept")
    return _join(status_line(False), f" ({'; '.join(why)})")


def verify_final_line(v: VerificationResult, accept_unverified: bool = False) -> Text:
    """``PASSED``, ``FAILED`` or ``UNVERIFIED: <reason> (...)`` for ``bnfold verify``."""
    if v.status == "unverified":
        return _unverified_line(v.skipped_reason or "", accept_unverified, written=False)
    return status_line(v.status == "passed")


def shapes_text(shapes: dict, origins: dict) -> str:
    """``x=[1,3,17,17] (derived), y=[4] (given)``: the input shapes a check or benchmark used."""
    return ", ".join(
        f"{inert(name)}=[{','.join(str(int(d)) for d in shape)}]"
        + (f" ({origins[name]})" if name in origins else "")
        for name, shape in shapes.items()
    )


# --- fold ------------------------------------------------------------------------------------------


def render(
    report: FoldReport, console: Console, *, verbose: bool = False, dry_run: bool = False
) -> None:
    """Draw the report on a rich Console: BN table, verification table, timings, PASSED/FAILED."""
    _render_decisions(report, console, verbose=verbose)
    affines = f" (and {len(report.affines)} other affine(s) folded)" if report.affines else ""
    _line(
        console,
        f"BatchNormalization: {len(report.batchnorms)} found, {len(report.folded)} folded, "
        f"{len(report.kept)} kept{affines}. Nodes: {report.nodes_before} → {report.nodes_after}.",
    )
    if dry_run:
        _line(
            console,
            "Dry run: nothing written. 'bnfold fold' would do the above and verify the result.",
        )
        return
    if report.verification is not None:
        render_verification(report.verification, console)
    else:
        _line(
            console, f"Verification: not run ({inert(report.unverified_reason or '--no-verify')})."
        )
    if report.bench is not None:
        render_bench(report.bench, console)
    if report.timings:
        _line(console, "Time: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
    if report.output:
        if report.written:
            _line(console, _join("Wrote ", inert_text(report.output)))
        else:
            _line(
                console,
                _join(
                    _styled("Not written:", "red" if report.verification_failed else "yellow"),
                    " ",
                    inert_text(report.output),
                    " (verification failed)"
                    if report.verification_failed
                    else " (unverified)"
                    if report.verification_status == "unverified"
                    else " (unchanged)",
                ),
            )
    _line(console, fold_final_line(report))


def _render_decisions(report: FoldReport, console: Console, *, verbose: bool) -> None:
    if not report.decisions:
        _line(console, _join("bnfold: ", inert_text(report.input or "model")))
        for line in NO_BATCHNORM_HINT:
            _line(console, line)
        return
    table = _table(
        _join("bnfold: ", inert_text(report.input or "model")),
        ("BatchNormalization", "status", "into / reason", "detail"),
        show_lines=False,
    )
    # Large models: list every kept BN, and summarise the folded ones by target op.
    rows = report.decisions if verbose or len(report.decisions) <= 40 else report.kept
    for d in rows:
        if d.folded:
            how = _styled(d.status.replace("_", " "), "green")
            if d.direction and d.direction != "backward":
                how = _join(how, f" ({d.direction})")
            if d.kind != "batchnorm":
                how = _join(how, f" [{d.kind}]")
            into = inert_text(f"{d.target_op} {d.target}")
            table.add_row(inert_text(d.name), how, into, inert_text(d.detail))
        else:
            reason = d.reason.value if d.reason else ""
            table.add_row(
                inert_text(d.name), _styled("kept", "yellow"), reason, inert_text(d.detail)
            )
    if rows is not report.decisions and report.folded:
        by_op: dict[str, int] = {}
        for d in report.folded:
            by_op[d.target_op or "?"] = by_op.get(d.target_op or "?", 0) + 1
        summary = ", ".join(f"{n} into {op}" for op, n in sorted(by_op.items()))
        table.add_row(
            f"({len(report.folded)} more)",
            _styled("folded", "green"),
            inert_text(summary),
            "use --verbose to list each",
        )
    _emit(console, table)


# --- verify ----------------------------------------------------------------------------------------


def render_verification(
    v: VerificationResult, console: Console, *, title: str | None = None
) -> None:
    """Per-output error table of a VerificationResult, or why it did not run.

    ``title`` may hold paths: it is shown as inert text. Per output: the fold's largest error, the
    reference's own measured noise floor, what is allowed, and the margin (allowed / error; the
    output passes when it is at least 1)."""
    if v.input_shapes:
        _line(console, "Inputs: " + shapes_text(v.input_shapes, v.input_shape_origins))
    if v.skipped_reason:
        _line(
            console,
            _join(_styled("Not verified:", "yellow"), " ", inert_text(v.skipped_reason)),
        )
        return
    if v.unchanged:
        _line(console, _join("Verification not needed: ", inert_text(v.unchanged)))
        return
    if v.outputs:
        vt = _table(
            inert_text(title)
            if title
            else "Verification (ONNX Runtime, CPU, optimizations disabled)",
            ("output", "dtype", "max abs", "noise floor", "allowed", "margin", "result"),
        )
        for o in v.outputs:
            result = (
                _styled("pass", "green")
                if o.passed
                else _join(_styled("FAIL", "red"), f" {o.mismatched}/{o.elements}")
            )
            vt.add_row(
                inert_text(o.name),
                inert_text(o.dtype),
                _fmt_err(o.max_abs_error),
                _fmt_err(o.noise),
                _allowed(o),
                _fmt_margin(o.margin),
                result,
            )
        _emit(console, vt)
        for o in v.outputs:
            name = inert(o.name)
            if o.nan_or_inf_mismatch:
                _line(
                    console, _styled(f"{name}: {o.nan_or_inf_mismatch} NaN/Inf mismatches", "red")
                )
            if o.message:
                _line(console, _styled(f"{name}: {inert(o.message)}", "red"))
            if not o.passed and o.nan_or_inf_mismatch == 0 and not o.message:
                hint = (
                    f"{name}: worst element {list(o.worst_index or ())}; would pass with "
                    f"atol ≥ {o.min_atol_to_pass:.3g} (at rtol {o.rtol:g}) or rtol ≥ "
                    f"{o.min_rtol_to_pass:.3g} (at atol {o.atol:g})"
                )
                if o.mode == "calibrated":
                    hint = (
                        f"{name}: worst element {list(o.worst_index or ())}; error "
                        f"{_fmt_err(o.max_abs_error)} is {_fmt_err(1 / o.margin if o.margin else None)}x "
                        f"what the model's own noise allows (--atol/--rtol/--tol judge element-wise)"
                    )
                _line(console, hint)
    if v.message:
        _line(console, _styled(inert(v.message), "red"))


def _fmt_margin(margin: float | None) -> str:
    if margin is None:
        return "-"
    if margin == float("inf"):
        return "exact"
    return f"{margin:.3g}x"


def _allowed(o: Any) -> str:
    """What the output was allowed: the calibrated threshold, the user's tolerance, or exact."""
    if o.mode == "calibrated":
        return f"≤ {o.atol:.3g}"
    if o.mode == "exact" or (o.atol == 0 and o.rtol == 0):
        return "exact"
    return f"atol {o.atol:g} + rtol {o.rtol:g}·|ref|"


def render_localize(located: LocalizeResult, console: Console) -> None:
    """Where two models first diverge (``verify --localize``), or why no divergence was found."""
    _line(console, _styled(inert(located.describe()), "red" if located else ""))
    d = located.divergence
    if d is not None and d.candidate_chain:
        chain = " → ".join(str(p) for p in d.candidate_chain)
        _line(console, f"  candidate nodes since the last matching tensor: {inert(chain)}")


# --- bench -----------------------------------------------------------------------------------------


def render_bench(result: BenchResult, console: Console) -> None:
    """Latency table of a BenchResult, with ratios and their intervals."""
    t = _table(
        f"Latency, ms (ONNX Runtime {result.onnxruntime_version or ''}, "
        f"{inert(result.provider)}, {result.threads or 'default'} thread(s))",
        ("level", "model", "median", "p90", "p99", "session", "vs baseline [95% CI]", "verdict"),
    )
    ratios = {(r.model, r.level): r for r in result.ratios}
    for e in result.entries:
        s = e.stats
        r = ratios.get((e.model, e.level))
        if r is None:
            vs, verdict = "baseline", _styled("", "")
        else:
            color = (
                "green"
                if r.significant and r.median_ratio < 1
                else ("red" if r.significant else "")
            )
            vs = f"{r.median_ratio:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"
            verdict = _styled(r.verdict, color)
        t.add_row(
            inert_text(e.level),
            inert_text(e.model),
            f"{s.median_ms:.3g}",
            f"{s.p90_ms:.3g}",
            f"{s.p99_ms:.3g}",
            f"{s.session_create_ms:.3g}",
            vs,
            verdict,
        )
    _emit(console, t)
    if result.input_shapes:
        _line(
            console,
            "Inputs: "
            + shapes_text(dict(result.input_shapes), dict(result.input_shape_origins or {})),
        )
    _line(console, _styled(result.note, "dim"))


# --- batch and check -------------------------------------------------------------------------------


def reason_counts(kept: list[Any]) -> str:
    """``"2 shape_mismatch, 1 training_mode"`` for kept BNs (decisions or their JSON dicts)."""
    counts: dict[str, int] = {}
    for d in kept:
        key = d["reason"] if isinstance(d, dict) else (d.reason.value if d.reason else "?")
        counts[str(key)] = counts.get(str(key), 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "-"


def max_error(verification: dict[str, Any] | None) -> str:
    """The largest max-abs error of a verification's JSON form, or why there is none."""
    if not verification:
        return "not run"
    if verification.get("skipped_reason"):
        return "unverified"
    errs = [
        o["max_abs_error"]
        for o in verification.get("outputs", [])
        if o.get("max_abs_error") is not None
    ]
    return _fmt_err(max(errs)) if errs else "-"


def batch_progress_line(item: BatchItem, done: int, total: int) -> str:
    """One plain log line per finished model of a batch (when the output is not a terminal); the
    path and error are inert, so the line cannot start a workflow command or hold escapes."""
    line = f"[{done}/{total}] {inert(item.input)}: {item.status}"
    return line + (f" ({inert(item.error)})" if item.error else "")


def failure_lines(report: dict[str, Any], error: str | None = None) -> list[str]:
    """Why one model failed, one plain line per cause (for ``-q``, which drops the tables but
    never the reasons). ``report`` is a FoldReport's JSON form (or ``{"input": ...}`` with
    ``error``); every model-controlled string is inert."""
    where = inert(report.get("input") or "model")
    if error is not None:
        text = inert(error)
        return [text if text.startswith(where) else f"{where}: error: {text}"]
    lines = []
    v = report.get("verification") or {}
    if v and not v.get("passed") and not v.get("skipped_reason"):
        for o in v.get("outputs", []):
            if o.get("passed"):
                continue
            why = o.get("message") or (
                f"max abs error {_fmt_err(o.get('max_abs_error'))}, "
                f"{o.get('mismatched')} element(s) outside atol {o['atol']:g} + rtol {o['rtol']:g}·|ref|"
            )
            lines.append(f"{where}: verification failed: {inert(o['name'])}: {inert(why)}")
        if v.get("message"):
            lines.append(f"{where}: verification failed: {inert(v['message'])}")
        if not lines:
            lines.append(f"{where}: verification failed")
    if report.get("strict"):
        for b in report.get("batchnorms", []):
            if b["status"] == "kept":
                lines.append(
                    f"{where}: --strict: BatchNormalization {inert(b['name'])} kept "
                    f"({b['reason']}: {inert(b['detail'])})"
                )
    return lines


def check_failure_lines(results: list[CheckResult], allow: int = 0) -> list[str]:
    """``bnfold check -q``: one line per model that fails the gate, with why and the fix."""
    lines = []
    for r in results:
        if r.exit_code == 0:
            continue
        where = inert(r.path)
        if r.error:
            text = inert(r.error)
            lines.append(text if text.startswith(where) else f"{where}: error: {text}")
            continue
        if len(r.foldable) > allow:
            names = ", ".join(inert(d["name"]) for d in r.foldable[:5])
            more = f" and {len(r.foldable) - 5} more" if len(r.foldable) > 5 else ""
            lines.append(
                f"{where}: {len(r.foldable)} foldable BatchNorm(s) left ({names}{more}); "
                f"to fix: bnfold fold --in-place {where}"
            )
        if r.verification is not None:
            lines += failure_lines({"input": r.path, "verification": r.verification.to_dict()})
    return lines


def render_batch(result: BatchResult, console: Console) -> None:
    """Summary table of a batch fold, then a final PASSED/FAILED line."""
    t = _table(
        f"bnfold fold: {len(result.items)} models, {result.jobs} job(s), {result.seconds:.1f}s",
        ("model", "BN", "folded", "kept (reasons)", "max abs error", "output", "result"),
    )
    errors = []
    for item in result.items:
        if item.error is not None or item.report is None:
            # The error is printed in full below the table: a table cell would wrap it over lines.
            errors.append(item)
            t.add_row(inert_text(item.input), "", "", "", "", "-", _styled("error", "red"))
            continue
        m = item.report
        kept = [b for b in m["batchnorms"] if b["status"] == "kept"]
        t.add_row(
            inert_text(item.input),
            str(m["totals"]["batchnorms"]),
            str(m["totals"]["folded"]),
            reason_counts(kept),
            max_error(m.get("verification")),
            inert_text(m["output"]) if m.get("written") else "not written",
            _styled(
                item.status,
                "green"
                if item.status == "PASSED"
                else ("yellow" if "UNVERIFIED" in item.status else "red"),
            ),
        )
    _emit(console, t)
    for item in errors:
        for line in failure_lines(item.report or {"input": item.input}, item.error or "failed"):
            _line(console, _styled(line, "red"))
    if result.exit_code == 4:
        n = sum(1 for i in result.items if i.exit_code == 4)
        _line(
            console,
            _join(
                _styled("UNVERIFIED:", "bold yellow"),
                f" {n} model(s) could not be verified; nothing written for them "
                "(--accept-unverified writes them anyway)",
            ),
        )
    else:
        _line(console, status_line(result.passed))


def render_check(results: list[CheckResult], console: Console) -> None:
    """Per model: how many BatchNorms are left to fold (each with where), and its verification."""
    for r in results:
        path = inert_text(r.path)
        if r.error:
            _line(
                console, _join(_styled(f"{inert(r.path)}: error:", "red"), " ", inert_text(r.error))
            )
            continue
        status = (
            _styled("nothing left to fold", "green")
            if not r.foldable
            else _styled(f"{len(r.foldable)} foldable BatchNorm(s) left", "red")
        )
        tail = f"; {len(r.kept)} kept (bnfold cannot fold them)" if r.kept else ""
        if r.allowed:
            tail += f"; {len(r.allowed)} left on purpose (--allow-node)"
        _line(console, _join(path, f": {r.batchnorms} BatchNorm(s); ", status, tail))
        if r.foldable:
            t = _table(None, ("BatchNormalization", "would fold into", "how"), show_header=True)
            for d in r.foldable:
                t.add_row(
                    inert_text(d["name"]),
                    inert_text(f"{d['target_op']} {d['target']}"),
                    inert_text(d["detail"]),
                )
            _emit(console, t)
            _line(
                console,
                f"  to fix: bnfold fold --in-place {inert(r.path)}  (folds and verifies, then "
                "replaces the file; in pre-commit: the bnfold-fold hook)",
            )
        if r.verification is not None:
            render_verification(r.verification, console, title=f"{r.path} against its original")
