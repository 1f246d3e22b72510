"""``bnfold check``: the read-only gate (fail while a foldable BatchNorm remains)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnfold.cli._shared import (
    check_model_path,
    console_for,
    summary_env,
    write_json,
    write_markdown,
)
from bnfold.cli.options import (
    AcceptUnverifiedOpt,
    AgainstOpt,
    AllowNodeOpt,
    AllowOpt,
    AtolOpt,
    InputShapeOpt,
    JsonOpt,
    MarkdownOpt,
    QuietOpt,
    RtolOpt,
    SeedOpt,
    TrustPickleOpt,
    VerifyTimeoutOpt,
)


def check(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL...",
            help="ONNX model(s) to check: files, directories or glob patterns.",
            show_default=False,
        ),
    ],
    allow: AllowOpt = 0,
    allow_node: AllowNodeOpt = None,
    against: AgainstOpt = None,
    input_shape: InputShapeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    trust_pickle: TrustPickleOpt = False,
    verify_timeout: VerifyTimeoutOpt = None,
    accept_unverified: AcceptUnverifiedOpt = False,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Read-only gate: fail when a model still holds a BatchNormalization that bnfold could fold.

    Nothing is written and no ONNX Runtime session is created unless --against is given. Each foldable BN is named with where it would fold.

    Exit codes: 0 nothing left to fold (within --allow / --allow-node) and, with --against, outputs match; 1 otherwise; 2 bad input or usage; 4 --against could not verify (the original does not run under ONNX Runtime, or --verify-timeout ran out; 0 with --accept-unverified).
    """
    from bnfold.batch import check_model, expand_inputs
    from bnfold.compare import parse_input_shapes
    from bnfold.errors import BnfoldError, UsageError

    shapes = parse_input_shapes(input_shape or [])
    inputs = expand_inputs(models)
    if not inputs:
        raise UsageError("no ONNX model found in " + ", ".join(str(m) for m in models))
    if against is not None and len(inputs) != 1:
        raise UsageError("--against compares one model with its original; give exactly one model")
    if against is not None:
        check_model_path(against)
    verify_options = dict(
        input_shapes=shapes or None, seed=seed, atol=atol, rtol=rtol, timeout=verify_timeout
    )
    console = console_for(json_out == "-")
    results = [
        check_model(
            path,
            allow=allow,
            allow_nodes=allow_node or (),
            against=against,
            verify_options=verify_options,
            input_shapes=shapes or None,
            trust_pickle=trust_pickle,
            accept_unverified=accept_unverified,
        )
        for path, _ in inputs
    ]
    if len(results) == 1 and results[0].error and results[0].exit_code == 2:
        raise BnfoldError(results[0].error)
    _show(results, allow, console, json_out, markdown, quiet)


def _show(results: list, allow: int, console, json_out, markdown, quiet: bool) -> None:  # noqa: ANN001
    """--json, --markdown, the table and the PASSED/FAILED line; exit with the worst code."""
    from bnfold.render.console import render_check
    from bnfold.render.markdown import check_markdown
    from bnfold.render.text import inert
    from bnfold.report import SCHEMA_VERSION, worst_exit_code

    exit_code = worst_exit_code([r.exit_code for r in results])
    if json_out:
        write_json(
            {
                "schema_version": SCHEMA_VERSION,
                "passed": exit_code == 0,
                "exit_code": exit_code,
                "allow": allow,
                "models": [r.to_dict() for r in results],
            },
            json_out,
        )
    if markdown is not None or summary_env():
        write_markdown(check_markdown(results), markdown)
    if not quiet:
        render_check(results, console)
    else:
        from bnfold.render.console import check_failure_lines

        for line in check_failure_lines(results, allow):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if exit_code == 4:
        reasons = [r.verification.skipped_reason for r in results if r.exit_code == 4]
        line = f"UNVERIFIED: {inert(reasons[0] or '')} (--accept-unverified accepts it anyway)"
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[bold green]PASSED[/]" if exit_code == 0 else "[bold red]FAILED[/]")
    raise typer.Exit(exit_code)
