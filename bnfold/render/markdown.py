"""GitHub-flavoured Markdown for ``--markdown`` and ``$GITHUB_STEP_SUMMARY``.

Every model- or file-controlled string (paths, node/tensor names, error text) goes through
:func:`bnfold.render.text.md_inert`: it cannot break a table row (``|``, newlines), inject HTML
(``<img>``), links, code spans or emphasis, or carry terminal escapes.
"""

from __future__ import annotations

__all__ = [
    "batch_markdown",
    "batch_markdown_rows",
    "bench_markdown",
    "check_markdown",
    "fold_markdown",
    "verification_markdown",
]

import math
from typing import TYPE_CHECKING, Any

from bnfold._text import format_ms as _ms

from .console import _allowed, _fmt_margin, max_error, reason_counts, shapes_text
from .text import md_inert

if TYPE_CHECKING:
    from bnfold.batch import BatchResult, CheckResult
    from bnfold.compare import VerificationResult
    from bnfold.divergence import LocalizeResult
    from bnfold.latency import BenchResult
    from bnfold.report import FoldReport


def _fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def verification_markdown(
    v: VerificationResult,
    reference: str,
    candidate: str,
    located: LocalizeResult | None = None,
) -> str:
    """A Markdown summary of a verification (for CI job summaries)."""
    lines = [
        f"### bnfold verify: {v.status.upper()}",
        "",
        f"{md_inert(reference)} vs {md_inert(candidate)} (ONNX Runtime, optimizations disabled, "
        f"seed {v.seed}, {v.samples} sample(s))",
        "",
    ]
    if v.input_shapes:
        lines += [f"Inputs: {md_inert(shapes_text(v.input_shapes, v.input_shape_origins))}", ""]
    if v.skipped_reason:
        lines.append(f"Unverified: {md_inert(v.skipped_reason)}")
    if v.outputs:
        lines += [
            "| output | dtype | max abs | noise floor | allowed | margin | result |",
            "|---|---|--:|--:|---|--:|---|",
        ]
        for o in v.outputs:
            lines.append(
                _row(
                    [
                        md_inert(o.name),
                        md_inert(o.dtype),
                        _fmt_err(o.max_abs_error),
                        _fmt_err(o.noise),
                        md_inert(_allowed(o)),
                        _fmt_margin(o.margin),
                        "pass" if o.passed else "FAIL",
                    ]
                )
            )
    if v.message:
        lines += ["", md_inert(v.message, line_start=True)]
    if located is not None:
        lines += ["", md_inert(located.describe(), line_start=True)]
    return "\n".join(lines)


def fold_markdown(reports: list[FoldReport]) -> str:
    """Markdown for CI job summaries: one row per model, then every kept BN with its reason."""
    return batch_markdown_rows([r.to_dict() for r in reports], title="bnfold fold")


def batch_markdown(result: BatchResult) -> str:
    """:func:`fold_markdown` for a batch (errors included)."""
    return batch_markdown_rows([i.to_dict() for i in result.items], title="bnfold fold")


def batch_markdown_rows(models: list[dict[str, Any]], *, title: str) -> str:
    """The fold summary from reports in their JSON form (``FoldReport.to_dict``)."""
    ok = all(m.get("exit_code", 0 if m.get("passed") else 1) == 0 for m in models)
    lines = [
        f"### {title}: {'PASSED' if ok else 'FAILED'}",
        "",
        "| model | BN | folded | kept (reasons) | max abs error | written | result |",
        "|---|--:|--:|---|--:|---|---|",
    ]
    kept_rows = []
    for m in models:
        source = md_inert(m.get("input"))
        if m.get("error"):
            lines.append(_row([source, "", "", "", "", "no", f"error: {md_inert(m['error'])}"]))
            continue
        totals = m["totals"]
        kept = [b for b in m["batchnorms"] if b["status"] == "kept"]
        lines.append(
            _row(
                [
                    source,
                    str(totals["batchnorms"]),
                    str(totals["folded"]),
                    reason_counts(kept),  # SkipReason values: bnfold's own words
                    max_error(m.get("verification")),
                    "yes" if m.get("written") else "no",
                    _model_outcome(m),
                ]
            )
        )
        kept_rows += [
            _row([source, md_inert(b["name"]), str(b["reason"]), md_inert(b["detail"])])
            for b in kept
        ]
    if kept_rows:
        lines += [
            "",
            "Kept BatchNormalization nodes:",
            "",
            "| model | node | reason | detail |",
            "|---|---|---|---|",
        ]
        lines += kept_rows
    return "\n".join(lines)


def _model_outcome(m: dict[str, Any]) -> str:
    """PASSED, FAILED, UNVERIFIED (exit 4) or WRITTEN UNVERIFIED, from a report's JSON form."""
    code = m.get("exit_code", 0 if m.get("passed") else 1)
    if code == 4:
        return "UNVERIFIED"
    if code == 0:
        return "WRITTEN UNVERIFIED" if m.get("status") == "unverified" else "PASSED"
    return "FAILED"


def check_markdown(results: list[CheckResult]) -> str:
    """``bnfold check`` for CI job summaries: one row per model, then every foldable BN left."""
    ok = all(r.passed for r in results)
    lines = [
        f"### bnfold check: {'PASSED' if ok else 'FAILED'}",
        "",
        "| model | BN | foldable | allowed | kept | verification | result |",
        "|---|--:|--:|--:|--:|---|---|",
    ]
    rows = []
    for r in results:
        v = r.verification
        vtext = "-" if v is None else {"passed": "pass", "failed": "FAIL"}.get(v.status, v.status)
        outcome = "PASSED" if r.passed else ("error: " + md_inert(r.error) if r.error else "FAILED")
        path = md_inert(r.path)
        lines.append(
            _row(
                [
                    path,
                    str(r.batchnorms),
                    str(len(r.foldable)),
                    str(len(r.allowed)),
                    str(len(r.kept)),
                    vtext,
                    outcome,
                ]
            )
        )
        rows += [
            _row([path, md_inert(d["name"]), md_inert(f"{d['target_op']} {d['target']}")])
            for d in r.foldable
        ]
    if rows:
        lines += [
            "",
            "Foldable BatchNormalization nodes left:",
            "",
            "| model | node | would fold into |",
            "|---|---|---|",
        ]
        lines += rows
    return "\n".join(lines)


# --- bench -----------------------------------------------------------------------------------------


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def bench_markdown(result: BenchResult) -> str:
    """A GitHub-flavoured Markdown report of a bench (e.g. for ``$GITHUB_STEP_SUMMARY``):
    settings, one table row per model per level, then the note on optimization levels."""
    lines = [
        "### bnfold bench",
        "",
        _bench_settings(result),
        "",
        "| level | model | runs | median ms | p90 ms | p99 ms | min ms | mean ± std ms "
        "| session creation ms | first run ms | vs baseline | session creation vs baseline |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    ratios = {(r.model, r.level): r for r in result.ratios}
    for e in result.entries:
        s = e.stats
        r = ratios.get((e.model, e.level))
        if r is None:
            vs, create_vs = ("baseline", "") if e.model == result.baseline else ("", "")
        else:
            vs = f"{r.median_ratio:.3f}× ({r.ci_low:.3f}–{r.ci_high:.3f}) " + (
                f"**{r.verdict}**" if r.significant else r.verdict
            )
            create_vs = (
                f"{r.session_create_ratio:.2f}×" if math.isfinite(r.session_create_ratio) else "–"
            )
        lines.append(
            _row(
                [
                    md_inert(e.level),
                    md_inert(e.model),
                    str(s.n),
                    _ms(s.median_ms),
                    _ms(s.p90_ms),
                    _ms(s.p99_ms),
                    _ms(s.min_ms),
                    f"{_ms(s.mean_ms)} ± {_ms(s.std_ms)}",
                    _ms(s.session_create_ms),
                    _ms(s.first_run_ms),
                    vs,
                    create_vs,
                ]
            )
        )
    lines += ["", f"> {result.note}", ""]
    return "\n".join(lines)


def _bench_settings(result: BenchResult) -> str:
    threads = (
        "ONNX Runtime's default threads"
        if result.threads == 0
        else (f"{result.threads} intra-op thread{'s' if result.threads != 1 else ''}")
    )
    shapes = ", ".join(
        f"{md_inert(name)} [{', '.join(map(str, shape))}]"
        + (f" ({origin})" if (origin := result.input_shape_origins.get(name)) else "")
        for name, shape in result.input_shapes.items()
    )
    timed = (
        f"{result.runs} timed runs"
        if result.seconds_budget is None
        else f"{result.seconds_budget:g} s of timed runs per level"
        + (f" (at most {result.runs} per model)" if result.runs is not None else "")
    )
    counts = sorted({e.stats.sessions for e in result.entries}) or [1]
    sessions = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (
        f"onnxruntime {md_inert(result.onnxruntime_version or '?')}, {md_inert(result.provider)}, "
        f"{threads}; inputs {shapes or 'none'}; {result.warmup} warm-up runs and {timed} per "
        f"model per level, interleaved (ABBA), spread over {sessions} fresh session(s) per model "
        "(session creation and first run: medians over them). Ratios are median / baseline "
        f"median with a {_percent(result.confidence)} bootstrap interval; below 1 is faster."
    )
