"""What the commands share: the console, JSON and Markdown output, path checks, small parsers and
the progress bar. Nothing here decides anything about models."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def console_for(json_to_stdout: bool):
    """Human output goes to stderr when stdout carries JSON, so a pipeline can parse stdout; off a
    terminal (CI logs) plain, unwrapped lines."""
    from bnfold.render.console import make_console

    return make_console(stderr=json_to_stdout)


def check_report_paths(json_out: str | None, markdown: Path | None) -> None:
    """Every report destination (--json, --markdown, $GITHUB_STEP_SUMMARY) must be writable before
    anything is written, so exit 2 always means nothing was written (issue 15)."""
    import os

    from bnfold.io import check_report_path

    for target in (
        json_out if json_out and json_out != "-" else None,
        markdown,
        os.environ.get("GITHUB_STEP_SUMMARY") or None,
    ):
        if target is not None:
            check_report_path(target)


def write_json(payload: dict, dest: str) -> None:
    text = json.dumps(payload, indent=2, allow_nan=False, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        from bnfold.errors import OutputError

        try:
            Path(dest).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(
                f"{dest}: cannot write the JSON report ({exc.strerror or exc})"
            ) from None


_MODEL_SUFFIXES = (".onnx", ".pt2", ".pt", ".pth", ".ts", ".torchscript")


def default_output(model: Path) -> Path:
    name = model.name
    for suffix in _MODEL_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return model.with_name(f"{name}.folded.onnx")


def parse_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    from bnfold.errors import UsageError

    try:
        low, high = (float(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"malformed --range {text!r}: expected LOW,HIGH, e.g. -1,1") from None
    return low, high


def parse_tolerances(specs: list[str] | None) -> dict[str, tuple[float, float]]:
    from bnfold.errors import UsageError

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


def write_markdown(text: str, dest: Path | None) -> None:
    """Write Markdown to ``dest`` and append it to $GITHUB_STEP_SUMMARY when that is set."""
    import os

    from bnfold.errors import OutputError

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


def check_model_path(path: Path) -> None:
    from bnfold.errors import InputNotFoundError

    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise InputNotFoundError(f"{path}: is a directory, not an ONNX file")


def summary_env() -> bool:
    import os

    return bool(os.environ.get("GITHUB_STEP_SUMMARY"))


def _size(path: Path) -> str:
    """``"12.3 MB"``: the file and the external data beside it that it names, roughly."""
    try:
        n = path.stat().st_size
    except OSError:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "?"  # pragma: no cover


class Progress:
    """Phases of one fold on a terminal: loading (with the file's size), folding, writing (tensors
    written / total), verifying, timing; each phase shows its elapsed time. Silent when not on a
    terminal. A PyTorch input shows one phase: exporting, folding and verifying run in torch."""

    _LABELS = {
        "load": "loading {model} ({size})",
        "fold": "folding {model}",
        "save": "writing {output}",
        "verify": "verifying {output} against {model} (ONNX Runtime)",
        "bench": "timing original and folded",
    }

    def __init__(
        self, console, enabled: bool, model: Path | None = None, output: Path | None = None
    ) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._names = {"model": "model", "output": "output", "size": "?"}
        if model is not None:
            from bnfold.render.text import inert_markup

            self._names["model"] = inert_markup(model.name)
            self._names["size"] = _size(model)
        if output is not None:
            from bnfold.render.text import inert_markup

            self._names["output"] = inert_markup(output.name)
        self._model = model

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._bar.__enter__()
        from bnfold.batch import is_torch_input

        if self._model is not None:
            self.update("torch" if is_torch_input(self._model) else "load", 0, 1)
        return self.update

    def update(self, phase: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if phase not in self._tasks:
            for other in self._tasks.values():  # a new phase: the earlier ones are over
                self._bar.update(other, completed=self._bar.tasks[other].total)
            template = self._LABELS.get(phase, "exporting, folding and verifying {model} ({size})")
            label = (
                template.format(**self._names)
                if phase in self._LABELS or phase == "torch"
                else phase
            )
            self._tasks[phase] = self._bar.add_task(label, total=total, count="")
        count = "" if total <= 1 else f"{done}/{total}" + (" tensors" if phase == "save" else "")
        self._bar.update(self._tasks[phase], completed=done, total=total, count=count)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def batch_bar(console, total: int):  # noqa: ANN201 - rich.progress.Progress, started
    """A started rich progress bar over ``total`` models (the caller stops it)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as RichProgress

    bar = RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    bar.start()
    bar.add_task(f"folding {total} models", total=total)
    return bar
