"""The README as a user runs it: every fenced shell command and Python snippet, as written.

Blocks are read from README.md: ``sh`` blocks (commands joined by ``&&`` are run one by one),
``$ ``-prefixed lines of plain blocks, and ``python`` blocks, in a temporary folder that holds a
copy of ``sample_models/`` (and ``broken.onnx``, the perturbed model the ``verify --localize``
example names). ``bnfold`` commands run through the CLI (CliRunner); Python blocks run with
``exec``. Steps that install software (``python3 -m venv``, activating it, ``pip install``) and the
test command itself are not run here: ``.ci/run`` runs them in a fresh environment. The GitHub
Actions recipe is run by ``tests/test_batch.py::test_the_readme_ci_recipe_runs``.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnfold.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Install steps, the test command and the development checks: .ci/run runs each of them as written.
_INSTALL_STEPS = (
    "python3 -m venv ",
    ". .venv/bin/activate",
    "pip install ",
    "python -m pytest",
    "ruff check .",
    "ruff format --check .",
    "mypy",
)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(README) if lang == language]


def _shell_commands() -> list[tuple[str, int]]:
    """``(command, expected exit code)``: a ``$`` example whose shown output ends in FAILED
    expects 1, every other command 0."""
    found: list[tuple[str, int]] = []
    for body in _blocks("sh"):
        for line in body.splitlines():
            for command in line.split("&&"):
                if command.strip():
                    found.append((command.strip(), 0))
    for body in _blocks(""):
        lines = body.strip().splitlines()
        for k, line in enumerate(lines):
            if line.startswith("$ "):
                rest = [x for x in lines[k + 1 :] if x.strip()]
                found.append((line[2:], 1 if rest and rest[-1].startswith("FAILED") else 0))
    return found


COMMANDS = _shell_commands()
RUNNABLE = [(c, code) for c, code in COMMANDS if not c.startswith(_INSTALL_STEPS)]


def test_the_readme_has_commands_and_snippets_to_run():
    assert any(c.startswith("bnfold fold") for c, _ in RUNNABLE)
    assert any(c.startswith("bnfold verify") for c, _ in RUNNABLE)
    assert len(_blocks("python")) >= 2
    # Nothing is skipped silently: every command is either run or a named install step.
    assert all(c.startswith(("bnfold ", *_INSTALL_STEPS)) for c, _ in COMMANDS), COMMANDS


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    import onnx
    from onnx import numpy_helper

    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    # broken.onnx: "one folded weight perturbed by 0.5", as the verify example says.
    import bnfold

    folded = bnfold.fold(onnx.load(ROOT / "sample_models" / "cnn2d.onnx")).model
    init = next(i for i in folded.graph.initializer if len(i.dims) == 4)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(folded, tmp_path / "broken.onnx")
    # cnn2d.folded.onnx: what the README's first command writes, which later examples read.
    bnfold.fold(str(tmp_path / "sample_models" / "cnn2d.onnx"), str(tmp_path / "cnn2d.folded.onnx"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command, expected", RUNNABLE, ids=[c for c, _ in RUNNABLE])
def test_readme_command_runs_as_written(workdir, command, expected):
    args = shlex.split(command, comments=True)
    assert args[0] == "bnfold"
    result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == expected, (command, result.output)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_snippet_runs_as_written(workdir, index):
    code = _blocks("python")[index]
    if re.search(r"^import torch\b", code, re.M):
        pytest.importorskip("torch")
    if "tcp://scheduler:8786" in code:  # the Dask example: run it on a real cluster on loopback
        _run_on_local_cluster(code, workdir, index)
        return
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def _run_on_local_cluster(code: str, workdir: Path, index: int) -> None:
    """The README's Dask snippet as written, with its scheduler address pointing at an in-process
    LocalCluster on 127.0.0.1 and its shared folders at this test's sample models."""
    distributed = pytest.importorskip("distributed")
    code = code.replace("/shared/models", str(workdir / "sample_models"))
    code = code.replace("/shared/folded", str(workdir / "folded"))
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        code = code.replace("tcp://scheduler:8786", cluster.scheduler_address)
        exec(
            compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"}
        )
    assert sorted(p.name for p in (workdir / "folded").glob("*.onnx")) == sorted(
        p.name for p in (workdir / "sample_models").glob("*.onnx")
    )


def test_readme_pre_commit_hook_ids_exist():
    hooks = (ROOT / ".pre-commit-hooks.yaml").read_text()
    shown = re.findall(r"- id: (\S+)", "\n".join(_blocks("yaml")))
    assert {"bnfold-check", "bnfold-fold"} <= set(shown)
    for hook_id in shown:
        assert f"- id: {hook_id}\n" in hooks, hook_id
