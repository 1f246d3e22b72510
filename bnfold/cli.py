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
        help="Shape of an input with dynamic dimensions for verification, e.g. input=1,3,224,224. "
        "Repeatable. Dynamic dimensions not given default to 1.",
    ),
]
AtolOpt = Annotated[
    float | None, typer.Option("--atol", min=0.0, help="Absolute tolerance (default: by output dtype).")
]
RtolOpt = Annotated[
    float | None, typer.Option("--rtol", min=0.0, help="Relative tolerance (default: by output dtype).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random verification inputs.")]
JsonOpt = Annotated[
    str | None,
    typer.Option("--json", metavar="PATH|-", help="Write the report as JSON to PATH, or to stdout with '-'."),
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
        except Exception:
            import traceback

            traceback.print_exc()
            print("bnfold: internal error (a bug; please report it with the traceback above)", file=sys.stderr)
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
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """bnfold: fold BatchNorm, prove equivalence, measure."""


def _console(json_to_stdout: bool):
    from rich.console import Console

    # Human output goes to stderr when stdout carries JSON, so a pipeline can parse stdout.
    return Console(stderr=json_to_stdout, highlight=False)


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
            raise OutputError(f"{dest}: cannot write the JSON report ({exc.strerror or exc})") from None


def _default_output(model: Path) -> Path:
    name = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.folded.onnx")


@app.command()
@_guard
def fold(
    model: Annotated[Path, typer.Argument(help="The ONNX model to fold.", show_default=False)],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Where to write the folded model (default: MODEL.folded.onnx next to MODEL)."),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Run original and folded models in ONNX Runtime (optimizations disabled) and compare "
            "every output. On failure nothing is written and the exit code is 1.",
        ),
    ] = True,
    input_shape: InputShapeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when any BatchNormalization is kept (the output is still written).")
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
    json_out: JsonOpt = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="List every BatchNormalization, also on big models.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print only the final PASSED/FAILED line.")] = False,
) -> None:
    """Fold every foldable BatchNormalization of MODEL and write the folded model.

    Each BN is reported as folded (into which node, how) or kept (with the reason). The folded model is verified against the original unless --no-verify is given, and written atomically: completely, or not at all.

    Exit codes: 0 passed; 1 verification failed or --strict and a BN was kept; 2 bad input or usage; 3 internal error.
    """
    from .api import fold as api_fold
    from .report import render
    from .verify import parse_input_shapes

    shapes = parse_input_shapes(input_shape or [])
    out = output if output is not None else _default_output(model)
    console = _console(json_out == "-")
    with _progress(console, enabled=not quiet) as progress:
        result = api_fold(
            model,
            out,
            verify=verify,
            input_shapes=shapes,
            atol=atol,
            rtol=rtol,
            seed=seed,
            strict=strict,
            external_data=external_data,
            progress=progress,
        )
    report = result.report
    if json_out:
        _write_json(report.to_dict(), json_out)
    if quiet:
        console.print("PASSED" if report.passed else "FAILED")
    else:
        render(report, console, verbose=verbose)
    raise typer.Exit(report.exit_code)


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
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        self._bar.__enter__()
        return self.update

    def update(self, phase: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        label = {"save": "writing tensors", "verify": "verifying"}.get(phase, phase)
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(label, total=total)
        self._bar.update(self._tasks[phase], completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def main() -> None:
    """Console-script entry point."""
    app()
