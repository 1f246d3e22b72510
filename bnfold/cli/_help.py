"""Plain help text and one-line usage errors, the same across typer versions.

typer's own help changes shape from release to release (rich panels that truncate option names at
80 columns, ``<bool>`` after flags, ``{models}`` in the usage line, ``<list[Path]>`` types), so
bnfold formats ``--help`` itself from the click parameters: every option name and metavar in full,
help wrapped to the terminal (click's formatter), ``[env var: ...; default: ...]`` after it.
Usage errors (an unknown option, a missing argument, a bad value) print one line,
``bnfold: error: ... (see 'bnfold fold --help')``, and exit 2, as bnfold's own errors do.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    from click import Context, HelpFormatter, Parameter

import typer

try:  # recent typer vendors click as typer._click; older releases use click itself
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, UsageError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _param_record(param: Parameter) -> tuple[str, str] | None:
    """``(names, help)`` of one option or argument, as click's plain formatter takes it."""
    if getattr(param, "hidden", False):
        return None
    help_text = getattr(param, "help", None) or ""
    if param.param_type_name == "argument":
        return param.metavar or param.name.upper(), help_text
    is_flag = param.is_flag or param.count
    names = ", ".join(param.opts)
    if not is_flag:
        names += f" {param.metavar or param.name.upper()}"
    if param.secondary_opts:
        names += " / " + ", ".join(param.secondary_opts)
    extra = []
    if param.envvar and param.show_envvar:
        envvar = param.envvar if isinstance(param.envvar, str) else ", ".join(param.envvar)
        extra.append(f"env var: {envvar}")
    default = param.default
    if param.show_default is not False and not callable(default):
        if param.secondary_opts and isinstance(default, bool):
            extra.append(f"default: {(param.opts if default else param.secondary_opts)[-1]}")
        elif not is_flag and default not in (None, (), []):
            extra.append(f"default: {default}")
    if extra:
        help_text = f"{help_text}  [{'; '.join(extra)}]" if help_text else f"[{'; '.join(extra)}]"
    return names, help_text


def _usage_pieces(command: TyperCommand) -> list[str]:
    kinds = {p.param_type_name for p in command.params}
    pieces = ["[OPTIONS]"] if "option" in kinds else []
    for param in command.params:
        if param.param_type_name == "argument":
            name = param.metavar or param.name.upper()
            pieces.append(name if param.required else f"[{name}]")
    return pieces


class BnfoldCommand(TyperCommand):
    """A typer command whose ``--help`` is click's plain layout with bnfold's records."""

    def format_usage(self, ctx: Context, formatter: HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, " ".join(_usage_pieces(self)))

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        for title, kind in (("Arguments", "argument"), ("Options", "option")):
            params = [p for p in self.get_params(ctx) if p.param_type_name == kind]
            records = [r for p in params if (r := _param_record(p)) is not None]
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)
        self.format_epilog(ctx, formatter)


def _one_line(exc: ClickException) -> str:
    from bnfold.render.text import inert

    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"bnfold: error: {inert(message)}{hint}"


class BnfoldGroup(TyperGroup):
    """The root group: plain help, and click/typer usage errors as one ``bnfold: error:`` line."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: bare `bnfold`
                exc.show()
                sys.exit(0)
            print(_one_line(exc), file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)
        except ClickException as exc:
            print(_one_line(exc), file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("bnfold: interrupted; nothing was written", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)
