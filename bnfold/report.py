"""The FoldReport value: one decision per BatchNormalization, totals, verification and timings.

The report is plain data (dataclasses); :meth:`FoldReport.to_dict` is its JSON form (schema below,
``schema_version`` bumps on any incompatible change) and :func:`render` draws it with rich for people.

JSON schema, version 1::

    {
      "schema_version": 1, "bnfold_version": str,
      "input": str | null, "output": str | null,
      "written": bool,                     # false when verification failed: nothing at "output"
      "passed": bool,                      # verification did not fail (passed or was skipped) and --strict held
      "strict": bool,
      "totals": {"batchnorms": int, "folded": int, "kept": int},
      "batchnorms": [
        {"name": str, "graph": str, "status": "folded" | "kept",
         "direction": "backward" | "forward" | "decomposed" | "lowered" | null,
                                           # how it was folded (or, for "lowered", rewritten while kept)
         "target": str | null, "target_op": str | null,   # the node it was folded into
         "reason": str | null,             # a SkipReason value when kept
         "detail": str}
      ],
      "verification": null | VerificationResult.to_dict(),
      "bench": null | BenchResult.to_dict(),   # with fold --bench
      "timings": {"load": float, "fold": float, "save": float, "verify": float},   # seconds
      "nodes_before": int, "nodes_after": int
    }
"""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "SkipReason",
    "BNDecision",
    "FoldReport",
    "render",
]

from dataclasses import dataclass, field
from typing import Any

from .reasons import SkipReason

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BNDecision:
    """What happened to one BatchNormalization node."""

    name: str
    folded: bool
    detail: str
    graph: str = "main"
    # "backward": folded into its producer; "forward": into the node(s) that consume its output;
    # "decomposed": a BN lowered to Mul/Add/Sub/Div, folded into its producer; "lowered": kept, but
    # rewritten to Mul + Add (fold --lower-remaining).
    direction: str | None = None
    target: str | None = None  # name of the node folded into
    target_op: str | None = None
    reason: SkipReason | None = None

    @property
    def status(self) -> str:
        return "folded" if self.folded else "kept"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "graph": self.graph,
            "status": self.status,
            "direction": self.direction,
            "target": self.target,
            "target_op": self.target_op,
            "reason": self.reason.value if self.reason else None,
            "detail": self.detail,
        }


@dataclass
class FoldReport:
    """Everything ``bnfold fold`` did to one model. Truthy when it passed."""

    decisions: list[BNDecision] = field(default_factory=list)
    verification: Any = None  # bnfold.compare.VerificationResult | None
    timings: dict[str, float] = field(default_factory=dict)
    input: str | None = None
    output: str | None = None
    strict: bool = False
    nodes_before: int = 0
    nodes_after: int = 0
    written: bool = False  # the output file was written (it is not when verification fails)
    bench: Any = None  # bnfold.latency.BenchResult | None (fold --bench: original vs folded)

    @property
    def folded(self) -> list[BNDecision]:
        return [d for d in self.decisions if d.folded]

    @property
    def kept(self) -> list[BNDecision]:
        return [d for d in self.decisions if not d.folded]

    @property
    def verified(self) -> bool:
        """True when verification ran and passed; False when it failed, was skipped or did not run."""
        return self.verification is not None and bool(self.verification)

    @property
    def verification_failed(self) -> bool:
        """Verification ran and found a difference. A skipped verification (ONNX Runtime cannot
        run the original model, e.g. a custom-op domain) is not a failure; the report says so."""
        v = self.verification
        return v is not None and not bool(v) and not getattr(v, "skipped_reason", None)

    @property
    def passed(self) -> bool:
        """Verification did not fail, and under ``strict`` no BN was kept."""
        return not self.verification_failed and not (self.strict and self.kept)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "bnfold_version": __version__,
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "passed": self.passed,
            "strict": self.strict,
            "totals": {
                "batchnorms": len(self.decisions),
                "folded": len(self.folded),
                "kept": len(self.kept),
            },
            "batchnorms": [d.to_dict() for d in self.decisions],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "bench": self.bench.to_dict() if self.bench is not None else None,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def _fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"


def render(
    report: FoldReport, console: Any, *, verbose: bool = False, dry_run: bool = False
) -> None:
    """Draw the report on a rich Console: BN table, verification table, timings, PASSED/FAILED."""
    from rich.table import Table

    title = f"bnfold: {report.input or 'model'}"
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("BatchNormalization", overflow="fold")
    table.add_column("status")
    table.add_column("into / reason", overflow="fold")
    table.add_column("detail", overflow="fold")
    rows = report.decisions if verbose or len(report.decisions) <= 40 else None
    if rows is None:
        # Large models: list every kept BN, and summarise the folded ones by target op.
        rows = report.kept
    for d in rows:
        if d.folded:
            how = (
                f"[green]folded[/] ({d.direction})"
                if d.direction and d.direction != "backward"
                else "[green]folded[/]"
            )
            table.add_row(d.name, how, f"{d.target_op} {d.target}", d.detail)
        else:
            table.add_row(d.name, "[yellow]kept[/]", d.reason.value if d.reason else "", d.detail)
    if rows is not report.decisions and report.folded:
        by_op: dict[str, int] = {}
        for d in report.folded:
            by_op[d.target_op or "?"] = by_op.get(d.target_op or "?", 0) + 1
        summary = ", ".join(f"{n} into {op}" for op, n in sorted(by_op.items()))
        table.add_row(
            f"({len(report.folded)} more)",
            "[green]folded[/]",
            summary,
            "use --verbose to list each",
        )
    if report.decisions:
        console.print(table)
    else:
        console.print("No BatchNormalization nodes in the model.")
    console.print(
        f"BatchNormalization: {len(report.decisions)} found, {len(report.folded)} folded, "
        f"{len(report.kept)} kept. Nodes: {report.nodes_before} → {report.nodes_after}."
    )

    if dry_run:
        console.print(
            "Dry run: nothing written. 'bnfold fold' would do the above and verify the result."
        )
        return
    v = report.verification
    if v is not None:
        render_verification(v, console)
    else:
        console.print("Verification: not run (--no-verify).")
    if report.bench is not None:
        render_bench(report.bench, console)

    if report.timings:
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
        console.print(f"Time: {parts}")
    if report.output:
        if report.written:
            console.print(f"Wrote {report.output}")
        else:
            console.print(f"[red]Not written:[/] {report.output} (verification failed)")
    if report.passed:
        console.print("[bold green]PASSED[/]")
    else:
        why = []
        if report.verification_failed:
            why.append("verification failed")
        if report.strict and report.kept:
            why.append(f"--strict and {len(report.kept)} BatchNormalization kept")
        console.print(f"[bold red]FAILED[/] ({'; '.join(why)})")


def render_verification(v: Any, console: Any, *, title: str | None = None) -> None:
    """Per-output error table of a VerificationResult, or why it did not run."""
    from rich.table import Table

    if getattr(v, "skipped_reason", None):
        console.print(f"[yellow]Verification skipped:[/] {v.skipped_reason}")
        return
    if v.outputs:
        vt = Table(
            title=title or "Verification (ONNX Runtime, CPU, optimizations disabled)",
            title_justify="left",
        )
        for col in ("output", "dtype", "max abs", "max rel", "atol", "rtol", "result"):
            vt.add_column(col, overflow="fold")
        for o in v.outputs:
            vt.add_row(
                o.name,
                o.dtype,
                _fmt_err(o.max_abs_error),
                _fmt_err(o.max_rel_error),
                f"{o.atol:g}",
                f"{o.rtol:g}",
                "[green]pass[/]" if o.passed else f"[red]FAIL[/] {o.mismatched}/{o.elements}",
            )
        console.print(vt)
        for o in v.outputs:
            if o.nan_or_inf_mismatch:
                console.print(f"[red]{o.name}: {o.nan_or_inf_mismatch} NaN/Inf mismatches[/]")
            if getattr(o, "message", None):
                console.print(f"[red]{o.name}: {o.message}[/]")
            if not o.passed and o.nan_or_inf_mismatch == 0 and not getattr(o, "message", None):
                console.print(
                    f"{o.name}: worst element {list(o.worst_index or ())}; would pass with "
                    f"atol ≥ {o.min_atol_to_pass:.3g} (at rtol {o.rtol:g}) or rtol ≥ "
                    f"{o.min_rtol_to_pass:.3g} (at atol {o.atol:g})",
                    markup=False,
                )
    if getattr(v, "message", None):
        console.print(f"[red]{v.message}[/]")


def render_bench(result: Any, console: Any) -> None:
    """Latency table of a BenchResult, with ratios and their intervals."""
    from rich.table import Table

    t = Table(
        title=f"Latency, ms (ONNX Runtime {result.onnxruntime_version or ''}, {result.provider}, "
        f"{result.threads or 'default'} thread(s))",
        title_justify="left",
    )
    for col in (
        "level",
        "model",
        "median",
        "p90",
        "p99",
        "session",
        "vs baseline [95% CI]",
        "verdict",
    ):
        t.add_column(col, overflow="fold")
    ratios = {(r.model, r.level): r for r in result.ratios}
    for e in result.entries:
        s = e.stats
        r = ratios.get((e.model, e.level))
        if r is None:
            vs, verdict = "baseline", ""
        else:
            color = (
                "green"
                if r.significant and r.median_ratio < 1
                else ("red" if r.significant else "")
            )
            vs = f"{r.median_ratio:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"
            verdict = f"[{color}]{r.verdict}[/]" if color else r.verdict
        t.add_row(
            e.level,
            e.model,
            f"{s.median_ms:.3g}",
            f"{s.p90_ms:.3g}",
            f"{s.p99_ms:.3g}",
            f"{s.session_create_ms:.3g}",
            vs,
            verdict,
        )
    console.print(t)
    console.print(f"[dim]{result.note}[/]")


def verification_markdown(v: Any, reference: str, candidate: str, located: Any = None) -> str:
    """A Markdown summary of a verification (for CI job summaries)."""
    lines = [
        f"### bnfold verify: {'PASSED' if bool(v) or v.skipped_reason else 'FAILED'}",
        "",
        f"`{reference}` vs `{candidate}` (ONNX Runtime, optimizations disabled, seed {v.seed}, "
        f"{v.samples} sample(s))",
        "",
    ]
    if v.skipped_reason:
        lines.append(f"Verification skipped: {v.skipped_reason}")
    if v.outputs:
        lines += [
            "| output | dtype | max abs | max rel | atol | rtol | result |",
            "|---|---|--:|--:|--:|--:|---|",
        ]
        for o in v.outputs:
            lines.append(
                f"| {o.name} | {o.dtype} | {_fmt_err(o.max_abs_error)} | {_fmt_err(o.max_rel_error)} | "
                f"{o.atol:g} | {o.rtol:g} | {'pass' if o.passed else 'FAIL'} |"
            )
    if v.message:
        lines += ["", v.message]
    if located is not None:
        lines += ["", located.describe()]
    return "\n".join(lines)


def _reason_counts(kept: list[Any]) -> str:
    counts: dict[str, int] = {}
    for d in kept:
        key = d["reason"] if isinstance(d, dict) else (d.reason.value if d.reason else "?")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "-"


def _max_error(verification: dict[str, Any] | None) -> str:
    if not verification:
        return "not run"
    if verification.get("skipped_reason"):
        return "skipped"
    errs = [
        o["max_abs_error"]
        for o in verification.get("outputs", [])
        if o.get("max_abs_error") is not None
    ]
    return _fmt_err(max(errs)) if errs else "-"


def fold_markdown(reports: list[FoldReport]) -> str:
    """Markdown for CI job summaries: one row per model, then every kept BN with its reason."""
    return batch_markdown_rows([r.to_dict() for r in reports], title="bnfold fold")


def batch_markdown_rows(models: list[dict[str, Any]], *, title: str) -> str:
    ok = all(m.get("passed") for m in models)
    lines = [
        f"### {title}: {'PASSED' if ok else 'FAILED'}",
        "",
        "| model | BN | folded | kept (reasons) | max abs error | written | result |",
        "|---|--:|--:|---|--:|---|---|",
    ]
    kept_rows = []
    for m in models:
        if m.get("error"):
            lines.append(f"| {m.get('input')} | | | | | no | error: {m['error']} |")
            continue
        totals = m["totals"]
        kept = [b for b in m["batchnorms"] if b["status"] == "kept"]
        lines.append(
            f"| {m['input']} | {totals['batchnorms']} | {totals['folded']} | {_reason_counts(kept)} | "
            f"{_max_error(m.get('verification'))} | {'yes' if m.get('written') else 'no'} | "
            f"{'PASSED' if m['passed'] else 'FAILED'} |"
        )
        kept_rows += [
            f"| {m['input']} | {b['name']} | {b['reason']} | {b['detail']} |" for b in kept
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


def batch_markdown(result: Any) -> str:
    return batch_markdown_rows([i.to_dict() for i in result.items], title="bnfold fold")


def render_batch(result: Any, console: Any) -> None:
    """Summary table of a batch fold, then a final PASSED/FAILED line."""
    from rich.table import Table

    t = Table(
        title=f"bnfold fold: {len(result.items)} models, {result.jobs} job(s), {result.seconds:.1f}s",
        title_justify="left",
    )
    for col in ("model", "BN", "folded", "kept (reasons)", "max abs error", "output", "result"):
        t.add_column(col, overflow="fold")
    for item in result.items:
        if item.error is not None:
            t.add_row(item.input, "", "", "", "", "-", f"[red]error[/] {item.error}")
            continue
        m = item.report
        kept = [b for b in m["batchnorms"] if b["status"] == "kept"]
        status = "[green]PASSED[/]" if item.exit_code == 0 else "[red]FAILED[/]"
        t.add_row(
            item.input,
            str(m["totals"]["batchnorms"]),
            str(m["totals"]["folded"]),
            _reason_counts(kept),
            _max_error(m.get("verification")),
            m["output"] if m.get("written") else "not written",
            status,
        )
    console.print(t)
    console.print("[bold green]PASSED[/]" if result.passed else "[bold red]FAILED[/]")


def check_markdown(results: list[Any]) -> str:
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
        vtext = "-" if v is None else ("skipped" if v.skipped_reason else ("pass" if v else "FAIL"))
        lines.append(
            f"| {r.path} | {r.batchnorms} | {len(r.foldable)} | {len(r.allowed)} | {len(r.kept)} | {vtext} | "
            f"{'PASSED' if r.passed else ('error: ' + r.error if r.error else 'FAILED')} |"
        )
        rows += [f"| {r.path} | {d['name']} | {d['target_op']} {d['target']} |" for d in r.foldable]
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


def render_check(results: list[Any], console: Any) -> None:
    from rich.table import Table

    for r in results:
        if r.error:
            console.print(f"[red]{r.path}: error:[/] {r.error}")
            continue
        status = (
            "[green]nothing left to fold[/]"
            if not r.foldable
            else f"[red]{len(r.foldable)} foldable BatchNorm(s) left[/]"
        )
        console.print(
            f"{r.path}: {r.batchnorms} BatchNorm(s); {status}; {len(r.kept)} kept; {len(r.allowed)} allowed"
        )
        if r.foldable:
            t = Table(show_header=True)
            for col in ("BatchNormalization", "would fold into", "how"):
                t.add_column(col, overflow="fold")
            for d in r.foldable:
                t.add_row(d["name"], f"{d['target_op']} {d['target']}", d["detail"])
            console.print(t)
        if r.verification is not None:
            render_verification(r.verification, console, title=f"{r.path} against its original")
