"""The ``bnfold`` command line. It parses arguments, calls the API, renders the result and exits.

Exit codes: 0 success; 1 verification failed (or ``--strict`` and a BatchNormalization was kept);
2 bad input or usage (one line on stderr, no traceback); 3 internal error (a bug: traceback kept);
130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    name="bnfold",
    help="Fold inference-mode BatchNormalization into neighbouring Conv/ConvTranspose/Gemm/MatMul "
    "weights, prove the folded model computes the same function, and report what happened to each BN.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Shared options, defined once.
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="NAME=D0,D1,...",
        envvar="BNFOLD_INPUT_SHAPE",
        help="Shape of an input with dynamic dimensions for verification, e.g. input=1,3,224,224. "
        "Repeatable. Dynamic dimensions not given default to 1.",
    ),
]
AtolOpt = Annotated[
    float | None,
    typer.Option(
        "--atol",
        min=0.0,
        envvar="BNFOLD_ATOL",
        help="Absolute tolerance (default: by output dtype).",
    ),
]
RtolOpt = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        min=0.0,
        envvar="BNFOLD_RTOL",
        help="Relative tolerance (default: by output dtype).",
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option("--seed", envvar="BNFOLD_SEED", help="Seed of the random verification inputs."),
]
SamplesOpt = Annotated[
    int, typer.Option("--samples", min=1, help="Number of seeded input batches to compare.")
]
DistOpt = Annotated[
    str, typer.Option("--dist", help="Distribution of random float inputs: normal or uniform.")
]
RangeOpt = Annotated[
    str | None,
    typer.Option(
        "--range",
        metavar="LOW,HIGH",
        help="Range of random inputs: uniform floats and integers are drawn from [LOW, HIGH); normal floats are clipped to it.",
    ),
]
DataOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        metavar="FILE.npz|NAME=FILE.npy",
        help="Your own input batch instead of random values (repeatable: one batch each). Inputs it leaves out are random.",
    ),
]
MarkdownOpt = Annotated[
    Path | None,
    typer.Option(
        "--markdown",
        metavar="FILE",
        help="Also write the result as Markdown (e.g. $GITHUB_STEP_SUMMARY).",
    ),
]
LevelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--level",
        help="ORT graph-optimization level to time: disable, basic, extended, all. Repeatable (default: disable and all).",
    ),
]
JsonOpt = Annotated[
    str | None,
    typer.Option(
        "--json", metavar="PATH|-", help="Write the report as JSON to PATH, or to stdout with '-'."
    ),
]


def _guard(func):
    """Turn the user's errors into one line + exit 2, Ctrl-C into 130, and bugs into exit 3."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from .errors import BnfoldError

        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except BnfoldError as exc:
            print(f"bnfold: error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("bnfold: interrupted; nothing was written", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            from .errors import resource_error

            resource = resource_error(exc)  # MemoryError, failed mmap: the input's fault, exit 2
            if resource is not None:
                print(f"bnfold: error: {resource}", file=sys.stderr)
                raise typer.Exit(resource.exit_code) from None
            import traceback

            traceback.print_exc()
            print(
                "bnfold: internal error (a bug; please report it with the traceback above)",
                file=sys.stderr,
            )
            raise typer.Exit(EXIT_BUG) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """bnfold: fold BatchNorm, prove equivalence, measure."""


def _console(json_to_stdout: bool):
    from rich.console import Console

    # Human output goes to stderr when stdout carries JSON, so a pipeline can parse stdout.
    console = Console(stderr=json_to_stdout, highlight=False)
    if not console.is_terminal:
        # CI logs: plain text (rich drops colours and control codes), wide enough for the tables.
        console = Console(stderr=json_to_stdout, highlight=False, width=max(console.width, 120))
    return console


def _write_json(payload: dict, dest: str) -> None:
    text = json.dumps(payload, indent=2, allow_nan=False, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        from .errors import OutputError

        try:
            Path(dest).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(
                f"{dest}: cannot write the JSON report ({exc.strerror or exc})"
            ) from None


_MODEL_SUFFIXES = (".onnx", ".pt2", ".pt", ".pth", ".ts", ".torchscript")


def _default_output(model: Path) -> Path:
    name = model.name
    for suffix in _MODEL_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return model.with_name(f"{name}.folded.onnx")


@app.command()
@_guard
def fold(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="ONNX model(s) to fold: files, directories (every *.onnx below) or glob patterns.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Where to write the folded model (one input only; default: MODEL.folded.onnx next to MODEL).",
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "-O",
            "--output-dir",
            envvar="BNFOLD_OUTPUT_DIR",
            help="Write every folded model here, mirroring the inputs' relative layout (external data included).",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "-j", "--jobs", min=1, envvar="BNFOLD_JOBS", help="Worker processes for several models."
        ),
    ] = 1,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            envvar="BNFOLD_VERIFY",
            help="Run original and folded models in ONNX Runtime (optimizations disabled) and compare "
            "every output. On failure nothing is written and the exit code is 1.",
        ),
    ] = True,
    input_shape: InputShapeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            envvar="BNFOLD_STRICT",
            help="Exit 1 when any BatchNormalization is kept (the output is still written).",
        ),
    ] = False,
    bench: Annotated[
        bool,
        typer.Option(
            "--bench",
            help="Also time the original against the folded model under ONNX Runtime (see 'bnfold bench').",
        ),
    ] = False,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="Force or forbid external data for the output (default: when the input has it or the "
            "output would exceed 2 GB).",
            show_default=False,
        ),
    ] = None,
    lower_remaining: Annotated[
        bool,
        typer.Option(
            "--lower-remaining",
            help="Rewrite every BatchNormalization that stays into Mul + Add (for runtimes without a BN kernel); they are still reported as kept.",
        ),
    ] = False,
    duplicate_shared: Annotated[
        bool,
        typer.Option(
            "--duplicate-shared",
            help="Where a producer's output also feeds other nodes, fold into a copy of the producer (costs compute; stated in the report).",
        ),
    ] = False,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="PyTorch input: trust the file. Allows a whole pickled nn.Module (torch.save(model)), .pt2 weights/constants/sample inputs stored as pickles, and TorchScript/.pt2 graphs that call ops with file, process or network effects (torch.from_file...). Unpickling runs code from the file: use only with files you trust. Default: all of these are refused (exit 2).",
        ),
    ] = False,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    verbose: Annotated[
        bool,
        typer.Option("-v", "--verbose", help="List every BatchNormalization, also on big models."),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="Print only the final PASSED/FAILED line.")
    ] = False,
) -> None:
    """Fold every foldable BatchNormalization of MODEL(s) and write the folded model(s).

    Each BN is reported as folded (into which node, how) or kept (with the reason). The folded model is verified against the original unless --no-verify is given, and written atomically: completely, or not at all. Several models (or a directory) are folded one by one or by --jobs workers; one failing model does not stop the others.

    Exit codes: 0 passed; 1 verification failed or --strict and a BN was kept; 2 bad input or usage; 3 internal error. With several models: the worst of them.
    """
    from .batch import expand_inputs
    from .compare import parse_input_shapes
    from .errors import UsageError

    shapes = parse_input_shapes(input_shape or [])
    inputs = expand_inputs(models)
    if not inputs:
        raise UsageError("no ONNX model found in " + ", ".join(str(m) for m in models))
    single = len(inputs) == 1 and output_dir is None and not models[0].is_dir()
    if output is not None and not single:
        raise UsageError("-o/--output takes one model; use -O/--output-dir for several")
    options = dict(
        verify=verify,
        input_shapes=shapes,
        atol=atol,
        rtol=rtol,
        seed=seed,
        strict=strict,
        external_data=external_data,
    )
    if lower_remaining or duplicate_shared:
        options.update(lower_remaining=lower_remaining, duplicate_shared=duplicate_shared)
    if trust_pickle:
        options["trust_pickle"] = True  # only PyTorch inputs take it
    _check_reports(json_out, markdown)  # before any model is committed: exit 2 = nothing written
    console = _console(json_out == "-")
    if not single:
        _fold_batch(inputs, output_dir, jobs, options, console, json_out, markdown, quiet)
        return

    from .batch import fold_any, is_torch_input
    from .report import fold_markdown, render

    model = inputs[0][0]
    model_is_torch = is_torch_input(model)
    out = output if output is not None else _default_output(model)
    with _progress(console, enabled=not quiet) as progress:
        result = fold_any(model, out, progress=progress, **options)
    report = result.report
    if bench and report.written and not model_is_torch:
        from .latency import bench as run_bench

        with _progress(console, enabled=not quiet) as tick:
            report.bench = run_bench(
                [model, out],
                input_shapes=shapes or None,
                seed=seed,
                labels=["original", "folded"],
                progress=(lambda d, n: tick("bench", d, n)) if tick else None,
            )
    if json_out:
        _write_json(report.to_dict(), json_out)
    if markdown is not None or _summary_env():
        _write_markdown(fold_markdown([report]), markdown)
    if quiet:
        console.print("PASSED" if report.passed else "FAILED")
    else:
        render(report, console, verbose=verbose)
    raise typer.Exit(report.exit_code)


@app.command()
@_guard
def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model to inspect.", show_default=False)],
    lower_remaining: Annotated[
        bool, typer.Option("--lower-remaining", help="As in 'bnfold fold'.")
    ] = False,
    duplicate_shared: Annotated[
        bool, typer.Option("--duplicate-shared", help="As in 'bnfold fold'.")
    ] = False,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
) -> None:
    """Dry run: list every BatchNormalization with what 'bnfold fold' would do (backward, forward, decomposed, kept) and why, and the node it would fold into. Nothing is written.

    Exit codes: 0 inspected; 2 bad input or usage.
    """
    from .dryrun import inspect_model
    from .report import fold_markdown, render

    _check_model_path(model)
    console = _console(json_out == "-")
    report = inspect_model(
        model, lower_remaining=lower_remaining, duplicate_shared=duplicate_shared
    )
    report.input = str(model)
    if json_out:
        _write_json(report.to_dict(), json_out)
    if markdown is not None or _summary_env():
        _write_markdown(
            fold_markdown([report]).replace("### bnfold fold", "### bnfold inspect", 1), markdown
        )
    render(report, console, verbose=True, dry_run=True)
    raise typer.Exit(EXIT_OK)


def _fold_batch(inputs, output_dir, jobs, options, console, json_out, markdown, quiet) -> None:
    """Fold several models; a summary table at the end; exit with the worst result."""
    from .batch import fold_many
    from .report import batch_markdown, render_batch

    tasks = [
        (src, (output_dir / rel) if output_dir is not None else _default_output(src))
        for src, rel in inputs
    ]
    total = len(tasks)
    bar = None
    if console.is_terminal and not quiet:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        bar.start()
        task_id = bar.add_task(f"folding {total} models", total=total)

    def on_done(item, done, n) -> None:
        if bar is not None:
            bar.update(task_id, completed=done, description=f"folded {Path(item.input).name}")
        elif not quiet:
            # Not a terminal (CI logs): one plain line per model, no control characters.
            console.print(
                f"[{done}/{n}] {item.input}: {item.status}"
                + (f" ({item.error})" if item.error else ""),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    try:
        result = fold_many(tasks, jobs=jobs, options=options, on_done=on_done)
    finally:
        if bar is not None:
            bar.stop()
    if json_out:
        _write_json(result.to_dict(), json_out)
    if markdown is not None or _summary_env():
        _write_markdown(batch_markdown(result), markdown)
    if quiet:
        console.print("PASSED" if result.passed else "FAILED")
    else:
        render_batch(result, console)
    raise typer.Exit(result.exit_code)


@app.command()
@_guard
def check(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="ONNX model(s) to check: files, directories or glob patterns.", show_default=False
        ),
    ],
    allow: Annotated[
        int,
        typer.Option(
            "--allow",
            min=0,
            envvar="BNFOLD_ALLOW",
            help="Pass while at most N foldable BatchNorms remain per model.",
        ),
    ] = 0,
    allow_node: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-node",
            metavar="NAME",
            help="A BatchNormalization kept on purpose (repeatable); it never fails the check.",
        ),
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            metavar="ORIGINAL",
            help="Also verify the (single) model against ORIGINAL, as 'bnfold verify' does.",
        ),
    ] = None,
    input_shape: InputShapeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="Print only the final PASSED/FAILED line.")
    ] = False,
) -> None:
    """Read-only gate: fail when a model still holds a BatchNormalization that bnfold could fold.

    Nothing is written and no ONNX Runtime session is created unless --against is given. Each foldable BN is named with where it would fold.

    Exit codes: 0 nothing left to fold (within --allow / --allow-node) and, with --against, outputs match; 1 otherwise; 2 bad input or usage.
    """
    from .batch import check_model, expand_inputs
    from .compare import parse_input_shapes
    from .errors import UsageError
    from .report import check_markdown, render_check

    shapes = parse_input_shapes(input_shape or [])
    inputs = expand_inputs(models)
    if not inputs:
        raise UsageError("no ONNX model found in " + ", ".join(str(m) for m in models))
    if against is not None and len(inputs) != 1:
        raise UsageError("--against compares one model with its original; give exactly one model")
    if against is not None:
        _check_model_path(against)
    verify_options = dict(input_shapes=shapes or None, seed=seed, atol=atol, rtol=rtol)
    console = _console(json_out == "-")
    results = []
    for path, _ in inputs:
        r = check_model(
            path, allow_nodes=allow_node or (), against=against, verify_options=verify_options
        )
        if (
            r.exit_code == 1
            and len(r.foldable) <= allow
            and not (
                r.verification is not None
                and not r.verification
                and not r.verification.skipped_reason
            )
        ):
            r.exit_code = 0  # within --allow
        results.append(r)
    if len(results) == 1 and results[0].error and results[0].exit_code == 2:
        from .errors import BnfoldError

        err = BnfoldError(results[0].error)
        raise err
    exit_code = max(r.exit_code for r in results)
    if json_out:
        from .report import SCHEMA_VERSION

        _write_json(
            {
                "schema_version": SCHEMA_VERSION,
                "passed": exit_code == 0,
                "exit_code": exit_code,
                "allow": allow,
                "models": [r.to_dict() for r in results],
            },
            json_out,
        )
    if markdown is not None or _summary_env():
        _write_markdown(check_markdown(results), markdown)
    if not quiet:
        render_check(results, console)
    console.print("[bold green]PASSED[/]" if exit_code == 0 else "[bold red]FAILED[/]")
    raise typer.Exit(exit_code)


def _parse_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    from .errors import UsageError

    try:
        low, high = (float(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"malformed --range {text!r}: expected LOW,HIGH, e.g. -1,1") from None
    return low, high


def _parse_tolerances(specs: list[str] | None) -> dict[str, tuple[float, float]]:
    from .errors import UsageError

    out: dict[str, tuple[float, float]] = {}
    for spec in specs or []:
        name, sep, vals = spec.rpartition("=")
        try:
            atol, rtol = (float(v) for v in vals.split(","))
        except ValueError:
            atol = rtol = None
        if not sep or not name or atol is None:
            raise UsageError(
                f"malformed --tol {spec!r}: expected OUTPUT=ATOL,RTOL, e.g. logits=1e-4,1e-3"
            )
        out[name] = (atol, rtol)
    return out


def _check_reports(json_out: str | None, markdown: Path | None) -> None:
    """Every report destination must be writable before anything is written (issue 15)."""
    import os

    from .io import check_report_path

    for target in (
        json_out if json_out and json_out != "-" else None,
        markdown,
        os.environ.get("GITHUB_STEP_SUMMARY") or None,
    ):
        if target is not None:
            check_report_path(target)


def _write_markdown(text: str, dest: Path | None) -> None:
    """Write Markdown to ``dest`` and append it to $GITHUB_STEP_SUMMARY when that is set."""
    import os

    from .errors import OutputError

    targets: list[tuple[Path, str]] = [(dest, "w")] if dest is not None else []
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        targets.append((Path(summary), "a"))
    for target, mode in targets:
        try:
            with open(target, mode, encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:
            raise OutputError(f"{target}: cannot write Markdown ({exc.strerror or exc})") from None


def _check_model_path(path: Path) -> None:
    from .errors import InputNotFoundError

    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise InputNotFoundError(f"{path}: is a directory, not an ONNX file")


@app.command()
@_guard
def verify(
    reference: Annotated[Path, typer.Argument(help="The original model.", show_default=False)],
    candidate: Annotated[
        Path,
        typer.Argument(help="The model that should compute the same function.", show_default=False),
    ],
    input_shape: InputShapeOpt = None,
    data: DataOpt = None,
    samples: SamplesOpt = 1,
    dist: DistOpt = "normal",
    value_range: RangeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    tol: Annotated[
        list[str] | None,
        typer.Option(
            "--tol", metavar="OUTPUT=ATOL,RTOL", help="Tolerances for one output (repeatable)."
        ),
    ] = None,
    seed: SeedOpt = 0,
    localize: Annotated[
        bool,
        typer.Option(
            "--localize",
            help="When outputs differ, find the first intermediate tensor (shared by name) that diverges and name its node.",
        ),
    ] = False,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="Print only the final PASSED/FAILED line.")
    ] = False,
) -> None:
    """Check that CANDIDATE computes what REFERENCE computes, under ONNX Runtime with optimizations disabled.

    Exit codes: 0 every output within tolerance (or the check could not run, which is reported); 1 some output differs or the candidate cannot run; 2 bad input or usage.
    """
    from .compare import load_input_data, parse_input_shapes, verify_models
    from .report import render_verification, verification_markdown

    shapes = parse_input_shapes(input_shape or [])
    batches = load_input_data(data) if data else None
    for path in (reference, candidate):
        _check_model_path(path)
    console = _console(json_out == "-")
    result = verify_models(
        str(reference),
        str(candidate),
        input_shapes=shapes or None,
        seed=seed,
        atol=atol,
        rtol=rtol,
        output_tolerances=_parse_tolerances(tol) or None,
        samples=samples,
        distribution=dist,
        value_range=_parse_range(value_range),
        data=batches,
    )
    located = None
    if localize and not result and not result.skipped_reason:
        from .divergence import localize as run_localize

        located = run_localize(
            str(reference),
            str(candidate),
            input_shapes=shapes or None,
            seed=seed,
            atol=atol,
            rtol=rtol,
        )
    passed = bool(result) or bool(result.skipped_reason)
    if json_out:
        payload = {
            "schema_version": 1,
            "reference": str(reference),
            "candidate": str(candidate),
            **result.to_dict(),
            "localize": located.to_dict() if located is not None else None,
        }
        _write_json(payload, json_out)
    if markdown is not None or _summary_env():
        _write_markdown(
            verification_markdown(result, str(reference), str(candidate), located), markdown
        )
    if not quiet:
        render_verification(result, console, title=f"{reference} vs {candidate}")
        if located is not None:
            console.print(
                ("[red]" if located else "") + located.describe() + ("[/]" if located else ""),
                markup=bool(located),
            )
            if located.divergence is not None and located.divergence.candidate_chain:
                chain = " → ".join(str(p) for p in located.divergence.candidate_chain)
                console.print(
                    f"  candidate nodes since the last matching tensor: {chain}", markup=False
                )
    console.print("[bold green]PASSED[/]" if passed else "[bold red]FAILED[/]")
    raise typer.Exit(EXIT_OK if passed else EXIT_FAILED)


@app.command()
@_guard
def bench(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Models to time; the first is the baseline of every ratio.", show_default=False
        ),
    ],
    level: LevelsOpt = None,
    runs: Annotated[
        int | None,
        typer.Option("--runs", min=1, help="Timed runs per model per level (default 200)."),
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option(
            "--seconds",
            min=0.01,
            help="Time budget of the timed runs per level, all models together.",
        ),
    ] = None,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Untimed runs per model per level first.")
    ] = 10,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=0,
            help="ORT intra-op threads (0: ORT's default). 1 gives the most repeatable numbers.",
        ),
    ] = 1,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="First dimension of inputs whose batch dimension is dynamic.",
        ),
    ] = None,
    input_shape: InputShapeOpt = None,
    provider: Annotated[
        str,
        typer.Option(
            "--provider", help="Execution provider: cpu, cuda, tensorrt or an ORT provider name."
        ),
    ] = "cpu",
    seed: SeedOpt = 0,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    plot_file: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE.png",
            help="Draw the latency distributions (needs matplotlib: pip install 'bnfold[plot]').",
        ),
    ] = None,
) -> None:
    """Time models under ONNX Runtime, interleaved (A B B A ...), and report each one's latency and its ratio to the first with a bootstrap confidence interval.

    ONNX Runtime fuses Conv+BatchNormalization itself at optimization level 'basic' and above, so by default both 'disable' (where the fold's gain shows) and 'all' (what a deployment runs) are reported, plus session-creation time.
    """
    from .compare import parse_input_shapes
    from .latency import bench as run_bench
    from .latency import plot
    from .report import render_bench

    shapes = parse_input_shapes(input_shape or [])
    for path in models:
        _check_model_path(path)
    console = _console(json_out == "-")
    with _progress(console, enabled=True) as tick:
        result = run_bench(
            [str(m) for m in models],
            levels=tuple(level) if level else ("disable", "all"),
            runs=runs,
            seconds=seconds,
            warmup=warmup,
            intra_op_threads=threads,
            batch_size=batch_size,
            input_shapes=shapes or None,
            provider=provider,
            seed=seed,
            progress=(lambda d, n: tick("bench", d, n)) if tick else None,
        )
    if plot_file is not None:
        plot(result, plot_file)
    if json_out:
        _write_json({"schema_version": 1, **result.to_dict()}, json_out)
    if markdown is not None or _summary_env():
        _write_markdown(result.to_markdown(), markdown)
    render_bench(result, console)
    if plot_file is not None:
        console.print(f"Plot written to {plot_file}")


def _summary_env() -> bool:
    import os

    return bool(os.environ.get("GITHUB_STEP_SUMMARY"))


class _progress:
    """A rich progress bar for the phases of a long fold; silent when not on a terminal."""

    def __init__(self, console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal
        self._bar = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._bar.__enter__()
        return self.update

    def update(self, phase: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        label = {"save": "writing tensors", "verify": "verifying", "bench": "timing"}.get(
            phase, phase
        )
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(label, total=total)
        self._bar.update(self._tasks[phase], completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def main() -> None:
    """Console-script entry point."""
    app()
