"""Untrusted PyTorch files (issue 15): archives are vetted before torch reads them, graphs before
anything runs them. Each case is a crafted file that bnfold used to load (and run) with exit 0."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from bnfold.cli import app  # noqa: E402
from bnfold.errors import ResourceError, UntrustedInputError  # noqa: E402
from bnfold.torch import archive  # noqa: E402
from bnfold.torch import safety as torch_safety  # noqa: E402

pytestmark = pytest.mark.torch
runner = CliRunner()


def _one_line_exit2(args: list, text: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert text.lower() in lines[0].lower(), lines[0]
    return lines[0]


class _Touch:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pt2(folder: Path) -> Path:
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    ep = torch.export.export(m, (torch.randn(1, 3, 4, 4),))
    path = folder / "m.pt2"
    torch.export.save(ep, str(path))
    return path


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy the zip ``src`` to ``dst``, passing every (name, bytes) through ``change``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data in change(info.filename, zin.read(info)):
                zout.writestr(name, data)
    return dst


def test_clean_pt2_passes_the_archive_check(tmp_path):
    archive.check_pt2(_pt2(tmp_path))  # a torch.export.save file is neither a bomb nor a pickle


def test_pt2_weight_stored_as_pickle_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "code-ran"

    def change(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            yield name, json.dumps(config).encode()
        elif name.endswith("data/weights/weight_0"):
            yield name, pickle.dumps(_Touch(marker))
        else:
            yield name, data

    bad = _rewrite(_pt2(tmp_path), tmp_path / "bad.pt2", change)
    _one_line_exit2(["fold", bad, "-o", tmp_path / "o.onnx"], "stored as a pickle")
    assert not marker.exists(), "torch unpickled the weight: code from the file ran"
    assert not (tmp_path / "o.onnx").exists()


def test_pt2_sample_inputs_that_need_unpickling_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    import io as _io

    def change(name, data):
        if "sample_inputs" in name:
            buf = _io.BytesIO()
            torch.save((_Touch(marker),), buf)  # weights_only refuses; torch falls back to pickle
            yield name, buf.getvalue()
        else:
            yield name, data

    bad = _rewrite(_pt2(tmp_path), tmp_path / "bad.pt2", change)
    _one_line_exit2(["fold", bad, "-o", tmp_path / "o.onnx"], "imports")
    assert not marker.exists()


def test_pt2_opaque_constant_is_refused(tmp_path):
    def change(name, data):
        if name.endswith("_constants_config.json"):
            cfg = {"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False,
                                      "use_pickle": True, "tensor_meta": None}}}  # fmt: skip
            yield name, json.dumps(cfg).encode()
            yield name.replace("model_constants_config.json", "opaque_obj_0"), pickle.dumps(1)
        else:
            yield name, data

    bad = _rewrite(_pt2(tmp_path), tmp_path / "bad.pt2", change)
    with pytest.raises(UntrustedInputError, match="pickle|opaque"):
        archive.check_pt2(bad)
    archive.check_pt2(bad, trust_pickle=True)  # opted in: only the zip checks remain


def test_pt2_zip_bomb_is_refused_fast(tmp_path):
    import time

    def change(name, data):
        yield name, data
        if name.endswith("archive_format"):
            yield name.replace("archive_format", "extra/bomb"), b"\0" * (64 << 20)

    src = _pt2(tmp_path)
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            for name, data in change(info.filename, zin.read(info)):
                zout.writestr(name, data)
    assert bomb.stat().st_size < 1 << 20
    start = time.perf_counter()
    _one_line_exit2(["fold", bomb, "-o", tmp_path / "o.onnx"], "zip bomb")
    assert time.perf_counter() - start < 30
    with pytest.raises(ResourceError):
        archive.check_zip(bomb)


def test_zip_member_count_and_total_size_limits(tmp_path):
    z = tmp_path / "many.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(20):
            zf.writestr(f"a/{i}", b"x" * 100)
    archive.check_zip(z)
    with pytest.raises(ResourceError, match="members"):
        archive.check_zip(z, archive.ArchiveLimits(max_members=10))
    with pytest.raises(ResourceError, match="inflates to"):
        archive.check_zip(z, archive.ArchiveLimits(max_total_bytes=1000))


def test_scan_pickle_allows_tensors_and_names_foreign_imports():
    import io as _io

    buf = _io.BytesIO()
    torch.save({"w": torch.ones(2), "p": nn.Parameter(torch.zeros(1))}, buf)
    with zipfile.ZipFile(buf) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        assert archive.scan_pickle(zf.read(pkl)) == []
    for proto in (0, 2, 4, 5):
        bad = archive.scan_pickle(pickle.dumps(_Touch(Path("x")), protocol=proto))
        assert any("pathlib" in b or "getattr" in b for b in bad), (proto, bad)


# ------------------------------------------------------------------------------ graphs are code
LEAK = """
import torch
from torch import nn

class Leak(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)
        self.b = nn.BatchNorm2d(3)

    def forward(self, x):
        d = torch.from_file(SECRET, False, 4, dtype=torch.uint8)
        return self.b(self.c(x)) + d.float().sum()
"""


def _scripted_leak(tmp_path: Path, secret: Path) -> Path:
    import importlib.util

    src = tmp_path / "leak_module.py"
    src.write_text(LEAK.replace("SECRET", repr(str(secret))))
    spec = importlib.util.spec_from_file_location("leak_module", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "leak.pt"
    torch.jit.save(torch.jit.script(mod.Leak().eval()), str(path))
    return path


def test_torchscript_that_reads_a_file_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x01\x02\x03\x04")
    leak = _scripted_leak(tmp_path, secret)
    out = tmp_path / "o.onnx"
    line = _one_line_exit2(
        ["fold", leak, "-o", out, "--input-shape", "x=1,3,4,4"], "aten::from_file"
    )
    assert "--trust-pickle" in line
    assert not out.exists()


def test_plain_torchscript_and_exported_program_pass_the_graph_check():
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    assert torch_safety.check_torchscript(torch.jit.script(seq), "m") > 0
    ep = torch.export.export(seq, (torch.randn(1, 3, 4, 4),))
    assert torch_safety.check_exported_program(ep, "m") > 0


def test_exported_program_calling_a_side_effect_op_is_refused():
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    ep = torch.export.export(seq, (torch.randn(1, 3, 4, 4),))
    graph = ep.graph_module.graph
    anchor = next(n for n in graph.nodes if n.op == "call_function")
    with graph.inserting_before(anchor):
        graph.call_function(torch.ops.aten.from_file.default, ("/etc/hostname", False, 4))
    with pytest.raises(UntrustedInputError, match="aten::from_file"):
        torch_safety.check_exported_program(ep, "m.pt2")
    assert torch_safety.check_exported_program(ep, "m.pt2", trust=True) == 0


def test_torchscript_custom_namespace_and_print_are_refused():
    @torch.jit.script
    def noisy(x: torch.Tensor) -> torch.Tensor:
        print("hello")
        return x

    with pytest.raises(UntrustedInputError, match="prim::Print"):
        torch_safety.check_torchscript(noisy, "f")
