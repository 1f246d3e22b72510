"""The ``bnfold`` command line. It parses arguments, calls the API, renders the result and exits.

Exit codes: 0 success; 1 verification failed (or ``--strict`` and a BatchNormalization was kept);
2 bad input or usage (one line on stderr, no traceback); 3 internal error (a bug: traceback kept);
4 unverified (ONNX Runtime cannot run the original, or the verification's time budget ran out;
nothing written unless ``--accept-unverified``); 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM.
Both signals stop ONNX Runtime inside its kernel (``bnfold._ort.cancel_on_signals``) and leave no
staging files behind.

This module holds the typer app, the root callback and the error guard; each command is a plain
function in :mod:`bnfold.cli.commands`, registered here behind the guard.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from bnfold import __version__

from ._help import BnfoldCommand, BnfoldGroup
from .commands import bench, check, fold, inspect, verify

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUG, EXIT_UNVERIFIED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

app = typer.Typer(
    name="bnfold",
    help="Fold inference-mode BatchNormalization into neighbouring Conv/ConvTranspose/Gemm/MatMul "
    "weights, prove the folded model computes the same function, and report what happened to each BN.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=BnfoldGroup,
)


def _guard(func):
    """Turn the user's errors into one line + exit 2, Ctrl-C into 130 (SIGTERM 143), and bugs into
    exit 3. SIGINT and SIGTERM terminate any ONNX Runtime run in flight (see
    :func:`bnfold._ort.cancel_on_signals`), so cleanup runs and the exit comes within seconds."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from bnfold._ort import cancel_on_signals
        from bnfold.errors import BnfoldError

        try:
            with cancel_on_signals():
                return func(*args, **kwargs)
        except typer.Exit:
            raise
        except BnfoldError as exc:
            from bnfold.render.text import inert

            print(f"bnfold: error: {inert(str(exc))}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or _ort.Cancelled from SIGINT/SIGTERM
            print("bnfold: interrupted; nothing was written", file=sys.stderr)
            raise typer.Exit(getattr(exc, "exit_code", EXIT_INTERRUPTED)) from None
        except Exception as exc:
            from bnfold.errors import resource_error
            from bnfold.render.text import inert

            resource = resource_error(exc)  # MemoryError, failed mmap: the input's fault, exit 2
            if resource is not None:
                print(f"bnfold: error: {inert(str(resource))}", file=sys.stderr)
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


for _command in (fold.fold, inspect.inspect, check.check, verify.verify, bench.bench):
    app.command(cls=BnfoldCommand)(_guard(_command))


def main() -> None:
    """Console-script entry point."""
    app()
