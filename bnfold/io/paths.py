"""Destinations checked before anything is written: the model output (:func:`check_output_path`:
never the input or its external data, never a device node, FIFO or socket) and a report file
(:func:`check_report_path`). A refusal is an :class:`~bnfold.errors.OutputError` (exit 2) and means
nothing was written."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from pathlib import Path

from bnfold.errors import OutputError


def check_output_path(
    output: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None,
    protected: Collection[Path] = frozenset(),
) -> Path:
    """Refuse outputs that would overwrite the input or its external data, or that cannot be written."""
    out = Path(output)
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name for the output")
    _refuse_non_regular(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{out}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{out}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {str(parent)!r} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"{out}: file is not writable")
    out_real = out.resolve()
    data_real = out_real.with_name(out_real.name + ".data")
    if input_path is not None:
        in_real = Path(input_path).resolve()
        if out_real == in_real or (out.exists() and os.path.samefile(out, input_path)):
            raise OutputError(
                f"{out}: is the input file; bnfold never modifies its input, choose another -o"
            )
    for f in protected:
        if out_real == f or data_real == f:
            raise OutputError(
                f"{out}: would overwrite the input's external data {str(f)!r}; choose another -o"
            )
    return out


def _refuse_non_regular(out: Path) -> None:
    """An existing output must be a regular file: a device node (``-o /dev/null``), FIFO or socket
    would be replaced by a regular file (os.replace), so it is refused; there is no discard sink
    (``--no-verify`` with a temporary path does that job)."""
    try:
        st = os.stat(out)
    except OSError:
        return  # a new path, a dangling link, a parent that is no folder: checked elsewhere
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{out}: is a directory; give a file name for the output")
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a device node"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        raise OutputError(
            f"{out}: is {kind}; bnfold writes only regular files (give a new or regular file path)"
        )


def check_report_path(path: str | os.PathLike) -> Path:
    """Refuse a report destination (``--json``, ``--markdown``, ``$GITHUB_STEP_SUMMARY``) that
    cannot be written, before anything is committed: exit 2 then means nothing was written.

    An existing path must be writable and not a folder (a FIFO or ``/dev/stdout`` is fine: reports
    are written in place, not replaced); a new path needs an existing, writable folder. Creates
    nothing. Returns the path.
    """
    p = Path(path)
    if p.exists():
        if p.is_dir():
            raise OutputError(f"{p}: is a directory; cannot write the report there")
        if not os.access(p, os.W_OK):
            raise OutputError(f"{p}: report file is not writable")
        return p
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{p}: folder {str(parent)!r} for the report does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: folder {str(parent)!r} for the report is not writable")
    return p
