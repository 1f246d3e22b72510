"""The verdict end to end (issue 12): inputs that exercise the model, an explicit *unverified*
outcome with its own exit code (4) and final line, the calibrated per-output table, the time
budget, and Ctrl-C/SIGTERM through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from deep_models import corner_tap_pair
from hanging_models import endless_loop, endless_loop_with_bn
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def conv_bn(*, mystery: bool = False, dims: tuple = ("N", 3, 8, 8)) -> onnx.ModelProto:
    """``X -Conv-> c -BN-> Y`` (3x3, padding 1); ``mystery=True`` appends an op of an unknown
    domain, which ONNX Runtime cannot run: bnfold folds around it, but cannot verify."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "v"),
    ]
    last = "y0" if mystery else "Y"
    nodes = [
        helper.make_node("Conv", ["X", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], [last]),
    ]
    opsets = [helper.make_opsetid("", 17)]
    if mystery:
        nodes.append(helper.make_node("Mystery", ["y0"], ["Y"], domain="com.example"))
        opsets.append(helper.make_opsetid("com.example", 1))
    out_dims = ("N", 4, *dims[2:])
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(out_dims))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "bnfold" in p.name)


# --- inputs that exercise the model ----------------------------------------------------------------


def test_corner_tap_bug_fails_verify_and_the_derived_shapes_are_printed(tmp_path):
    model, candidate = corner_tap_pair()
    ref, cand = save(model, tmp_path, "ref.onnx"), save(candidate, tmp_path, "cand.onnx")
    human = runner.invoke(app, ["verify", str(ref), str(cand)])
    assert human.exit_code == 1, human.output
    assert "Inputs: x=[1,4," in human.stdout and "(derived)" in human.stdout
    assert last_line(human.stdout) == "FAILED"
    data = json.loads(runner.invoke(app, ["verify", str(ref), str(cand), "--json", "-"]).stdout)
    assert data["status"] == "failed" and data["input_shape_origins"] == {"x": "derived"}
    n, c, h, w = data["input_shapes"]["x"]
    assert (n, c) == (1, 4) and h >= 2 and w >= 2  # with padding 1 every tap sees data
    # the same check on the old 1x1 input passes vacuously: only the centre tap is used
    given = runner.invoke(app, ["verify", str(ref), str(cand), "--input-shape", "x=1,4,1,1"])
    assert given.exit_code == 0 and "x=[1,4,1,1] (given)" in given.stdout


def test_fold_check_and_bench_print_the_input_shapes_they_used(tmp_path):
    model, _ = corner_tap_pair()
    path = save(model, tmp_path)
    out = tmp_path / "out.onnx"
    folded = runner.invoke(app, ["fold", str(path), "-o", str(out)])
    assert folded.exit_code == 0, folded.output
    assert "Inputs: x=[1,4," in folded.stdout and "(derived)" in folded.stdout
    report = json.loads(
        runner.invoke(app, ["fold", str(path), "-o", str(out), "--json", "-", "-q"]).stdout
    )
    assert report["verification"]["input_shape_origins"] == {"x": "derived"}
    shape = report["verification"]["input_shapes"]["x"]
    checked = runner.invoke(app, ["check", str(out), "--against", str(path)])
    assert checked.exit_code == 0 and f"x=[{','.join(map(str, shape))}] (derived)" in checked.stdout
    bench = runner.invoke(app, ["bench", str(path), str(out), "--runs", "2", "--warmup", "0"])
    assert bench.exit_code == 0, bench.output
    assert f"Inputs: x=[{','.join(map(str, shape))}] (derived)" in bench.stdout
    timed = json.loads(
        runner.invoke(
            app, ["bench", str(path), "--runs", "1", "--warmup", "0", "--json", "-"]
        ).stdout
    )
    assert timed["input_shapes"]["x"] == shape and timed["input_shape_origins"]["x"] == "derived"


def test_no_exercising_size_is_refused_with_exit_2_asking_for_input_shape(tmp_path):
    # Flatten -> Gemm with K = 3*H*W = 3*7*5 (H != W): no single size S fits both dims
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["X"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["Y"], transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(rng.standard_normal((2, 105)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = save(model, tmp_path)
    result = runner.invoke(app, ["verify", str(path), str(path)])
    assert result.exit_code == 2
    assert "--input-shape" in result.stderr and "Traceback" not in result.output
    ok = runner.invoke(app, ["verify", str(path), str(path), "--input-shape", "X=1,3,7,5"])
    assert ok.exit_code == 0, ok.output


# --- the unverified outcome ------------------------------------------------------------------------


def test_unrunnable_reference_is_unverified_exit_4_and_nothing_written(tmp_path):
    path = save(conv_bn(mystery=True), tmp_path)
    out = tmp_path / "out.onnx"
    result = runner.invoke(app, ["fold", str(path), "-o", str(out)])
    assert result.exit_code == 4, result.output
    line = last_line(result.stdout)
    assert line.startswith("UNVERIFIED: ONNX Runtime cannot run the reference model")
    assert line.endswith("; nothing written (--accept-unverified writes it anyway)")
    assert "PASSED" not in result.stdout
    assert not out.exists() and leftovers(tmp_path) == []
    report = json.loads(
        runner.invoke(app, ["fold", str(path), "-o", str(out), "--json", "-", "-q"]).stdout
    )
    assert report["status"] == "unverified" and report["exit_code"] == 4
    assert report["passed"] is False and report["written"] is False
    assert report["verification"]["status"] == "unverified"
    assert "ONNX Runtime cannot run" in report["unverified_reason"]


def test_strict_never_lets_an_unverified_model_through(tmp_path):
    path = save(conv_bn(mystery=True), tmp_path)
    out = tmp_path / "out.onnx"
    for extra in (["--strict"], ["--strict", "--accept-unverified"]):
        result = runner.invoke(app, ["fold", str(path), "-o", str(out), *extra])
        assert result.exit_code == 4, (extra, result.output)
        assert "--strict refuses unverified output" in last_line(result.stdout)
        assert not out.exists()
    both = runner.invoke(app, ["fold", str(path), "-o", str(out), "--strict", "--no-verify"])
    assert both.exit_code == 2 and "--strict" in both.stderr and not out.exists()


def test_accept_unverified_writes_it_and_says_so(tmp_path, monkeypatch):
    path = save(conv_bn(mystery=True), tmp_path)
    out = tmp_path / "out.onnx"
    result = runner.invoke(app, ["fold", str(path), "-o", str(out), "--accept-unverified"])
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout).startswith(
        "WRITTEN UNVERIFIED: ONNX Runtime cannot run the reference model"
    )
    assert out.exists()
    out.unlink()
    monkeypatch.setenv("BNFOLD_ACCEPT_UNVERIFIED", "1")
    quiet = runner.invoke(app, ["fold", str(path), "-o", str(out), "-q"])
    assert quiet.exit_code == 0 and last_line(quiet.stdout).startswith("WRITTEN UNVERIFIED: ")
    assert out.exists()


def test_no_verify_ends_with_written_unverified_not_passed(tmp_path):
    path = save(conv_bn(), tmp_path)
    out = tmp_path / "out.onnx"
    for extra in ([], ["-q"]):
        result = runner.invoke(app, ["fold", str(path), "-o", str(out), "--no-verify", *extra])
        assert result.exit_code == 0, result.output
        assert last_line(result.stdout) == "WRITTEN UNVERIFIED: --no-verify"
        assert "PASSED" not in result.stdout
    verified = runner.invoke(app, ["fold", str(path), "-o", str(out)])
    assert verified.exit_code == 0 and last_line(verified.stdout) == "PASSED"


def test_verify_and_check_exit_4_when_the_reference_cannot_run(tmp_path):
    path = save(conv_bn(mystery=True), tmp_path)
    verify = runner.invoke(app, ["verify", str(path), str(path)])
    assert verify.exit_code == 4 and last_line(verify.stdout).startswith("UNVERIFIED: ")
    accepted = runner.invoke(app, ["verify", str(path), str(path), "--accept-unverified"])
    assert accepted.exit_code == 0 and "UNVERIFIED (accepted)" in last_line(accepted.stdout)
    out = tmp_path / "out.onnx"
    bnfold.fold(str(path), out, accept_unverified=True)  # nothing left to fold in it
    check = runner.invoke(app, ["check", str(out), "--against", str(path), "--json", "-"])
    assert check.exit_code == 4
    assert json.loads(check.stdout)["models"][0]["verification"]["status"] == "unverified"


def test_api_results_are_truthy_only_when_verified(tmp_path):
    mystery = save(conv_bn(mystery=True), tmp_path, "mystery.onnx")
    plain = save(conv_bn(), tmp_path, "plain.onnx")
    out = tmp_path / "out.onnx"
    unverified = bnfold.fold(str(mystery), out)
    assert not unverified and unverified.status == "unverified" and not out.exists()
    assert unverified.report.exit_code == 4
    accepted = bnfold.fold(str(mystery), out, accept_unverified=True)
    assert not accepted and accepted.status == "unverified" and out.exists()
    assert accepted.report.exit_code == 0
    skipped = bnfold.fold(str(plain), tmp_path / "p.onnx", verify=False)
    assert not skipped and skipped.status == "unverified" and skipped.report.exit_code == 0
    verified = bnfold.fold(str(plain), tmp_path / "p.onnx")
    assert verified and verified.status == "passed"
    with pytest.raises(UsageError, match="--strict"):
        bnfold.fold(str(plain), verify=False, strict=True)


# --- calibrated equality in the table --------------------------------------------------------------


def test_table_shows_noise_floor_allowed_and_margin_consistently(tmp_path):
    model, _ = corner_tap_pair()
    path = save(model, tmp_path)
    out = tmp_path / "out.onnx"
    report = json.loads(
        runner.invoke(app, ["fold", str(path), "-o", str(out), "--json", "-", "-q"]).stdout
    )
    (o,) = report["verification"]["outputs"]
    assert o["mode"] == "calibrated" and o["passed"] is True
    assert o["noise"] > 0 and set(o["noise_sources"]) >= {"ort_basic", "weight_ulp", "dtype_floor"}
    assert o["max_abs_error"] <= o["threshold"] and (o["margin"] is None or o["margin"] >= 1)
    human = runner.invoke(app, ["verify", str(path), str(out)])
    header = next(line for line in human.stdout.splitlines() if "noise floor" in line)
    assert "margin" in header and "allowed" in header
    row = next(line for line in human.stdout.splitlines() if line.lstrip("│| ").startswith("y "))
    assert "pass" in row and "≤" in row
    # --atol/--rtol judge element-wise, exactly as given, and the table says so
    tol = runner.invoke(app, ["verify", str(path), str(out), "--atol", "0", "--rtol", "0"])
    assert "atol 0 + rtol 0" in tol.stdout or "exact" in tol.stdout


def test_a_calibrated_failure_row_contradicts_nothing(tmp_path):
    model, candidate = corner_tap_pair()
    ref, cand = save(model, tmp_path, "r.onnx"), save(candidate, tmp_path, "c.onnx")
    result = bnfold.verify(str(ref), str(cand))
    (o,) = result.outputs
    assert result.status == "failed" and not o.passed
    assert o.max_abs_error > o.threshold and o.margin < 1 and o.mismatched > 0


# --- bounded and cancellable -----------------------------------------------------------------------


def test_fold_of_a_hanging_model_is_unverified_after_its_time_budget(tmp_path):
    path = save(endless_loop_with_bn(), tmp_path)
    out = tmp_path / "out.onnx"
    result = runner.invoke(app, ["fold", str(path), "-o", str(out), "--verify-timeout", "1"])
    assert result.exit_code == 4, result.output
    assert "time budget of 1 s" in last_line(result.stdout)
    assert not out.exists() and leftovers(tmp_path) == []


def test_verify_and_bench_of_a_hanging_model_end_with_exit_4(tmp_path):
    path = save(endless_loop(), tmp_path)
    verify = runner.invoke(app, ["verify", str(path), str(path), "--verify-timeout", "0.5"])
    assert verify.exit_code == 4 and "time budget of 0.5 s" in last_line(verify.stdout)
    bench = runner.invoke(app, ["bench", str(path), "--runs", "1", "--verify-timeout", "0.5"])
    assert bench.exit_code == 4 and "time budget of 0.5 s" in bench.stderr


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_fold_verification_exits_cleanly(tmp_path, sig, code):
    path = save(endless_loop_with_bn(), tmp_path)
    out = tmp_path / "out.onnx"
    env = {**os.environ, "BNFOLD_VERIFY_TIMEOUT": "0"}  # no budget: only the signal ends it
    child = subprocess.Popen(
        [sys.executable, "-m", "bnfold", "fold", str(path), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        while not leftovers(tmp_path) and time.monotonic() < deadline:  # staged: now verifying
            assert child.poll() is None, child.stderr.read().decode()
            time.sleep(0.1)
        time.sleep(1.0)  # inside ORT's Loop
        assert child.poll() is None
        child.send_signal(sig)
        rc = child.wait(timeout=30)  # a hang guard, not a timing assertion
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert rc == code, child.stderr.read().decode()[-2000:]
    assert not out.exists() and leftovers(tmp_path) == []


# --- PyTorch: a result without verification is never presented as verified -----------------------


def test_fold_module_without_example_inputs_is_unverified_and_falsy():
    torch = pytest.importorskip("torch")
    import bnfold.torch as bt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    blind = bt.fold_module(model)
    assert not blind and blind.report.status == "unverified"
    assert blind.verification is None and "example_inputs" in blind.report.unverified_reason
    assert blind.report.to_dict()["status"] == "unverified"
    seen = bt.fold_module(model, (torch.zeros(1, 3, 8, 8),))
    assert seen and seen.report.status == "passed"
