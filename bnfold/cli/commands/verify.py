"""``bnfold verify``: does one model compute what another computes (and where does it diverge)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnfold.cli._shared import (
    check_model_path,
    console_for,
    parse_range,
    parse_tolerances,
    summary_env,
    write_json,
    write_markdown,
)
from bnfold.cli.options import (
    AcceptUnverifiedOpt,
    AtolOpt,
    DataOpt,
    DistOpt,
    InputShapeOpt,
    JsonOpt,
    LocalizeOpt,
    MarkdownOpt,
    QuietOpt,
    RangeOpt,
    RtolOpt,
    SamplesOpt,
    SeedOpt,
    TolOpt,
    VerifyTimeoutOpt,
)

EXIT_OK, EXIT_FAILED, EXIT_UNVERIFIED = 0, 1, 4


def verify(
    reference: Annotated[
        Path, typer.Argument(metavar="REFERENCE", help="The original model.", show_default=False)
    ],
    candidate: Annotated[
        Path,
        typer.Argument(
            metavar="CANDIDATE",
            help="The model that should compute the same function.",
            show_default=False,
        ),
    ],
    input_shape: InputShapeOpt = None,
    data: DataOpt = None,
    samples: SamplesOpt = 1,
    dist: DistOpt = "normal",
    value_range: RangeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    tol: TolOpt = None,
    seed: SeedOpt = 0,
    localize: LocalizeOpt = False,
    verify_timeout: VerifyTimeoutOpt = None,
    accept_unverified: AcceptUnverifiedOpt = False,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Check that CANDIDATE computes what REFERENCE computes, under ONNX Runtime with optimizations disabled.

    By default each output is judged against the reference's own measured numerical noise (ONNX Runtime's own Conv+BN fusion and one-ulp weight perturbations); --atol/--rtol/--tol judge element-wise instead. The input shapes used are printed.

    Exit codes: 0 every output matches; 1 some output differs or the candidate cannot run; 2 bad input or usage (also: no input size exercises the model, give --input-shape); 4 unverified: the reference cannot run under ONNX Runtime or --verify-timeout ran out (0 with --accept-unverified); 130/143 interrupted.
    """
    from bnfold.compare import load_input_data, parse_input_shapes, verify_models
    from bnfold.render.console import render_verification
    from bnfold.render.markdown import verification_markdown

    shapes = parse_input_shapes(input_shape or [])
    batches = load_input_data(data) if data else None
    for path in (reference, candidate):
        check_model_path(path)
    console = console_for(json_out == "-")
    result = verify_models(
        str(reference),
        str(candidate),
        input_shapes=shapes or None,
        seed=seed,
        atol=atol,
        rtol=rtol,
        output_tolerances=parse_tolerances(tol) or None,
        samples=samples,
        distribution=dist,
        value_range=parse_range(value_range),
        data=batches,
        timeout=verify_timeout,
    )
    located = None
    if localize and not result and not result.skipped_reason:
        from bnfold.divergence import localize as run_localize

        located = run_localize(
            str(reference),
            str(candidate),
            input_shapes={k: tuple(v) for k, v in result.input_shapes.items()} or None,
            seed=seed,
            atol=atol,
            rtol=rtol,
        )
    status = result.status
    exit_code = (
        EXIT_OK
        if status == "passed" or (status == "unverified" and accept_unverified)
        else (EXIT_UNVERIFIED if status == "unverified" else EXIT_FAILED)
    )
    if json_out:
        payload = {
            "schema_version": 1,
            "reference": str(reference),
            "candidate": str(candidate),
            **result.to_dict(),
            "exit_code": exit_code,
            "localize": located.to_dict() if located is not None else None,
        }
        write_json(payload, json_out)
    if markdown is not None or summary_env():
        write_markdown(
            verification_markdown(result, str(reference), str(candidate), located), markdown
        )
    if not quiet:
        render_verification(result, console, title=f"{reference} vs {candidate}")
        if located is not None:
            from bnfold.render.console import render_localize

            render_localize(located, console)
    elif status != "passed":
        from bnfold.render.console import failure_lines

        for line in failure_lines({"input": str(candidate), "verification": result.to_dict()}):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    from bnfold.render.console import verify_final_line

    console.print(
        verify_final_line(result, accept_unverified), markup=False, highlight=False, soft_wrap=True
    )
    raise typer.Exit(exit_code)
