"""Every ``bnfold fold`` flag works for every input kind (ONNX, ``.pt2``, TorchScript), or is refused
with one line and exit code 2; and the typed ``FoldOptions`` behind them.

The model has one BN of each kind a flag changes: ``bn`` follows a Conv whose output also feeds a
ReLU (kept as ``producer_output_shared``, folded into a copy with ``--duplicate-shared``) and ``bn2``
follows a Sigmoid at the output (kept as ``unsupported_producer``, lowered with
``--lower-remaining``). ``bn3`` follows a Conv and always folds.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from bnfold.cli import app  # noqa: E402
from bnfold.errors import UsageError  # noqa: E402
from bnfold.options import FoldOptions  # noqa: E402

SHAPE = (2, 3, 8, 8)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        side = torch.relu(y)  # shares the conv's output with bn
        z = torch.relu(self.bn3(self.conv3(torch.relu(self.bn(y)))))
        return self.bn2(torch.sigmoid(self.conv2(z))), side


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        for bn in (net.bn, net.bn2, net.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The same network as a .pt2, a TorchScript archive and an (unfolded) ONNX file."""
    root = tmp_path_factory.mktemp("flags")
    net, x = _net(), torch.randn(*SHAPE)
    torch.export.save(torch.export.export(net, (x,)), str(root / "net.pt2"))
    torch.jit.script(net).save(str(root / "net.ts"))
    torch.onnx.export(
        net,
        (x,),
        str(root / "net.onnx"),
        dynamo=False,
        do_constant_folding=False,
        input_names=["x"],
        output_names=["out", "side"],
        dynamic_axes={"x": {0: "batch"}, "out": {0: "batch"}, "side": {0: "batch"}},
    )
    return {"onnx": root / "net.onnx", "pt2": root / "net.pt2", "torchscript": root / "net.ts"}


def _external(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _one(report: dict, bn: str) -> dict:
    """The decision of ``bn``, ``bn3`` or ``bn2`` (names do not survive a .pt2; the order, the
    order the forward runs them, does)."""
    assert len(report["batchnorms"]) == 3, report["batchnorms"]
    return report["batchnorms"][{"bn": 0, "bn3": 1, "bn2": 2}[bn]]


def _check_none(report, out, code):
    assert code == 0 and report["written"] and report["verification"]["passed"]
    # a .pt2 goes through the dynamo exporter, whose optimizer fuses Conv + bn3 itself
    assert _one(report, "bn3")["status"] in ("folded", "fused_by_exporter")
    assert _one(report, "bn2")["reason"] == "unsupported_producer"
    assert _one(report, "bn2")["direction"] is None
    assert _one(report, "bn")["reason"] == "producer_output_shared"


def _check_no_verify(report, out, code):
    assert code == 0 and report["written"] and out.is_file()
    assert report["verification"] is None


def _check_strict(report, out, code):
    assert report["strict"] and report["written"], "--strict still writes"
    assert code == 1 and not report["passed"], "two BNs are kept"


def _check_lower(report, out, code):
    assert code == 0 and report["verification"]["passed"]
    for kept in ("bn", "bn2"):  # every BN that stays is lowered, whatever kept it
        assert _one(report, kept)["status"] == "kept"
        assert _one(report, kept)["direction"] == "lowered"
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Mul") == 2


def _check_duplicate(report, out, code):
    assert code == 0 and report["verification"]["passed"]
    bn = _one(report, "bn")
    assert bn["status"] == "folded" and "copy" in bn["detail"]
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 4, "the shared Conv is duplicated"


def _check_bench(report, out, code):
    assert code == 0 and report["written"]
    bench = report["bench"]
    assert bench is not None, "--bench must time the models, not be ignored"
    assert "original" in json.dumps(bench) and "folded" in json.dumps(bench)


def _check_external(report, out, code):
    assert code == 0 and report["written"] and _external(out)


def _check_no_external(report, out, code):
    assert code == 0 and report["written"] and not _external(out)


def _check_tolerances(report, out, code):
    assert code == 0
    for o in report["verification"]["outputs"]:
        assert (o["atol"], o["rtol"]) == (0.01, 0.02)


def _check_seed(report, out, code):
    assert code == 0 and report["verification"]["seed"] == 7


def _check_shape(report, out, code):
    assert code == 0 and report["verification"]["passed"]
    assert list(report["verification"]["input_shapes"].values()) == [list(SHAPE)]


def _check_trust(report, out, code):
    _check_none(report, out, code)  # a permission: nothing changes for files that are no pickle


FLAGS = {
    "none": ([], _check_none),
    "no-verify": (["--no-verify"], _check_no_verify),
    "strict": (["--strict"], _check_strict),
    "lower-remaining": (["--lower-remaining"], _check_lower),
    "duplicate-shared": (["--duplicate-shared"], _check_duplicate),
    "bench": (["--bench", "--no-verify"], _check_bench),
    "external-data": (["--external-data"], _check_external),
    "no-external-data": (["--no-external-data"], _check_no_external),
    "atol-rtol": (["--atol", "0.01", "--rtol", "0.02"], _check_tolerances),
    "seed": (["--seed", "7"], _check_seed),
    "input-shape": ([], _check_shape),  # the shape is given for every kind below
    "trust-pickle": (["--trust-pickle"], _check_trust),
}


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["onnx", "pt2", "torchscript"])
@pytest.mark.parametrize("flag", list(FLAGS))
def test_every_fold_flag_on_every_input_kind(models, tmp_path, kind, flag):
    args, check = FLAGS[flag]
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    shape = [] if kind == "pt2" and flag != "input-shape" else ["--input-shape", "x=2,3,8,8"]
    result = CliRunner().invoke(
        app,
        ["fold", str(models[kind]), "-o", str(out), "--json", str(report_path), "-q"]
        + shape
        + args,
    )
    if result.exit_code == 2:  # refused: one line, no traceback, nothing written
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("bnfold: error: ") and not out.exists()
        pytest.fail(f"{flag} is refused for {kind}: {result.stderr.strip()}")
    assert result.exit_code in (0, 1), result.output
    check(json.loads(report_path.read_text()), out, result.exit_code)


@pytest.mark.torch
def test_output_dir_for_pytorch_files(models, tmp_path):
    """-O names a PyTorch input's output NAME.onnx (not NAME.pt2); two inputs that would share an
    output are refused before anything runs."""
    out_dir = tmp_path / "out"
    run = CliRunner().invoke
    result = run(app, ["fold", str(models["pt2"]), "-O", str(out_dir), "-j", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out_dir.iterdir()) == ["net.onnx"]
    assert onnx.load(str(out_dir / "net.onnx")).graph.node
    clash = run(app, ["fold", str(models["pt2"]), str(models["torchscript"]), "-O", str(tmp_path)])
    assert clash.exit_code == 2 and len(clash.stderr.strip().splitlines()) == 1, clash.output
    assert "same output" in clash.stderr and not (tmp_path / "net.onnx").exists()


# ------------------------------------------------------------------------------ the Python API
def test_fold_options_are_typed_and_frozen():
    opts = FoldOptions(input_shapes={"x": [1, 3, 8, 8]}, atol=1e-3)
    assert opts.input_shapes == {"x": (1, 3, 8, 8)}
    with pytest.raises(AttributeError):
        opts.atol = 1.0  # frozen
    assert opts.changed() == ["input_shapes", "atol"]
    assert pickle.loads(pickle.dumps(opts)) == opts, "batch mode sends it to worker processes"
    assert opts.replace(strict=True).strict and not opts.strict
    for bad in (
        {"atol": -1.0},
        {"rtol": float("nan")},
        {"seed": 1.5},
        {"input_shapes": {"x": "1,3"}},
    ):
        with pytest.raises(UsageError):
            FoldOptions(**bad)


def test_options_or_keywords_not_both(models, tmp_path):
    import bnfold

    with pytest.raises(UsageError, match="not both .*strict"):
        bnfold.fold(models["onnx"], options=FoldOptions(), strict=True)
    same = bnfold.fold(models["onnx"], options=FoldOptions(lower_remaining=True, verify=False))
    assert _one(same.report.to_dict(), "bn2")["direction"] == "lowered"


def test_bench_needs_files(models):
    import bnfold

    with pytest.raises(UsageError, match="bench .* give a model path and an output"):
        bnfold.fold(models["onnx"], bench=True)


@pytest.mark.torch
def test_front_ends_refuse_what_they_cannot_honour(models, tmp_path):
    import bnfold.torch as bt

    net, x = _net(), torch.randn(*SHAPE)
    with pytest.raises(UsageError, match=r"fold_module does not support lower_remaining") as info:
        bt.fold_module(net, x, options=FoldOptions(lower_remaining=True))
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=r"export does not support input_shapes"):
        bt.export(net, x, tmp_path / "o.onnx", options=FoldOptions(input_shapes={"x": (1, 3)}))
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.torch
def test_export_takes_the_onnx_fold_flags(tmp_path):
    import bnfold.torch as bt

    net, x = _net(), torch.randn(*SHAPE)
    plain = bt.export(net, x, tmp_path / "a.onnx")
    assert _one(plain.report.to_dict(), "bn")["reason"] == "producer_output_shared"
    both = bt.export(net, x, tmp_path / "b.onnx", lower_remaining=True, duplicate_shared=True)
    assert both and all(d.folded or d.direction == "lowered" for d in both.decisions), (
        both.report.to_dict()["batchnorms"]
    )
    ops = [n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node]
    assert "BatchNormalization" not in ops
