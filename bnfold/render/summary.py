"""One-line summaries of bnfold's result types, for ``repr()`` in a REPL or a log, and their
Markdown for notebooks (``_repr_markdown_``).

``repr(result)`` reads like ``FoldResult: PASSED, 2/2 folded, max abs err 1.2e-07`` instead of a
dump of every field; the fields stay available as attributes and in ``to_dict()``. Model-controlled
strings (paths, names) pass through :func:`bnfold.render.text.inert`.
"""

from __future__ import annotations

from typing import Any

from .text import inert

_MAX = 160  # a summary never grows past this, whatever the model holds


def _err(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def _clip(text: str) -> str:
    text = inert(text)
    return text if len(text) <= _MAX else text[: _MAX - 1] + "…"


def verification(v: Any) -> str:
    """``passed, 1 output, max abs err 1.2e-07`` / ``FAILED, 1/2 outputs differ, ...`` /
    ``skipped (reason)``."""
    if v.skipped_reason:
        return f"skipped ({v.skipped_reason})"
    errs = [o.max_abs_error for o in v.outputs if o.max_abs_error is not None]
    worst = f", max abs err {_err(max(errs))}" if errs else ""
    n = len(v.outputs)
    if v.passed:
        return f"passed, {n} output{'s' if n != 1 else ''}{worst}"
    failed = sum(1 for o in v.outputs if not o.passed)
    why = f", {v.message}" if v.message else ""
    return f"FAILED, {failed}/{n} outputs differ{worst}{why}"


def fold_report(report: Any) -> str:
    """``PASSED, 2/2 folded, max abs err 1.2e-07`` (plus kept BNs, unverified, not written)."""
    n, folded = len(report.decisions), len(report.folded)
    v = report.verification
    if v is None and not report.output:
        word = "DRY RUN"  # bnfold.inspect / fold_model: nothing verified, nothing written
    else:
        word = {"passed": "PASSED", "failed": "FAILED"}.get(report.status, "UNVERIFIED")
        if word == "UNVERIFIED" and report.written:
            word = "WRITTEN UNVERIFIED"
    parts = [word, f"{folded}/{n} folded"]
    if v is None:
        parts.append("not verified")
    elif v.skipped_reason:
        parts.append("verification skipped")
    else:
        errs = [o.max_abs_error for o in v.outputs if o.max_abs_error is not None]
        if errs:
            parts.append(f"max abs err {_err(max(errs))}")
        if not v.passed:
            parts.append("verification failed")
    if report.output and not report.written:
        parts.append("not written")
    return ", ".join(parts)


def bench(result: Any) -> str:
    """``2 models x 2 levels; folded/original 0.91 [0.89, 0.93] at 'disable', ...``."""
    models = len(result.models) or len({e.model for e in result.entries})
    head = f"{models} models x {len(result.levels)} levels"
    ratios = [
        f"{r.model}/{r.baseline} {r.median_ratio:.3g} [{r.ci_low:.3g}, {r.ci_high:.3g}] "
        f"at {r.level!r}"
        for r in result.ratios
    ]
    return head + ("; " + ", ".join(ratios) if ratios else "")


def batch(result: Any) -> str:
    """``FAILED, 3 models: 2 passed, 0 failed, 1 error, 1.2s``."""
    errors = sum(1 for i in result.items if i.error is not None)
    passed = sum(1 for i in result.items if i.exit_code == 0)
    failed = len(result.items) - passed - errors
    return (
        f"{'PASSED' if result.passed else 'FAILED'}, {len(result.items)} models: {passed} passed, "
        f"{failed} failed, {errors} error{'s' if errors != 1 else ''}, {result.seconds:.1f}s"
    )


def localize(result: Any) -> str:
    return ("found: " if result.found else "none: ") + result.describe()


def one_line(kind: str, text: str) -> str:
    """``Kind: text``, inert and at most ~160 characters."""
    return f"{kind}: {_clip(text)}"


def fold_markdown(report: Any) -> str:
    from .markdown import fold_markdown as _fold_markdown

    return _fold_markdown([report])
