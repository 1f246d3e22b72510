"""A new user's first hour: help at 80 columns, one-line usage errors, quiet reasons, results
that print well, PyTorch files in every command, in-place folding."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnfold.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
COMMANDS = ("fold", "inspect", "check", "verify", "bench")


def _runner() -> CliRunner:
    try:  # click < 8.2 separates stderr only when asked
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


runner = _runner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


# --- help at 80 columns ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_readable_at_80_columns(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = invoke(command, "--help", terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.output
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for junk in ("…", "<bool>", "{models}", "<list[", "<path>", "<int", "<float", "╭", "│"):
        assert junk not in text, (junk, text)
    # Every option name and every environment variable is printed in full.
    from typer.main import get_command

    cmd = get_command(app).commands[command]
    for param in cmd.params:
        for name in (*param.opts, *getattr(param, "secondary_opts", ())):
            if name.startswith("-"):
                assert re.search(rf"(^|[\s,/]){re.escape(name)}(\s|,|$)", text, re.M), name
        envvar = getattr(param, "envvar", None)
        if envvar:
            assert envvar in text.replace("\n", " ").replace("  ", " "), envvar


def test_bench_help_names_the_plot_extra_and_speaks_of_timing():
    text = invoke("bench", "--help", terminal_width=80).output
    flat = " ".join(text.split())
    assert "[plot]" in flat
    assert "verification" not in flat  # bench's options say what they do for timing


@pytest.mark.parametrize(
    "args",
    [("fold", "--bogus", "x.onnx"), ("fold",), ("fold", "x.onnx", "-j", "0"), ("nosuchcommand",)],
)
def test_usage_errors_are_one_line_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
    assert "Traceback" not in result.output


# --- -q keeps the reasons --------------------------------------------------------------------------


def test_quiet_batch_names_the_failing_model_and_why(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(SAMPLES / "cnn2d.onnx", models / "good.onnx")
    (models / "bad.onnx").write_bytes(b"not a model")
    result = invoke("fold", models, "-O", tmp_path / "out", "-q")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1] == "FAILED"
    reasons = lines[:-1]
    assert len(reasons) == 1, lines
    assert "bad.onnx" in reasons[0] and "not a valid ONNX model" in reasons[0]
    assert "good.onnx" not in result.output  # quiet: nothing about the model that passed


def test_quiet_strict_names_the_kept_batchnorm(tmp_path):
    from helpers import write_unfoldable_model

    model = tmp_path / "kept.onnx"
    write_unfoldable_model(model)
    result = invoke("fold", model, "-o", tmp_path / "k.onnx", "--strict", "-q")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1] == "FAILED (--strict and 1 BatchNormalization kept)"
    assert len(lines) == 2 and "--strict" in lines[0] and "unsupported_producer" in lines[0]


def test_quiet_verification_failure_names_the_output(tmp_path, monkeypatch):
    from bnfold import numerics

    real = numerics.fold_conv
    monkeypatch.setattr(numerics, "fold_conv", lambda w, s: real(w, s) * 1.01)
    model = tmp_path / "cnn2d.onnx"
    shutil.copy(SAMPLES / "cnn2d.onnx", model)
    result = invoke("fold", model, "-o", tmp_path / "o.onnx", "-q")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1] == "FAILED (verification failed)"
    assert "verification failed: logits" in lines[0] and "max abs error" in lines[0]


# --- PyTorch files: every command reads them, torch's warnings stay out of the output -------------


def _torch_net():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            y = self.bn(self.conv(x)).relu()
            if y.shape[0] > 0:  # a Python branch on a shape: torch's tracer warns about it
                y = y.mean((2, 3))
            return self.fc(y)

    return torch, Net().eval(), torch.randn(1, 3, 8, 8)


@pytest.fixture
def pt2(tmp_path) -> Path:
    torch, net, x = _torch_net()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    return path


@pytest.mark.torch
def test_inspect_and_check_read_a_pt2_file_as_fold_does(pt2, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    inspected = invoke("inspect", pt2, "--json", "-")
    assert inspected.exit_code == 0, inspected.output
    import json

    report = json.loads(inspected.stdout)
    assert report["input"] == str(pt2)
    assert [(b["status"], b["target_op"]) for b in report["batchnorms"]] == [("folded", "Conv")]
    checked = invoke("check", pt2)
    assert checked.exit_code == 1, checked.output  # one foldable BN left: the gate fails
    assert "1 foldable" in checked.output and "protobuf" not in checked.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it


@pytest.mark.torch
def test_inspect_torchscript_without_shapes_is_one_line(tmp_path):
    torch, net, x = _torch_net()
    path = tmp_path / "net.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, (x,)), str(path))
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--input-shape x=" in result.stderr
    assert invoke("inspect", path, "--input-shape", "x=1,3,8,8").exit_code == 0


@pytest.mark.torch
def test_torch_warnings_are_logged_at_debug_not_printed(tmp_path, caplog):
    import logging

    import bnfold.torch

    _, net, x = _torch_net()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with caplog.at_level(logging.DEBUG, logger="bnfold.torch"):
            result = bnfold.torch.export(net, (x,), tmp_path / "net.onnx")
    assert result
    assert [str(w.message) for w in seen] == []  # nothing reaches the user's terminal
    assert "torch.onnx.export: " in caplog.text  # torch's warnings are in the log instead


# --- a model without BatchNormalization ------------------------------------------------------------


def _no_bn_model(path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        [numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_no_batchnorm_says_why_and_does_not_verify_a_copy(tmp_path, monkeypatch):
    import bnfold.compare

    def no_verification(*args, **kwargs):
        raise AssertionError("an unchanged copy was verified")

    monkeypatch.setattr(bnfold.compare, "verify_models", no_verification)
    model = tmp_path / "plain.onnx"
    _no_bn_model(model)
    result = invoke("fold", model, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"bnfold: {model}"  # the header every run prints
    text = " ".join(result.output.split())
    assert "both torch.onnx exporters fold Conv+BN" in text
    assert "Verification not needed: no BatchNormalization was found" in text
    assert lines[-1] == "PASSED" and (tmp_path / "out.onnx").exists()


def test_verification_row_shows_what_the_pass_rule_compares(tmp_path):
    import json

    model = tmp_path / "cnn2d.onnx"
    shutil.copy(SAMPLES / "cnn2d.onnx", model)
    result = invoke("fold", model, "-o", tmp_path / "o.onnx")
    header = next(
        line for line in result.output.splitlines() if "output" in line and "dtype" in line
    )
    cells = [c.strip() for c in re.split(r"[┃│|]", header) if c.strip()]
    assert cells == ["output", "dtype", "max abs", "noise floor", "allowed", "margin", "result"]
    row = next(
        line for line in result.output.splitlines() if line.startswith(("│ logits", "| logits"))
    )
    values = [c.strip() for c in re.split(r"[┃│|]", row) if c.strip()]
    report = json.loads(invoke("fold", model, "-o", tmp_path / "p.onnx", "--json", "-").stdout)
    entry = report["verification"]["outputs"][0]
    # The row shows the quantities the pass rule compares: error <= allowed, margin >= 1, pass.
    error, allowed = float(values[2]), float(values[4].lstrip("≤ "))
    assert error == pytest.approx(entry["max_abs_error"], rel=1e-2, abs=1e-12)
    assert allowed == pytest.approx(entry["threshold"], rel=1e-2)
    assert error <= allowed and values[6] == "pass"
    assert values[5] == "exact" or float(values[5].rstrip("x")) >= 1


def test_bench_note_speaks_of_conv_bn_fusion_only_for_conv_bn_models(tmp_path):
    from bnfold.latency.results import LEVEL_NOTE, level_note

    plain = tmp_path / "plain.onnx"
    _no_bn_model(plain)
    conv_bn = str(SAMPLES / "cnn2d.onnx")
    gemm_bn = str(SAMPLES / "mlp_bn.onnx")
    assert level_note([conv_bn, str(plain)]) == LEVEL_NOTE
    assert "Conv+BatchNormalization by itself" in LEVEL_NOTE
    assert "does not fuse" in level_note([gemm_bn, str(plain)])
    assert "BatchNormalization by itself" not in level_note([str(plain)])
    assert "holds a BatchNormalization" in level_note([str(plain)])


def test_plot_zooms_each_level_to_its_data_and_marks_outliers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import numpy as np
    from matplotlib.figure import Figure

    from bnfold.latency import BenchResult, LatencyStats, ModelBench, plot

    rng = np.random.default_rng(0)

    def samples(scale: float, outlier: float | None = None) -> LatencyStats:
        values = rng.lognormal(0, 0.05, 100) * scale
        if outlier is not None:
            values[0] = outlier
        return LatencyStats.from_samples(values)

    result = BenchResult(
        entries=(
            ModelBench("a", "disable", samples(7.0)),
            ModelBench("b", "disable", samples(6.5)),
            ModelBench("a", "all", samples(0.1, outlier=7.0)),
            ModelBench("b", "all", samples(0.1)),
        ),
        ratios=(),
        levels=("disable", "all"),
        threads=1,
        provider="CPUExecutionProvider",
        models=("a", "b"),
    )
    saved: list[Figure] = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda self, *a, **k: (saved.append(self), real_savefig(self, *a, **k))
    )
    plot(result, tmp_path / "latency.png")
    disable_axis, all_axis = saved[0].axes[:2]
    assert all_axis.get_ylim()[1] < 0.2  # 0.1 ms medians on a 0.1 ms axis, not a 7 ms one
    assert disable_axis.get_ylim()[0] > 5.0
    markers = [line for line in all_axis.get_lines() if line.get_marker() == "^"]
    assert len(markers) == 1  # the 7 ms run of model a, on the top edge
    assert any("1 above" in t.get_text() for t in all_axis.texts)


# --- progress ------------------------------------------------------------------------------------


def test_single_fold_progress_shows_each_phase_with_sizes(tmp_path):
    import io

    from rich.console import Console

    import bnfold
    from bnfold.cli._shared import Progress

    model = tmp_path / "cnn2d.onnx"
    shutil.copy(SAMPLES / "cnn2d.onnx", model)
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    progress = Progress(console, enabled=True, model=model, output=tmp_path / "out.onnx")
    with progress as update:
        assert bnfold.fold(model, tmp_path / "out.onnx", progress=update)
        tasks = list(progress._bar.tasks)
    labels = [t.description for t in tasks]
    size = model.stat().st_size
    assert labels[0] == f"loading cnn2d.onnx ({size / 1e6:.1f} MB)", (labels, size)
    assert [label.split()[0] for label in labels] == ["loading", "folding", "writing", "verifying"]
    assert "0/1" not in " ".join(t.fields["count"] for t in tasks)  # no "verifying 0/1"
    assert all(t.completed == t.total for t in tasks)  # every phase ended


def test_batch_reports_the_models_in_flight_before_they_finish(tmp_path):
    from bnfold.batch import fold_many

    tasks = []
    for name in ("a", "b"):
        shutil.copy(SAMPLES / "cnn2d.onnx", tmp_path / f"{name}.onnx")
        tasks.append((tmp_path / f"{name}.onnx", tmp_path / "out" / f"{name}.onnx"))
    events: list[tuple[str, ...]] = []
    fold_many(
        tasks,
        on_running=lambda inputs: events.append(("running", *(Path(i).name for i in inputs))),
        on_done=lambda item, done, n: events.append(("done", Path(item.input).name)),
    )
    assert events == [
        ("running", "a.onnx"),
        ("done", "a.onnx"),
        ("running", "b.onnx"),
        ("done", "b.onnx"),
    ]


# --- in place, and the pre-commit story ----------------------------------------------------------


def _hooks() -> dict[str, str]:
    """``{hook id: entry}`` from .pre-commit-hooks.yaml (a flat list of mappings)."""
    hooks, current = {}, None
    for line in (ROOT / ".pre-commit-hooks.yaml").read_text().splitlines():
        if line.startswith("- id: "):
            current = line[len("- id: ") :].strip()
        elif line.strip().startswith("entry: ") and current:
            hooks[current] = line.strip()[len("entry: ") :]
    return hooks


def test_pre_commit_check_says_how_to_fix_and_the_fold_hook_fixes_it(tmp_path, monkeypatch):
    import shlex

    hooks = _hooks()
    assert set(hooks) == {"bnfold-check", "bnfold-fold"}
    monkeypatch.chdir(tmp_path)
    shutil.copy(SAMPLES / "cnn2d.onnx", "cnn2d.onnx")
    _no_bn_model(tmp_path / "plain.onnx")
    plain_bytes = (tmp_path / "plain.onnx").read_bytes()
    files = ["cnn2d.onnx", "plain.onnx"]

    def hook(name: str):
        return invoke(*shlex.split(hooks[name])[1:], *files)

    flagged = hook("bnfold-check")
    assert flagged.exit_code == 1
    assert "to fix: bnfold fold --in-place cnn2d.onnx" in flagged.output
    fixed = hook("bnfold-fold")
    assert fixed.exit_code == 0 and fixed.output.strip() == "PASSED", fixed.output
    assert (tmp_path / "plain.onnx").read_bytes() == plain_bytes  # nothing folded: untouched
    assert hook("bnfold-check").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no staging or data left over


def test_in_place_with_external_data_replaces_model_and_data(tmp_path):
    import onnx
    from helpers import random_feeds, run_ort

    proto = onnx.load(SAMPLES / "cnn2d.onnx")
    feeds = random_feeds(proto)
    expected = run_ort(proto, feeds)
    model = tmp_path / "m.onnx"
    onnx.save(proto, model, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    result = invoke("fold", model, "--in-place")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert (
        len(names) == 2
        and names[0] == "m.onnx"
        and re.fullmatch(r"m\.onnx\.[0-9a-f]{8}\.data", names[1])
    )
    folded = onnx.load(model)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    for got, want in zip(run_ort(folded, feeds), expected, strict=True):
        assert abs(got - want).max() < 1e-4


def test_in_place_leaves_the_file_untouched_when_verification_fails(tmp_path, monkeypatch):
    from bnfold import numerics

    real = numerics.fold_conv
    monkeypatch.setattr(numerics, "fold_conv", lambda w, s: real(w, s) * 1.01)
    model = tmp_path / "cnn2d.onnx"
    shutil.copy(SAMPLES / "cnn2d.onnx", model)
    before = model.read_bytes()
    result = invoke("fold", model, "--in-place", "-q")
    assert result.exit_code == 1
    assert "verification failed" in result.output
    assert model.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cnn2d.onnx"]


@pytest.mark.parametrize(
    "args, text",
    [
        (("--in-place", "--no-verify"), "without verification"),
        (("--in-place", "-o", "x.onnx"), "takes no -o"),
        (("-o", "out.txt"), "ending in .onnx"),
    ],
)
def test_in_place_and_output_name_refusals(tmp_path, args, text):
    model = tmp_path / "cnn2d.onnx"
    shutil.copy(SAMPLES / "cnn2d.onnx", model)
    before = model.read_bytes()
    result = invoke("fold", model, *args)
    assert result.exit_code == 2 and text in result.stderr, result.output
    assert model.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cnn2d.onnx"]


# --- results that print well ---------------------------------------------------------------------


def test_results_have_one_line_reprs_and_markdown(tmp_path):
    import bnfold
    from bnfold.batch import fold_many

    model = tmp_path / "cnn2d.onnx"
    shutil.copy(SAMPLES / "cnn2d.onnx", model)
    folded = bnfold.fold(model, tmp_path / "f.onnx")
    assert repr(folded).startswith("FoldResult: PASSED, 2/2 folded, max abs err ")
    assert repr(folded.report).startswith("FoldReport: PASSED, 2/2 folded")
    assert repr(folded.verification).startswith("VerificationResult: passed, 1 output, max abs")
    bench = bnfold.bench([model, tmp_path / "f.onnx"], runs=5, levels=("disable",), warmup=1)
    assert repr(bench).startswith("BenchResult: 2 models x 1 levels; f.onnx/cnn2d.onnx ")
    located = bnfold.localize(model, tmp_path / "f.onnx")
    assert repr(located).startswith("LocalizeResult: none: ")
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    batch = fold_many(
        [(model, tmp_path / "o" / "a.onnx"), (tmp_path / "bad.onnx", tmp_path / "o" / "b.onnx")]
    )
    assert repr(batch).startswith("BatchResult: FAILED, 2 models: 1 passed, 0 failed, 1 error, ")
    for result in (folded, folded.report, folded.verification, bench, located, batch):
        text = repr(result)
        assert "\n" not in text and len(text) <= 200, text
        assert result._repr_markdown_().strip()
    assert folded.report.to_markdown().startswith("### bnfold fold: PASSED")


def test_repr_of_a_failed_fold_says_why(tmp_path, monkeypatch):
    import bnfold
    from bnfold import numerics

    real = numerics.fold_conv
    monkeypatch.setattr(numerics, "fold_conv", lambda w, s: real(w, s) * 1.01)
    result = bnfold.fold(SAMPLES / "cnn2d.onnx", tmp_path / "f.onnx")
    assert repr(result).startswith("FoldResult: FAILED, 2/2 folded, max abs err ")
    assert repr(result).endswith("verification failed, not written")
    assert repr(result.verification).startswith("VerificationResult: FAILED, 1/1 outputs differ")


@pytest.mark.torch
def test_module_fold_result_repr(tmp_path):
    import bnfold.torch

    torch, _, x = _torch_net()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    result = bnfold.torch.fold_module(net, (x,))
    assert repr(result).startswith("ModuleFoldResult: PASSED, 1/1 folded, max abs err ")
    assert len(repr(result)) < 120


def test_quiet_check_and_verify_name_what_failed(tmp_path):
    model = tmp_path / "cnn2d.onnx"
    shutil.copy(SAMPLES / "cnn2d.onnx", model)
    checked = invoke("check", model, "-q")
    assert checked.exit_code == 1
    lines = checked.output.strip().splitlines()
    assert lines[-1] == "FAILED" and len(lines) == 2
    assert "2 foldable BatchNorm(s) left (/1/BatchNormalization, /4/BatchNormalization)" in lines[0]
    assert f"to fix: bnfold fold --in-place {model}" in lines[0]
    other = tmp_path / "plain.onnx"
    _no_bn_model(other)
    verified = invoke("verify", model, other, "-q")
    assert verified.exit_code == 1
    lines = verified.output.strip().splitlines()
    assert lines[-1] == "FAILED" and len(lines) == 2 and "verification failed" in lines[0]


def test_a_dry_run_says_so_in_its_repr():
    """bnfold.inspect verifies and writes nothing: its report is a dry run, not a failure."""
    import bnfold

    report = bnfold.inspect(str(SAMPLES / "cnn2d.onnx"))
    assert repr(report).startswith("FoldReport: DRY RUN, 2/2 folded, not verified")
