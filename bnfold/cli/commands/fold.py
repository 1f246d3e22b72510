"""``bnfold fold``: fold one model (ONNX or PyTorch) or many, verify, write, render, exit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnfold.cli._shared import (
    Progress,
    batch_bar,
    check_report_paths,
    console_for,
    default_output,
    summary_env,
    write_json,
    write_markdown,
)
from bnfold.cli.options import (
    AcceptUnverifiedOpt,
    AtolOpt,
    BenchOpt,
    DuplicateSharedOpt,
    ExternalDataOpt,
    InputShapeOpt,
    JobsOpt,
    JsonOpt,
    LowerRemainingOpt,
    MarkdownOpt,
    OutputDirOpt,
    OutputOpt,
    QuietOpt,
    RtolOpt,
    SeedOpt,
    StrictOpt,
    TrustPickleOpt,
    VerboseOpt,
    VerifyOpt,
    VerifyTimeoutOpt,
)
from bnfold.options import FoldOptions


def fold(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="ONNX model(s) to fold: files, directories (every *.onnx below) or glob patterns.",
            show_default=False,
        ),
    ],
    output: OutputOpt = None,
    output_dir: OutputDirOpt = None,
    jobs: JobsOpt = 1,
    verify: VerifyOpt = True,
    input_shape: InputShapeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    strict: StrictOpt = False,
    accept_unverified: AcceptUnverifiedOpt = False,
    verify_timeout: VerifyTimeoutOpt = None,
    bench: BenchOpt = False,
    external_data: ExternalDataOpt = None,
    lower_remaining: LowerRemainingOpt = False,
    duplicate_shared: DuplicateSharedOpt = False,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fold every foldable BatchNormalization of MODEL(s) and write the folded model(s).

    Each BN is reported as folded (into which node, how) or kept (with the reason). The folded model is verified against the original unless --no-verify is given, and written atomically: completely, or not at all. Several models (or a directory) are folded one by one or by --jobs workers; one failing model does not stop the others.

    Exit codes: 0 passed (or written unverified on request: --no-verify, --accept-unverified); 1 verification failed or --strict and a BN was kept; 2 bad input or usage; 3 internal error; 4 unverified (ONNX Runtime cannot run the original, or --verify-timeout ran out): nothing written; 130/143 interrupted (SIGINT/SIGTERM). With several models: the worst of them.
    """
    from bnfold.batch import expand_inputs
    from bnfold.compare import parse_input_shapes
    from bnfold.errors import UsageError

    options = FoldOptions(
        verify=verify,
        input_shapes=parse_input_shapes(input_shape or []),
        atol=atol,
        rtol=rtol,
        seed=seed,
        strict=strict,
        external_data=external_data,
        lower_remaining=lower_remaining,
        duplicate_shared=duplicate_shared,
        bench=bench,
        trust_pickle=trust_pickle,
        accept_unverified=accept_unverified,
        verify_timeout=verify_timeout,
    )
    inputs = expand_inputs(models)
    if not inputs:
        raise UsageError("no ONNX model found in " + ", ".join(str(m) for m in models))
    single = len(inputs) == 1 and output_dir is None and not models[0].is_dir()
    if output is not None and not single:
        raise UsageError("-o/--output takes one model; use -O/--output-dir for several")
    check_report_paths(
        json_out, markdown
    )  # before any model is committed: exit 2 = nothing written
    console = console_for(json_out == "-")
    out = _Output(console, json_out, markdown, verbose, quiet)
    if single:
        model = inputs[0][0]
        _fold_one(model, output if output is not None else default_output(model), options, out)
    _fold_batch(_batch_tasks(inputs, output_dir), jobs, options, out)


def _batch_tasks(
    inputs: list[tuple[Path, Path]], output_dir: Path | None
) -> list[tuple[Path, Path]]:
    """``[(input, output)]``: mirrored under ``output_dir`` (a PyTorch file's output is named
    ``.onnx``), else next to each input. Two inputs never share one output."""
    from bnfold.batch import is_torch_input
    from bnfold.errors import UsageError

    tasks: list[tuple[Path, Path]] = []
    taken: dict[Path, Path] = {}
    for src, rel in inputs:
        if output_dir is None:
            dst = default_output(src)
        elif is_torch_input(src):
            dst = output_dir / rel.with_name(rel.stem + ".onnx")
        else:
            dst = output_dir / rel
        key = dst.resolve()
        if key in taken:
            raise UsageError(
                f"{taken[key]} and {src} would both be written to the same output {dst}"
            )
        taken[key] = src
        tasks.append((src, dst))
    return tasks


class _Output:
    """Where and how a fold's result is shown: console, --json, --markdown, -v, -q."""

    def __init__(
        self, console: Any, json_out: str | None, markdown: Path | None, verbose: bool, quiet: bool
    ) -> None:
        self.console, self.json_out, self.markdown = console, json_out, markdown
        self.verbose, self.quiet = verbose, quiet

    def write(self, payload: dict, markdown_text: Any) -> None:
        """--json and --markdown ($GITHUB_STEP_SUMMARY too); ``markdown_text()`` builds it."""
        if self.json_out:
            write_json(payload, self.json_out)
        if self.markdown is not None or summary_env():
            write_markdown(markdown_text(), self.markdown)


def _fold_one(model: Path, output: Path, options: FoldOptions, out: _Output) -> None:
    """One model: fold (and verify, write, time), render, exit with the report's code."""
    from bnfold.batch import fold_any
    from bnfold.render.console import fold_final_line, render
    from bnfold.render.markdown import fold_markdown

    with Progress(out.console, enabled=not out.quiet) as progress:
        result = fold_any(model, output, options, progress=progress)
    report = result.report
    out.write(report.to_dict(), lambda: fold_markdown([report]))
    if out.quiet:
        out.console.print(fold_final_line(report), markup=False, highlight=False, soft_wrap=True)
    else:
        render(report, out.console, verbose=out.verbose)
    raise typer.Exit(report.exit_code)


def _fold_batch(
    tasks: list[tuple[Path, Path]], jobs: int, options: FoldOptions, out: _Output
) -> None:
    """Fold several models; a summary table at the end; exit with the worst result."""
    from bnfold.batch import fold_many
    from bnfold.render.console import batch_progress_line, render_batch
    from bnfold.render.markdown import batch_markdown
    from bnfold.render.text import inert_markup

    console, quiet = out.console, out.quiet
    bar = batch_bar(console, len(tasks)) if console.is_terminal and not quiet else None

    def on_done(item, done, n) -> None:  # noqa: ANN001 - BatchItem, int, int
        if bar is not None:
            name = inert_markup(Path(item.input).name)
            bar.update(bar.task_ids[0], completed=done, description=f"folded {name}")
        elif not quiet:
            # Not a terminal (CI logs): one plain line per model, no control characters.
            console.print(
                batch_progress_line(item, done, n), markup=False, highlight=False, soft_wrap=True
            )

    try:
        result = fold_many(tasks, jobs=jobs, options=options, on_done=on_done)
    finally:
        if bar is not None:
            bar.stop()
    out.write(result.to_dict(), lambda: batch_markdown(result))
    if quiet:
        console.print("PASSED" if result.exit_code == 0 else _batch_word(result.exit_code))
    else:
        render_batch(result, console)
    raise typer.Exit(result.exit_code)


def _batch_word(exit_code: int) -> str:
    """The final word of a batch that did not pass: UNVERIFIED when the worst is exit 4."""
    return "UNVERIFIED" if exit_code == 4 else "FAILED"
