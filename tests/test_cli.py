"""The command line: exit codes, the JSON report, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from bnfold import numerics
from bnfold.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def cnn(tmp_path) -> Path:
    path = tmp_path / "cnn2d.onnx"
    shutil.copy(SAMPLES / "cnn2d.onnx", path)
    return path


def test_fold_sample_passes_and_writes(cnn, tmp_path):
    out = tmp_path / "out.onnx"
    before = cnn.read_bytes()
    result = invoke("fold", cnn, "-o", out)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output.splitlines()[-1]
    assert "folded" in result.output
    assert cnn.read_bytes() == before  # the input is never modified
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]


def test_default_output_name(cnn):
    result = invoke("fold", cnn)
    assert result.exit_code == 0, result.output
    assert (cnn.parent / "cnn2d.folded.onnx").exists()


def test_json_report_schema(cnn, tmp_path):
    result = invoke("fold", cnn, "-o", tmp_path / "o.onnx", "--json", "-", "-q")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1
    assert report["passed"] is True and report["written"] is True
    assert report["totals"] == {"batchnorms": 2, "folded": 2, "kept": 0}
    bn = report["batchnorms"][0]
    assert set(bn) == {
        "name",
        "graph",
        "status",
        "direction",
        "target",
        "target_op",
        "reason",
        "detail",
        "kind",  # added by issue 13: "batchnorm" (here) or "affine" (listed under "affines")
        "source",  # added by issue 13: "node" (here) or "lowered" (a Mul/Add chain)
    }
    assert bn["status"] == "folded" and bn["target_op"] == "Conv" and bn["direction"] == "backward"
    assert bn["kind"] == "batchnorm" and bn["source"] == "node" and report["affines"] == []
    v = report["verification"]
    assert v["passed"] is True
    assert v["outputs"][0]["name"] == "logits"
    assert v["outputs"][0]["max_abs_error"] < 1e-4
    assert set(report["timings"]) >= {"load", "fold", "save", "verify"}


def test_json_to_file(cnn, tmp_path):
    dest = tmp_path / "report.json"
    result = invoke("fold", cnn, "-o", tmp_path / "o.onnx", "--json", dest)
    assert result.exit_code == 0
    assert json.loads(dest.read_text())["totals"]["folded"] == 2


def test_kept_bn_is_reported_with_reason_and_strict_fails(tmp_path):
    from helpers import write_unfoldable_model

    model = tmp_path / "kept.onnx"
    write_unfoldable_model(model)
    out = tmp_path / "k.onnx"
    result = invoke("fold", model, "-o", out, "--json", "-", "-q")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert [b["reason"] for b in report["batchnorms"]] == ["unsupported_producer"]
    assert all("Relu" in b["detail"] for b in report["batchnorms"])

    strict = invoke("fold", model, "-o", out, "--strict")
    assert strict.exit_code == 1
    assert "FAILED" in strict.output.splitlines()[-1]
    assert out.exists()  # the fold itself is valid; --strict only fails the gate


def test_verification_failure_exits_1_and_writes_nothing(cnn, tmp_path, monkeypatch):
    real = numerics.fold_conv
    monkeypatch.setattr(numerics, "fold_conv", lambda w, s: real(w, s) * 1.01)  # a wrong fold
    out = tmp_path / "bad.onnx"
    result = invoke("fold", cnn, "-o", out)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output.splitlines()[-1]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn2d.onnx"]


def test_no_verify(cnn, tmp_path):
    result = invoke("fold", cnn, "-o", tmp_path / "o.onnx", "--no-verify", "--json", "-", "-q")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["verification"] is None


def test_input_shape_option(tmp_path):
    result = invoke(
        "fold",
        SAMPLES / "cnn1d.onnx",
        "-o",
        tmp_path / "o.onnx",
        "--input-shape",
        "input=4,3,28",
        "--json",
        "-",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verification"]["input_shapes"] == {"input": [4, 3, 28]}


def test_external_data_option(cnn, tmp_path):
    out = tmp_path / "ext.onnx"
    result = invoke("fold", cnn, "-o", out, "--external-data")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ext.onnx.data").exists()
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize(
    "setup, args, text",
    [
        (None, ["fold", "{tmp}/missing.onnx"], "no such file"),
        (None, ["fold", "{tmp}"], "no ONNX model found"),
        ("empty", ["fold", "{tmp}/empty.onnx"], "empty file"),
        ("text", ["fold", "{tmp}/text.onnx"], "not"),
        ("copy", ["fold", "{tmp}/m.onnx", "-o", "{tmp}/m.onnx"], "is the input"),
        ("copy", ["fold", "{tmp}/m.onnx", "-o", "{tmp}/nodir/o.onnx"], "does not exist"),
        ("copy", ["fold", "{tmp}/m.onnx", "-o", "{tmp}"], "is a directory"),
        ("copy", ["fold", "{tmp}/m.onnx", "--input-shape", "input"], "malformed input shape"),
        ("copy", ["fold", "{tmp}/m.onnx", "--input-shape", "nope=1,2"], "nope"),
        ("copy", ["fold", "{tmp}/m.onnx", "--input-shape", "input=1,3"], "input"),
    ],
    ids=[
        "missing",
        "directory",
        "empty",
        "not-onnx",
        "output-is-input",
        "no-folder",
        "output-dir",
        "bad-shape-syntax",
        "unknown-input",
        "wrong-rank",
    ],
)
def test_bad_input_exit_2_one_line(tmp_path, setup, args, text):
    if setup == "empty":
        (tmp_path / "empty.onnx").write_bytes(b"")
    elif setup == "text":
        (tmp_path / "text.onnx").write_text("not a model")
    elif setup == "copy":
        shutil.copy(SAMPLES / "cnn1d.onnx", tmp_path / "m.onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnfold: error:"), result.stderr
    assert text in err[0]
    assert "Traceback" not in result.output
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # nothing written, nothing changed
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no staging folder left


def test_usage_error_exit_2():
    assert invoke("fold").exit_code == 2
    assert invoke("fold", "x.onnx", "--atol", "-1").exit_code == 2


def test_help_on_every_command():
    for args in (["--help"], ["fold", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0
        assert "Usage" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("bnfold ")


def test_import_and_help_do_not_import_torch_or_onnxruntime():
    code = (
        "import sys, bnfold\n"
        "from bnfold.cli import app\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(app, ['fold', '--help']).exit_code == 0\n"
        "heavy = [m for m in ('torch', 'onnxruntime') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"


def test_checkout_shim_runs_the_same_app(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "fold",
            str(SAMPLES / "mlp_bn.onnx"),
            "-o",
            str(tmp_path / "o.onnx"),
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "PASSED"


def test_ctrl_c_leaves_nothing_behind(cnn, tmp_path, monkeypatch):
    import bnfold.compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bnfold.compare, "verify_models", interrupted)
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous output")
    result = invoke("fold", cnn, "-o", out, "--external-data")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    assert out.read_bytes() == b"previous output"  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn2d.onnx", "o.onnx"]


def test_public_fold_is_the_function_even_after_the_pass_module_is_imported():
    code = (
        "import bnfold\n"
        "from bnfold.passes import BatchNormFoldPass\n"
        "import bnfold.api\n"
        "assert callable(bnfold.fold) and bnfold.fold is bnfold.api.fold\n"
        "assert bnfold.BatchNormFoldPass is BatchNormFoldPass\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_public_functions_are_not_shadowed_by_submodules():
    code = (
        "import bnfold, bnfold.compare, bnfold.latency, bnfold.divergence, bnfold.passes, bnfold.api\n"
        "assert bnfold.verify is bnfold.compare.verify_models\n"
        "assert bnfold.bench is bnfold.latency.bench\n"
        "assert bnfold.localize is bnfold.divergence.localize\n"
        "assert bnfold.fold is bnfold.api.fold\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ------------------------------------------------------------------ verify and bench
@pytest.fixture
def folded_and_broken(tmp_path):
    """The cnn2d sample folded by bnfold, and a copy with one folded weight perturbed."""
    import numpy as np
    from onnx import numpy_helper

    folded = tmp_path / "folded.onnx"
    assert invoke("fold", SAMPLES / "cnn2d.onnx", "-o", folded, "-q").exit_code == 0
    proto = onnx.load(str(folded))
    conv = next(n for n in proto.graph.node if n.name == "/3/Conv")
    init = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0, 0, 0, 0] += np.float32(0.5)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    return folded, broken


def test_verify_passes_an_exact_fold(folded_and_broken):
    folded, _ = folded_and_broken
    result = invoke("verify", SAMPLES / "cnn2d.onnx", folded, "--samples", "3")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "PASSED"


def test_verify_catches_a_perturbed_weight_and_localizes_it(folded_and_broken, tmp_path):
    _, broken = folded_and_broken
    result = invoke(
        "verify", SAMPLES / "cnn2d.onnx", broken, "--localize", "--json", tmp_path / "v.json"
    )
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == "FAILED"
    assert "/3/Conv" in result.output
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] is False
    assert report["outputs"][0]["mismatched"] > 0
    assert report["localize"]["divergence"]["node"] == "/3/Conv"


def test_verify_options_user_data_distribution_and_markdown(
    folded_and_broken, tmp_path, monkeypatch
):
    import numpy as np

    folded, _ = folded_and_broken
    np.savez(tmp_path / "batch.npz", input=np.ones((2, 3, 28, 28), np.float32))
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 28, 28), np.float32))
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = invoke(
        "verify",
        SAMPLES / "cnn2d.onnx",
        folded,
        "--data",
        tmp_path / "batch.npz",
        "--data",
        f"input={tmp_path / 'x.npy'}",
        "--json",
        "-",
        "-q",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] == 2 and report["input_shapes"] == {"input": [2, 3, 28, 28]}
    assert "bnfold verify: PASSED" in summary.read_text()
    uniform = invoke(
        "verify",
        SAMPLES / "cnn2d.onnx",
        folded,
        "--dist",
        "uniform",
        "--range",
        "0,1",
        "--tol",
        "logits=1e-6,1e-6",
        "-q",
    )
    assert uniform.exit_code == 0, uniform.output  # seeded: the fold's error stays below 1e-6 here
    exact = invoke(
        "verify",
        SAMPLES / "cnn2d.onnx",
        folded,
        "--dist",
        "uniform",
        "--range",
        "0,1",
        "--tol",
        "logits=0,0",
        "-q",
    )
    assert exact.exit_code == 1  # a fold changes rounding, so a zero tolerance must fail
    bad = invoke("verify", SAMPLES / "cnn2d.onnx", folded, "--range", "1")
    assert bad.exit_code == 2 and "malformed --range" in bad.stderr
    bad = invoke("verify", SAMPLES / "cnn2d.onnx", folded, "--data", tmp_path / "missing.npz")
    assert bad.exit_code == 2 and "no such file" in bad.stderr


def test_bench_reports_both_levels_as_json_and_markdown(folded_and_broken, tmp_path):
    folded, _ = folded_and_broken
    md = tmp_path / "bench.md"
    result = invoke(
        "bench",
        SAMPLES / "cnn2d.onnx",
        folded,
        "--runs",
        "20",
        "--warmup",
        "2",
        "--json",
        "-",
        "--markdown",
        md,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {(e["model"], e["level"]) for e in report["entries"]} == {
        ("cnn2d.onnx", "disable"),
        ("cnn2d.onnx", "all"),
        ("folded.onnx", "disable"),
        ("folded.onnx", "all"),
    }
    ratio = report["ratios"][0]
    assert ratio["ci_low"] <= ratio["median_ratio"] <= ratio["ci_high"]
    text = md.read_text()
    assert "fuses Conv+BatchNormalization" in text and text.count("| disable |") == 2


def test_bench_unknown_provider_is_exit_2():
    result = invoke("bench", SAMPLES / "cnn1d.onnx", "--provider", "tensorrt", "--runs", "2")
    assert result.exit_code == 2
    assert "bnfold: error:" in result.stderr


def test_fold_bench_adds_the_comparison(tmp_path):
    result = invoke(
        "fold", SAMPLES / "mlp_bn.onnx", "-o", tmp_path / "o.onnx", "--bench", "--json", "-", "-q"
    )
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)["bench"]
    assert [r["model"] for r in bench["ratios"]] == ["folded", "folded"]


def test_inspect_is_a_dry_run(tmp_path):
    model = tmp_path / "k.onnx"
    shutil.copy(SAMPLES / "keras_style.onnx", model)
    result = invoke("inspect", model, "--allow-slower-folds", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [b["direction"] for b in report["batchnorms"]] == ["forward", "forward"]
    assert [b["target_op"] for b in report["batchnorms"]] == ["Conv", "Gemm"]
    assert report["written"] is False and report["verification"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.onnx"]  # nothing written
    assert invoke("inspect", tmp_path / "missing.onnx").exit_code == 2


def test_fold_lower_remaining_removes_every_batchnorm(tmp_path):
    from helpers import write_unfoldable_model

    model = tmp_path / "kept.onnx"
    write_unfoldable_model(model)
    out = tmp_path / "lowered.onnx"
    result = invoke("fold", model, "-o", out, "--lower-remaining", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(b["status"], b["direction"]) for b in report["batchnorms"]] == [("kept", "lowered")]
    assert report["verification"]["passed"] is True
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]


def test_allow_slower_folds_flag(tmp_path):
    # keras_style's first BN folds forward only through a border-correction Add: kept for cost by
    # default (reason slower_fold), folded with --allow-slower-folds.
    model = SAMPLES / "keras_style.onnx"
    runs = {}
    for flags in ((), ("--allow-slower-folds",)):
        out = tmp_path / f"o{len(flags)}.onnx"
        result = invoke("fold", model, "-o", out, "--no-verify", "--json", "-", "-q", *flags)
        assert result.exit_code == 0, result.output
        runs[flags] = json.loads(result.stdout)
    default, forced = runs[()], runs[("--allow-slower-folds",)]
    assert default["totals"] == {"batchnorms": 2, "folded": 1, "kept": 1}
    assert default["batchnorms"][0]["reason"] == "slower_fold"
    assert forced["totals"] == {"batchnorms": 2, "folded": 2, "kept": 0}
