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
    AllowSlowerFoldsOpt,
    AtolOpt,
    BenchOpt,
    DuplicateSharedOpt,
    ExporterOpt,
    ExternalDataOpt,
    InPlaceOpt,
    InputShapeOpt,
    JobsOpt,
    JsonOpt,
    LowerRemainingOpt,
    MarkdownOpt,
    OutputDirOpt,
    OutputOpt,
    QuietOpt,
    RtolOpt,
    SchedulerOpt,
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
            metavar="MODEL...",
            help="ONNX model(s) to fold: files, directories (every *.onnx below) or glob patterns.",
            show_default=False,
        ),
    ],
    output: OutputOpt = None,
    output_dir: OutputDirOpt = None,
    in_place: InPlaceOpt = False,
    jobs: JobsOpt = 1,
    scheduler: SchedulerOpt = None,
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
    allow_slower_folds: AllowSlowerFoldsOpt = False,
    trust_pickle: TrustPickleOpt = False,
    exporter: ExporterOpt = "dynamo",
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fold every foldable BatchNormalization of MODEL(s) and write the folded model(s).

    Each BN is reported as folded (into which node, how) or kept (with the reason). The folded model is verified against the original unless --no-verify is given, and written atomically: completely, or not at all. Several models (or a directory) are folded one by one, by --jobs local worker processes, or on a Dask cluster (--scheduler); one failing model does not stop the others.

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
        allow_slower_folds=allow_slower_folds,
        bench=bench,
        trust_pickle=trust_pickle,
        exporter=exporter,
        accept_unverified=accept_unverified,
        verify_timeout=verify_timeout,
    )
    inputs = expand_inputs(models)
    if not inputs:
        raise UsageError("no ONNX model found in " + ", ".join(str(m) for m in models))
    single = len(inputs) == 1 and output_dir is None and not models[0].is_dir()
    if output is not None and not single:
        raise UsageError("-o/--output takes one model; use -O/--output-dir for several")
    if output is not None and not output.is_dir() and output.suffix.lower() != ".onnx":
        _refuse_output_name(inputs[0][0], output)
    check_report_paths(
        json_out, markdown
    )  # before any model is committed: exit 2 = nothing written
    console = console_for(json_out == "-")
    out = _Output(console, json_out, markdown, verbose, quiet)
    if in_place:
        _fold_in_place([src for src, _ in inputs], options, out, output, output_dir)
    if scheduler is None and single:
        model = inputs[0][0]
        _fold_one(model, output if output is not None else default_output(model), options, out)
    if single:  # one model sent to a cluster: a batch of one
        tasks = [(inputs[0][0], output if output is not None else default_output(inputs[0][0]))]
    else:
        tasks = _batch_tasks(inputs, output_dir)
    if scheduler is None:
        _fold_batch(tasks, jobs, options, out)
        return
    from bnfold.batch import dask_executor

    with dask_executor(scheduler) as (executor, workers):
        _fold_batch(tasks, workers, options, out, executor=executor)


def _refuse_output_name(model: Path, output: Path) -> None:
    """``-o out.txt``: refused, after the path checks that name a worse mistake (the input itself,
    or its external data)."""
    from bnfold import io as _io
    from bnfold.batch import is_torch_input
    from bnfold.errors import UsageError

    if output.exists() and model.is_file() and not is_torch_input(model):
        protected = _io.external_data_files(_io.load(model))
        _io.check_output_path(output, input_path=model, protected=protected)
    raise UsageError(
        f"-o {output}: the folded model is an ONNX file; give a name ending in .onnx "
        "(--json/--markdown write the report)"
    )


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

    with Progress(out.console, enabled=not out.quiet, model=model, output=output) as progress:
        result = fold_any(model, output, options, progress=progress)
    report = result.report
    out.write(report.to_dict(), lambda: fold_markdown([report]))
    if out.quiet:
        _quiet_end(
            out.console, [report.to_dict()] if not report.passed else [], fold_final_line(report)
        )
    else:
        render(report, out.console, verbose=out.verbose)
    raise typer.Exit(report.exit_code)


def _fold_batch(
    tasks: list[tuple[Path, Path]],
    jobs: int,
    options: FoldOptions,
    out: _Output,
    executor: Any = None,
) -> None:
    """Fold several models; a summary table at the end; exit with the worst result."""
    from bnfold.batch import fold_many
    from bnfold.render.console import batch_progress_line, render_batch
    from bnfold.render.markdown import batch_markdown
    from bnfold.render.text import inert_markup

    console, quiet = out.console, out.quiet
    bar = batch_bar(console, len(tasks)) if console.is_terminal and not quiet else None

    def on_running(inputs: list[str]) -> None:
        if bar is not None:
            names = ", ".join(inert_markup(Path(i).name) for i in inputs)
            bar.update(bar.task_ids[0], description=f"folding {names}")

    def on_done(item, done, n) -> None:  # noqa: ANN001 - BatchItem, int, int
        if bar is not None:
            bar.update(bar.task_ids[0], completed=done)
        elif not quiet:
            # Not a terminal (CI logs): one plain line per model, no control characters.
            console.print(
                batch_progress_line(item, done, n), markup=False, highlight=False, soft_wrap=True
            )

    try:
        result = fold_many(
            tasks,
            jobs=jobs,
            options=options,
            on_done=on_done,
            on_running=on_running,
            executor=executor,
        )
    finally:
        if bar is not None:
            bar.stop()
    out.write(result.to_dict(), lambda: batch_markdown(result))
    if quiet:
        failed = [i for i in result.items if i.exit_code != 0]
        _quiet_end(
            console, failed, "PASSED" if result.exit_code == 0 else _batch_word(result.exit_code)
        )
    else:
        render_batch(result, console)
    raise typer.Exit(result.exit_code)


def _quiet_end(console: Any, failed: list, final_line: Any) -> None:  # noqa: ANN401
    """``-q``: no tables, but one line per cause of failure, then the final line (PASSED, FAILED,
    UNVERIFIED..., WRITTEN UNVERIFIED...)."""
    from bnfold.render.console import failure_lines

    for entry in failed:
        if isinstance(entry, dict):
            lines = failure_lines(entry)
        else:  # a BatchItem
            lines = failure_lines(entry.report or {"input": entry.input}, entry.error)
        for line in lines:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(final_line, highlight=False, soft_wrap=True)  # a str or an inert rich Text


def _fold_in_place(
    models: list[Path], options: FoldOptions, out: _Output, output: Path | None, output_dir: Any
) -> None:
    """``--in-place``: each ONNX model replaced by its folded, verified self; exit with the worst."""
    from bnfold.api import fold_in_place
    from bnfold.batch import is_torch_input
    from bnfold.errors import UsageError
    from bnfold.render.console import render
    from bnfold.render.markdown import fold_markdown
    from bnfold.report import worst_exit_code

    if output is not None or output_dir is not None:
        raise UsageError("--in-place writes over each MODEL; it takes no -o/--output-dir")
    torch_files = [m for m in models if is_torch_input(m)]
    if torch_files:
        raise UsageError(
            f"{torch_files[0]}: --in-place replaces ONNX files; a PyTorch file is folded into a "
            "new .onnx (bnfold fold MODEL -o OUT.onnx)"
        )
    reports = []
    for model in models:
        with Progress(out.console, enabled=not out.quiet, model=model, output=model) as progress:
            reports.append(fold_in_place(model, options, progress=progress).report)
        if not out.quiet:
            render(reports[-1], out.console, verbose=out.verbose)
    payload = (
        reports[0].to_dict() if len(reports) == 1 else {"models": [r.to_dict() for r in reports]}
    )
    out.write(payload, lambda: fold_markdown(reports))
    failed = [r.to_dict() for r in reports if not r.passed]
    worst = worst_exit_code([r.exit_code for r in reports])
    if out.quiet:
        _quiet_end(out.console, failed, "PASSED" if not failed else _batch_word(worst))
    raise typer.Exit(worst)


def _batch_word(exit_code: int) -> str:
    """The final word of a batch that did not pass: UNVERIFIED when the worst is exit 4."""
    return "UNVERIFIED" if exit_code == 4 else "FAILED"
