"""The ``bnfold`` command line (entry point ``bnfold.cli:main``).

* :mod:`bnfold.cli.app` -- the typer app, root callback, error guard and ``main``;
* :mod:`bnfold.cli.options` -- the shared typer options, each defined once;
* :mod:`bnfold.cli.commands` -- one module per command (fold, inspect, check, verify, bench);
* ``_shared`` -- console, JSON/Markdown output, path checks and the progress bar.
"""

from __future__ import annotations

__all__ = ["app", "main"]

from .app import EXIT_BUG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, app, main  # noqa: F401
