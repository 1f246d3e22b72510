"""Fold BatchNorm in torchvision/timm architectures along every bnfold path; print one table.

For each model (random weights, BN statistics and affine parameters randomized deterministically,
eval mode, one small input) and each path, the BatchNorms found, folded (by direction) and kept
(by reason), the max abs error of the result against the ``nn.Module`` itself on the same input,
and the time taken:

============== ===========================================================================
path           what
============== ===========================================================================
fold_module    ``bnfold.torch.fold_module(model, (x,))``; error: folded module vs module
export         ``bnfold.torch.export(model, (x,), path)``: the dynamo exporter (its optimizer
               on) + bnfold; "exp-fused" = decisions with status ``fused_by_exporter`` (also
               counted in "folded"); error: the written ONNX file under ONNX Runtime vs module
export:ts      the same with ``exporter="torchscript"`` (the legacy fallback)
onnx:dynamo    ``torch.onnx.export(dynamo=True, optimize=False)`` (every BN survives), then
               ``bnfold.fold(verify=False)``; error: folded ONNX under ONNX Runtime vs module
               (bnfold's own ONNX-vs-ONNX verification is skipped: this check is stricter)
onnx:dyn-opt   the same export after ``ONNXProgram.optimize()`` (what ``optimize=True``, the
               exporter's default, runs: onnxscript's optimizer); "found" is what the
               optimizer left, "exp-fused" the BatchNormalization nodes it removed
fx.fuse        ``torch.fx.experimental.optimization.fuse(model)``, the baseline: "kept" is
               the BN modules still called in the fused graph
============== ===========================================================================

"BN mods" counts the BatchNorm-like modules of the model: ``torch.nn.modules.batchnorm._BatchNorm``
subclasses (timm's ``BatchNormAct2d`` included) and any class named ``*FrozenBatchNorm2d``.
ONNX-side counts are BatchNormalization nodes plus the decomposed BNs bnfold recognises.

Setup (optional dependencies, not in CI; torchvision's wheel on the index is a CUDA build, so it is
installed without its dependencies and its fake-kernel registrations are made tolerant below)::

    python3 -m venv /work/venvs/zoo && source /work/venvs/zoo/bin/activate
    pip install -q --upgrade pip
    pip install -q -e '.[dev,torch]'                       # torch==2.13.0 (CPU wheel), onnxscript
    pip install -q --no-deps torchvision==0.28.0 timm      # torchvision 0.28 is torch 2.13's
    pip install -q huggingface_hub safetensors pyyaml pillow

Run from the repository root::

    python benchmarks/zoo.py --quick                       # 4 models, 1-3 min
    python benchmarks/zoo.py                               # all 21 models: 502 s (more when busy)
    python benchmarks/zoo.py --models resnet18,mixnet_s --keep /tmp/zoo   # keep the ONNX files
    python benchmarks/zoo.py --json /tmp/zoo.json          # also write every decision as JSON

Weights are never downloaded (``weights=None`` / ``pretrained=False``). Each model runs under a
per-model time limit (``--timeout``, SIGALRM; a path cut short says ``timeout``). Exit code 0
unless an argument is bad (2).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PATHS = ["fold_module", "export", "export:ts", "onnx:dynamo", "onnx:dyn-opt", "fx.fuse"]


def _import_torchvision() -> Any:
    """Import torchvision whose compiled ops do not load (a CUDA wheel next to CPU torch).

    ``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
    ``torchvision::qnms``; with the ops library missing, ``torch.library.register_fake`` raises
    "operator torchvision::nms does not exist" and the import fails. The model constructors need
    none of those ops, so the registration is made to ignore missing operators for the duration of
    the import only. This stays here, in the benchmark: bnfold never patches torch.
    """
    import torch
    import torch.library

    original = torch.library.register_fake

    def tolerant(op: Any, fn: Any = None, /, *args: Any, **kwargs: Any) -> Any:
        def register(f: Any) -> Any:
            try:
                return original(op, f, *args, **kwargs)
            except RuntimeError as exc:
                if "does not exist" in str(exc):
                    return f
                raise

        return register(fn) if fn is not None else register

    torch.library.register_fake = tolerant
    try:
        import torchvision
    finally:
        torch.library.register_fake = original
    return torchvision


# --- the models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    source: str  # "torchvision" or "timm"
    build: Callable[[], Any]
    size: int = 64  # input is 1x3xSIZExSIZE
    note: str = ""


def _tv(fn_name: str, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        tv = _import_torchvision()
        return getattr(tv.models, fn_name)(weights=None, **kwargs)

    return build


def _tv_frozen(fn_name: str) -> Callable[[], Any]:
    def build() -> Any:
        tv = _import_torchvision()
        from torchvision.ops.misc import FrozenBatchNorm2d

        return getattr(tv.models, fn_name)(weights=None, norm_layer=FrozenBatchNorm2d)

    return build


def _tv_fpn() -> Any:
    """The backbone of torchvision's Faster R-CNN (ResNet-18 + FPN, FrozenBatchNorm2d), returning
    its feature maps as one tuple (the dict's values) so every exporter route takes it."""
    _import_torchvision()
    import torch
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = resnet_fpn_backbone(
                backbone_name="resnet18",
                weights=None,
                norm_layer=FrozenBatchNorm2d,
                trainable_layers=5,
            )

        def forward(self, x: Any) -> Any:
            return tuple(self.body(x).values())

    return Backbone()


def _timm(name: str, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        _import_torchvision()  # timm imports torchvision
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


SPECS = [
    Spec("resnet18", "torchvision", _tv("resnet18")),
    Spec("mobilenet_v3_small", "torchvision", _tv("mobilenet_v3_small")),
    Spec("efficientnet_b0", "torchvision", _tv("efficientnet_b0")),
    Spec("densenet121", "torchvision", _tv("densenet121")),
    Spec("regnet_x_400mf", "torchvision", _tv("regnet_x_400mf")),
    Spec("shufflenet_v2_x0_5", "torchvision", _tv("shufflenet_v2_x0_5")),
    Spec("resnet18_frozenbn", "torchvision", _tv_frozen("resnet18"), note="FrozenBatchNorm2d"),
    Spec("fasterrcnn_r18_fpn", "torchvision", _tv_fpn, note="detection backbone, FrozenBN"),
    Spec("levit_128s", "timm", _timm("levit_128s", img_size=64), note="img_size=64"),
    Spec("mixnet_s", "timm", _timm("mixnet_s")),
    Spec("efficientnet_lite0", "timm", _timm("efficientnet_lite0")),
    Spec("cspresnet50", "timm", _timm("cspresnet50")),
    Spec("regnetx_002", "timm", _timm("regnetx_002")),
    Spec("dpn68", "timm", _timm("dpn68")),
    Spec("tresnet_m", "timm", _timm("tresnet_m")),
    Spec("mobileone_s0", "timm", _timm("mobileone_s0")),
    Spec("repvgg_a0", "timm", _timm("repvgg_a0")),
    Spec("resnet18d", "timm", _timm("resnet18d")),
    Spec("resnetv2_18", "timm", _timm("resnetv2_18"), note="pre-activation: BN after residual Add"),
    Spec("ese_vovnet19b_dw", "timm", _timm("ese_vovnet19b_dw")),
    Spec("rexnet_100", "timm", _timm("rexnet_100")),
]
QUICK = ["resnet18", "resnet18_frozenbn", "mixnet_s", "levit_128s"]


def is_bn_module(m: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm) or type(m).__name__.endswith("FrozenBatchNorm2d")


def randomize_bn(model: Any, seed: int) -> int:
    """Give every BN-like module random statistics and affine parameters (deterministic per
    ``seed``): mean ~ N(0, 0.5), var ~ U(0.5, 2), weight ~ U(0.5, 1.5) with ~10% of channels
    negated (so forward folds through max-pooling meet negative scales), bias ~ N(0, 0.5)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if not is_bn_module(m):
                continue
            n += 1
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            w = getattr(m, "weight", None)
            if w is not None:
                sign = torch.where(torch.rand(c, generator=g) < 0.1, -1.0, 1.0)
                w.copy_((torch.rand(c, generator=g) + 0.5) * sign)
            b = getattr(m, "bias", None)
            if b is not None:
                b.copy_(torch.randn(c, generator=g) * 0.5)
    return n


# --- one row ----------------------------------------------------------------------------------


@dataclass
class PathResult:
    found: int | None = None
    folded: Counter = field(default_factory=Counter)  # direction -> count
    kept: Counter = field(default_factory=Counter)  # reason -> count
    exporter_fused: int | None = None  # BN nodes removed by the exporter's optimizer
    max_abs_err: float | None = None
    seconds: float = 0.0
    error: str | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_folded(self) -> int:
        return sum(self.folded.values())

    @property
    def n_kept(self) -> int:
        return sum(self.kept.values())


class _Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def _from_report(res: PathResult, report: Any) -> None:
    for d in report.decisions:
        if getattr(d, "fused_by_exporter", False):
            res.exporter_fused = (res.exporter_fused or 0) + 1
            res.folded["exporter"] += 1
        elif d.folded:
            res.folded[d.direction or "?"] += 1
        else:
            res.kept[d.reason.value if d.reason is not None else "?"] += 1
        res.decisions.append(d.to_dict())
    res.found = len(report.decisions)


def _report_error(report: Any) -> float | None:
    v = report.verification
    if v is None or getattr(v, "skipped_reason", None):
        return None
    return max((o.max_abs_error for o in v.outputs), default=None)


def _outputs(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    out = []
    for v in value:
        out.extend(_outputs(v))
    return out


def _max_err(a: list[Any], b: list[Any]) -> float:
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"{len(a)} outputs vs {len(b)}")
    errs = []
    for x, y in zip(a, b, strict=True):
        x = x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)
        y = y.detach().numpy() if hasattr(y, "detach") else np.asarray(y)
        errs.append(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return max(errs)


def _ort_outputs(path: Path, x: Any) -> list[Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.numpy()})


def _count_bn_nodes(model_proto: Any) -> int:
    n = sum(1 for node in model_proto.graph.node if node.op_type == "BatchNormalization")
    for f in model_proto.functions:
        n += sum(1 for node in f.node if node.op_type == "BatchNormalization")
    return n


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints and warnings (they are not the benchmark's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield


def run_fold_module(model: Any, x: Any, ref: list[Any]) -> PathResult:
    import torch

    import bnfold.torch

    res = PathResult()
    with _quiet():
        r = bnfold.torch.fold_module(model, (x,))
    _from_report(res, r.report)
    with torch.no_grad():
        res.max_abs_err = _max_err(_outputs(r.module(x)), ref)
    return res


def run_export(
    model: Any, x: Any, ref: list[Any], tmp: Path, exporter: str = "dynamo"
) -> PathResult:
    import bnfold.torch

    res = PathResult()
    out = tmp / f"export_{exporter}.onnx"
    with _quiet():
        r = bnfold.torch.export(model, (x,), out, exporter=exporter)
    _from_report(res, r.report)
    if out.exists():
        res.max_abs_err = _max_err(_ort_outputs(out, x), ref)
    else:  # not written: verification against the module failed; its own error is the number
        res.max_abs_err = _report_error(r.report)
    return res


def run_dynamo(
    model: Any, x: Any, ref: list[Any], tmp: Path, keep: Path | None, name: str
) -> tuple[PathResult, PathResult]:
    import torch

    import bnfold

    plain, opt = PathResult(), PathResult()
    t0 = time.perf_counter()
    try:
        with _quiet():
            prog = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
        raw = tmp / "dynamo.onnx"
        prog.save(str(raw))
        bn_raw = _count_bn_nodes(prog.model_proto)
        with _quiet():
            r = bnfold.fold(raw, tmp / "dynamo.folded.onnx", verify=False)
        _from_report(plain, r.report)
        folded = tmp / "dynamo.folded.onnx"
        plain.max_abs_err = (
            _max_err(_ort_outputs(folded, x), ref) if folded.exists() else _report_error(r.report)
        )
        if keep is not None:
            prog.save(str(keep / f"{name}.dynamo.onnx"))
    except _Timeout:
        raise
    except Exception as exc:
        plain.error = _first_line(exc)
        plain.seconds = time.perf_counter() - t0
        opt.error = "no dynamo export"
        return plain, opt
    plain.seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    try:
        with _quiet():
            prog.optimize()
        optimized = tmp / "dynamo_opt.onnx"
        prog.save(str(optimized))
        if keep is not None:
            prog.save(str(keep / f"{name}.dynamo_opt.onnx"))
        opt.exporter_fused = bn_raw - _count_bn_nodes(prog.model_proto)
        with _quiet():
            r = bnfold.fold(optimized, tmp / "dynamo_opt.folded.onnx", verify=False)
        _from_report(opt, r.report)
        folded = tmp / "dynamo_opt.folded.onnx"
        opt.max_abs_err = (
            _max_err(_ort_outputs(folded, x), ref) if folded.exists() else _report_error(r.report)
        )
    except _Timeout:
        raise
    except Exception as exc:
        opt.error = _first_line(exc)
    opt.seconds = time.perf_counter() - t1
    return plain, opt


def run_fuse(model: Any, x: Any, ref: list[Any]) -> PathResult:
    import copy

    import torch
    from torch.fx.experimental.optimization import fuse

    res = PathResult()
    with _quiet():
        fused = fuse(copy.deepcopy(model))
    # fuse folds only call_module nodes of exactly nn.BatchNorm1d/2d/3d after a Conv/Linear. fx
    # traces into other BN classes (timm's BatchNormAct2d becomes F.batch_norm reading the
    # module's buffers; torchvision's FrozenBatchNorm2d computes its scale/shift from buffers at
    # trace time, so they become _tensor_constant Mul/Add): those are always left. An exact BN
    # is fused when the graph no longer calls it or reads its state.
    exact = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    targets = [str(n.target) for n in fused.graph.nodes if n.op in ("call_module", "get_attr")]
    left = [
        path
        for path, m in model.named_modules()
        if is_bn_module(m)
        and (type(m) not in exact or any(t == path or t.startswith(path + ".") for t in targets))
    ]
    found = sum(1 for m in model.modules() if is_bn_module(m))
    res.found = found
    res.kept["left"] = len(left)
    res.folded["fused"] = found - len(left)
    with torch.no_grad():
        res.max_abs_err = _max_err(_outputs(fused(x)), ref)
    return res


def run_model(spec: Spec, timeout: int, keep: Path | None, paths: list[str]) -> dict[str, Any]:
    import torch

    row: dict[str, Any] = {"model": spec.name, "source": spec.source, "note": spec.note}
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(timeout)
    results: dict[str, PathResult] = {}
    current = "build"
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with _quiet():
            model = spec.build().eval()
        row["bn_modules"] = randomize_bn(model, zlib.crc32(spec.name.encode()))
        row["bn_classes"] = dict(
            Counter(type(m).__name__ for m in model.modules() if is_bn_module(m))
        )
        x = torch.randn(1, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = _outputs(model(x))
        row["ref_max"] = max(float(t.abs().max()) for t in ref)
        row["build_s"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            for current in paths:
                if current == "onnx:dyn-opt":
                    continue  # produced together with onnx:dynamo
                t1 = time.perf_counter()
                try:
                    if current == "fold_module":
                        results[current] = run_fold_module(model, x, ref)
                    elif current == "export":
                        results[current] = run_export(model, x, ref, tmp)
                    elif current == "export:ts":
                        results[current] = run_export(model, x, ref, tmp, "torchscript")
                    elif current == "onnx:dynamo":
                        plain, opt = run_dynamo(model, x, ref, tmp, keep, spec.name)
                        results[current] = plain
                        if "onnx:dyn-opt" in paths:
                            results["onnx:dyn-opt"] = opt
                        continue
                    elif current == "fx.fuse":
                        results[current] = run_fuse(model, x, ref)
                except _Timeout:
                    raise
                except Exception as exc:
                    results[current] = PathResult(error=_first_line(exc))
                results[current].seconds = time.perf_counter() - t1
    except _Timeout:
        results.setdefault(current, PathResult()).error = f"timeout ({timeout} s)"
    except Exception as exc:
        row["error"] = _first_line(exc)
    finally:
        signal.alarm(0)
    row["paths"] = results
    return row


# --- output -----------------------------------------------------------------------------------


def _fmt_counter(c: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(c.items(), key=lambda kv: -kv[1])) or "0"


def _fmt_err(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"


def _rel(r: PathResult, row: dict[str, Any]) -> float | None:
    """The max abs error over the largest |output| of the module (random weights make some
    models' outputs huge: mobileone_s0 reaches ~5e14, so only the relative error compares)."""
    if r.max_abs_err is None or not row.get("ref_max"):
        return None
    return r.max_abs_err / row["ref_max"]


def markdown(rows: list[dict[str, Any]], paths: list[str]) -> str:
    lines = [
        "| model | BN mods | path | found | folded | kept (reason) | exp-fused | max abs err "
        "| rel err | s |",
        "| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | - | - | - | - | {row['error']} | - | - | - | - |")
            continue
        for p in paths:
            r = row["paths"].get(p)
            if r is None:
                continue
            if r.error:
                lines.append(
                    f"| {row['model']} | {row['bn_modules']} | {p} | - | - | "
                    f"**{r.error.replace('|', '/')}** | - | - | - | {r.seconds:.1f} |"
                )
                continue
            folded = f"{r.n_folded}" + (f" ({_fmt_counter(r.folded)})" if r.n_folded else "")
            lines.append(
                f"| {row['model']} | {row['bn_modules']} | {p} | {r.found} | {folded} | "
                f"{_fmt_counter(r.kept)} | "
                f"{'' if r.exporter_fused is None else r.exporter_fused} | "
                f"{_fmt_err(r.max_abs_err)} | {_fmt_err(_rel(r, row))} | {r.seconds:.1f} |"
            )
    return "\n".join(lines)


def totals(rows: list[dict[str, Any]], paths: list[str]) -> str:
    ok_rows = [r for r in rows if "error" not in r]
    lines = [
        f"Totals over {len(ok_rows)} models ({sum(r['bn_modules'] for r in ok_rows)} BN modules); "
        "a path that failed on a model counts nothing for it:",
        "",
        "| path | models ok | found | folded | kept | exp-fused | kept by reason | worst rel err |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for p in paths:
        pairs = [(r["paths"][p], r) for r in ok_rows if p in r["paths"] and not r["paths"][p].error]
        rs = [r for r, _ in pairs]
        kept = Counter()
        for r in rs:
            kept.update(r.kept)
        errs = [e for e in (_rel(r, row) for r, row in pairs) if e is not None]
        fused = [r.exporter_fused for r in rs if r.exporter_fused is not None]
        lines.append(
            f"| {p} | {len(rs)} | {sum(r.found or 0 for r in rs)} | "
            f"{sum(r.n_folded for r in rs)} | {sum(r.n_kept for r in rs)} | "
            f"{sum(fused) if fused else ''} | {_fmt_counter(kept)} | "
            f"{_fmt_err(max(errs) if errs else None)} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated model names (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--paths", help=f"comma-separated paths (default: {','.join(PATHS)})")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model (default 300)")
    ap.add_argument("--keep", type=Path, help="folder to keep the dynamo ONNX exports in")
    ap.add_argument("--json", type=Path, help="write every row (and decision) as JSON here")
    ap.add_argument("--threads", type=int, default=1, help="torch/ORT threads (default 1)")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    args = ap.parse_args()

    by_name = {s.name: s for s in SPECS}
    if args.list:
        for s in SPECS:
            print(f"{s.name:22s} {s.source:12s} {s.note}")
        return 0
    names = QUICK if args.quick else [s.name for s in SPECS]
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(f"error: unknown model(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    paths = PATHS
    if args.paths:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        bad = [p for p in paths if p not in PATHS]
        if bad:
            print(f"error: unknown path(s): {', '.join(bad)}", file=sys.stderr)
            return 2
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)

    rows = []
    t0 = time.perf_counter()
    for n in names:
        t = time.perf_counter()
        row = run_model(by_name[n], args.timeout, args.keep, paths)
        rows.append(row)
        summary = "; ".join(
            f"{p} {r.n_folded}/{r.found}" if not r.error else f"{p} ERR"
            for p, r in row["paths"].items()
        )
        print(
            f"[{time.perf_counter() - t0:6.0f}s] {n}: {row.get('error') or summary} "
            f"({time.perf_counter() - t:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    print(markdown(rows, paths))
    print()
    print(totals(rows, paths))
    print(f"\nwall time: {time.perf_counter() - t0:.0f} s, torch {torch.__version__}")
    if args.json:
        out = []
        for row in rows:
            row = dict(row)
            row["paths"] = {
                p: {**vars(r), "folded": dict(r.folded), "kept": dict(r.kept)}
                for p, r in row["paths"].items()
            }
            out.append(row)
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
