"""``bnfold inspect``: the dry run (what ``bnfold fold`` would do to each BatchNorm, and why)."""

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
from bnfold.cli.options import InputShapeOpt, JsonOpt, MarkdownOpt, TrustPickleOpt

EXIT_OK = 0


def inspect(
    model: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL",
            help="The model to inspect: ONNX, or a PyTorch .pt2/TorchScript/pickled module "
            "(exported as 'bnfold fold' exports it).",
            show_default=False,
        ),
    ],
    lower_remaining: Annotated[
        bool, typer.Option("--lower-remaining", help="As in 'bnfold fold'.")
    ] = False,
    duplicate_shared: Annotated[
        bool, typer.Option("--duplicate-shared", help="As in 'bnfold fold'.")
    ] = False,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    allow_slower_folds: Annotated[
        bool, typer.Option("--allow-slower-folds", help="As in 'bnfold fold'.")
    ] = False,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
) -> None:
    """Dry run: list every BatchNormalization with what 'bnfold fold' would do (backward, forward, decomposed, kept) and why, and the node it would fold into. Nothing is written.

    Exit codes: 0 inspected; 2 bad input or usage.
    """
    from bnfold.batch import as_onnx
    from bnfold.compare import parse_input_shapes
    from bnfold.dryrun import inspect_model
    from bnfold.render.console import render
    from bnfold.render.markdown import fold_markdown

    check_model_path(model)
    console = console_for(json_out == "-")
    shapes = parse_input_shapes(input_shape or [])
    with as_onnx(model, input_shapes=shapes or None, trust_pickle=trust_pickle) as onnx_path:
        report = inspect_model(
            onnx_path,
            lower_remaining=lower_remaining,
            duplicate_shared=duplicate_shared,
            allow_slower_folds=allow_slower_folds,
        )
    report.input = str(model)
    if json_out:
        write_json(report.to_dict(), json_out)
    if markdown is not None or summary_env():
        write_markdown(
            fold_markdown([report]).replace("### bnfold fold", "### bnfold inspect", 1), markdown
        )
    render(report, console, verbose=True, dry_run=True)
    raise typer.Exit(EXIT_OK)
