"""Batch folding, the read-only check gate, Markdown for CI summaries, and the CI recipe in the README."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from helpers import write_unfoldable_model
from typer.testing import CliRunner

from bnfold.batch import expand_inputs
from bnfold.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def tree(tmp_path) -> Path:
    """models/{cnn1d,kept_bn}.onnx, models/sub/{mlp_bn,broken}.onnx (kept_bn: a BN nothing can fold)."""
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "cnn1d.onnx", models / "cnn1d.onnx")
    write_unfoldable_model(models / "kept_bn.onnx")
    shutil.copy(SAMPLES / "mlp_bn.onnx", models / "sub" / "mlp_bn.onnx")
    (models / "sub" / "broken.onnx").write_bytes(b"this is not a model")
    return tmp_path


def test_expand_inputs_mirrors_layout_and_accepts_globs(tree):
    found = expand_inputs([tree / "models"])
    assert [str(rel) for _, rel in found] == [
        "cnn1d.onnx",
        "kept_bn.onnx",
        "sub/broken.onnx",
        "sub/mlp_bn.onnx",
    ]
    globbed = expand_inputs([str(tree / "models" / "*.onnx")])
    assert [p.name for p, _ in globbed] == ["cnn1d.onnx", "kept_bn.onnx"]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_batch_with_a_failing_model_in_the_middle(tree, jobs):
    out = tree / "out"
    result = invoke("fold", tree / "models", "-O", out, "--jobs", jobs, "--json", "-")
    assert result.exit_code == 2, result.output  # the worst result: one bad input
    report = json.loads(result.stdout)
    assert [Path(m["input"]).name for m in report["models"]] == [
        "cnn1d.onnx",
        "kept_bn.onnx",
        "broken.onnx",
        "mlp_bn.onnx",
    ]
    broken = report["models"][2]
    assert broken["exit_code"] == 2 and "not a valid ONNX model" in broken["error"]
    assert all(m["passed"] for k, m in enumerate(report["models"]) if k != 2)
    assert (out / "cnn1d.onnx").exists() and (out / "sub" / "mlp_bn.onnx").exists()
    assert not (out / "sub" / "broken.onnx").exists()


def test_batch_output_in_ci_logs_is_plain_lines(tree):
    result = invoke(
        "fold",
        tree / "models" / "cnn1d.onnx",
        tree / "models" / "sub" / "mlp_bn.onnx",
        "-O",
        tree / "o",
    )
    assert result.exit_code == 0, result.output
    assert "[1/2] " in result.output and "[2/2] " in result.output
    assert "\x1b[" not in result.output  # no colours or cursor movement when not a terminal
    assert result.output.strip().splitlines()[-1] == "PASSED"


def test_output_option_takes_one_model(tree):
    result = invoke("fold", tree / "models", "-o", tree / "x.onnx")
    assert result.exit_code == 2 and "-O/--output-dir" in result.stderr


def test_check_exit_codes_and_allow_list(tree, tmp_path):
    model = tree / "models" / "cnn1d.onnx"
    before = model.read_bytes()
    result = invoke("check", model, "--json", "-")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    foldable = report["models"][0]["foldable"]
    assert [f["target_op"] for f in foldable] == ["Conv", "Conv"]
    assert model.read_bytes() == before and sorted(p.name for p in model.parent.iterdir()) == [
        "cnn1d.onnx",
        "kept_bn.onnx",
        "sub",
    ]  # read-only

    assert invoke("check", model, "--allow", "2").exit_code == 0
    assert invoke("check", model, "--allow", "1").exit_code == 1
    names = [f["name"] for f in foldable]
    allowed = sum((["--allow-node", n] for n in names), [])
    assert invoke("check", model, *allowed).exit_code == 0
    assert (
        invoke("check", tree / "models" / "kept_bn.onnx").exit_code == 0
    )  # kept BNs are not foldable
    assert invoke("check", tree / "models" / "sub" / "broken.onnx").exit_code == 2


def test_check_against_original(tree):
    folded = tree / "folded.onnx"
    assert invoke("fold", tree / "models" / "cnn1d.onnx", "-o", folded, "-q").exit_code == 0
    ok = invoke("check", folded, "--against", tree / "models" / "cnn1d.onnx")
    assert ok.exit_code == 0, ok.output
    wrong = invoke("check", folded, "--against", tree / "models" / "kept_bn.onnx")
    assert wrong.exit_code == 1


def test_markdown_outputs_and_step_summary(tree, tmp_path):
    summary = tmp_path / "summary.md"
    md = tmp_path / "fold.md"
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    result = invoke(
        "fold", tree / "models" / "kept_bn.onnx", "-o", tree / "k.onnx", "--markdown", md, env=env
    )
    assert result.exit_code == 0
    text = md.read_text()
    assert "### bnfold fold: PASSED" in text and "unsupported_producer" in text and "Relu" in text
    check = invoke("check", tree / "models" / "cnn1d.onnx", env=env)
    assert check.exit_code == 1
    combined = summary.read_text()
    assert "### bnfold fold: PASSED" in combined and "### bnfold check: FAILED" in combined
    assert "/1/BatchNormalization" in combined


def test_environment_variables(tree):
    model = tree / "models" / "kept_bn.onnx"
    result = invoke("fold", model, "-o", tree / "k.onnx", env={"BNFOLD_STRICT": "1"})
    assert result.exit_code == 1  # BNFOLD_STRICT is --strict
    help_text = invoke("fold", "--help").output
    assert "BNFOLD_STRICT" in help_text and "BNFOLD_JOBS" in help_text


def test_pre_commit_hook_definition():
    text = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert (
        "id: bnfold-check" in text and "entry: bnfold check" in text and r"files: \.onnx$" in text
    )


def _readme_ci_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- ci-example -->")[1]
    return [m.group(1).strip() for m in re.finditer(r"^\s*- run: (bnfold .+)$", block, re.M)]


def test_the_readme_ci_recipe_runs(tmp_path, monkeypatch):
    """Runs exactly the bnfold commands of the README's GitHub Actions example."""
    commands = _readme_ci_commands()
    assert len(commands) >= 3
    (tmp_path / "models").mkdir()
    for name in ("cnn2d", "mlp_bn", "decoder_convtranspose"):
        shutil.copy(SAMPLES / f"{name}.onnx", tmp_path / "models" / f"{name}.onnx")
    monkeypatch.chdir(tmp_path)
    summary = tmp_path / "summary.md"
    for command in commands:
        args = shlex.split(command)[1:]
        result = invoke(*args, env={"GITHUB_STEP_SUMMARY": str(summary)})
        assert result.exit_code == 0, (command, result.output)
    assert json.loads((tmp_path / "bnfold-report.json").read_text())["passed"] is True
    assert "bnfold fold: PASSED" in summary.read_text()
