"""Generate the small sample ONNX models shipped with bnfold.

Every model here still contains its ``BatchNormalization`` nodes: they are the
*input* that bnfold folds.  Each model is trained briefly (40 seeded SGD steps,
batch 32, on a synthetic deterministic task: 10-class labels = argmax of a fixed
random projection of the input, or for the decoder an MSE target = a fixed
channel mix of the input upsampled 4x; BN layers in train mode; inputs with
mean 0.5 and std 1.5) so that the BN running statistics and the affine
weight/bias are NOT the defaults of a fresh module (running_mean != 0,
running_var != 1, weight != 1, bias != 0).  Folding a default BN would be an
identity-like no-op and would hide bugs.

Models
------
``cnn1d.onnx``
    The tutorial 1-D CNN.  Conv1d(3->16, k3, p1) -> BatchNorm1d(16) -> ReLU ->
    Conv1d(16->32, k3, p1) -> BatchNorm1d(32) -> ReLU -> flatten ->
    Linear(32*28 -> 10).  Input ``input`` [N, 3, 28], output ``logits`` [N, 10].
    BN placement: directly after Conv (foldable backwards into the Conv).
``cnn2d.onnx``
    Its 2-D twin.  Conv2d(3->16, k3, p1) -> BN2d -> ReLU -> Conv2d(16->32, k3, p1)
    -> BN2d -> ReLU -> flatten -> Linear(32*28*28 -> 10).  Input [N, 3, 28, 28].
    BN placement: directly after Conv.
``keras_style.onnx``
    BN after the activation and before max-pooling (common in Keras code):
    Conv2d(3->16, k3, p1) -> ReLU -> BN2d -> MaxPool2d(2) -> Conv2d(16->32, k3, p1)
    -> ReLU -> BN2d -> MaxPool2d(2) -> flatten -> Linear(32*7*7 -> 10).
    Input [N, 3, 28, 28].  BN placement: after ReLU, so it can NOT be folded
    backwards into the preceding Conv; only forwards (through MaxPool, which
    commutes with a per-channel affine only when the scale is positive) or
    left alone.
``mlp_bn.onnx``
    Linear(64 -> 128) -> BatchNorm1d(128) -> ReLU -> Linear(128 -> 10).
    Input [N, 64].  Exports as Gemm -> BatchNormalization (2-D input).
``decoder_convtranspose.onnx``
    ConvTranspose2d(16 -> 8, k4, s2, p1, groups=2, bias=False) -> BN2d(8) -> ReLU
    -> ConvTranspose2d(8 -> 4, k2, s2) -> BN2d(4).  Input [N, 16, 8, 8], output
    ``output`` [N, 4, 32, 32].  BN placement: after grouped, bias-less
    ConvTranspose (the fold must create a bias and respect the
    [C_in, C_out/groups, kH, kW] weight layout) and as the very last node.

All models: opset 17, one dynamic batch axis named ``N`` on input and output,
weights stored inline (no external data), every file well under 2 MB.

Why the BNs are preserved
-------------------------
The legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) runs
its "eval peephole" pass -- which fuses Conv+BatchNormalization -- only as part
of constant folding.  Exporting with ``do_constant_folding=False`` skips it, so
every BatchNorm becomes a ``BatchNormalization`` node (``training_mode=0``) with
its four parameter initializers.  (With the default ``do_constant_folding=True``
the Conv+BN pairs come out already fused; the default ``dynamo=True`` exporter is
not used here and needs the separate ``onnxscript`` package.)  The non-default BN
statistics matter for export too: the exporter de-duplicates equal initializers,
so a fresh BN (weight == running_var == 1, bias == running_mean == 0) would be
exported with two of its parameters fed through ``Identity`` nodes.
``verify()`` asserts the expected BN count per model and that every BN
parameter is a plain initializer.

Regenerate
----------
::

    pip install torch==2.13.0          # the pinned CPU wheel (see pyproject.toml)
    python sample_models/make_models.py [--out DIR]   # default DIR: this folder

The script is deterministic (fixed seeds, deterministic algorithms, a single
thread).  It also checks each model with ``onnx.checker.check_model(full_check=True)``,
runs it in onnxruntime with graph optimizations disabled, and prints a table
with the BN count, opset, IR version, file size, max abs difference against
torch's eval output, and how far the BN statistics are from their defaults.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

SEED = 20240611
OPSET = 17
TRAIN_STEPS = 40
BATCH = 32
LR = 0.02
BN_LR_MULT = 20  # BN affine params get a larger step so weight/bias clearly leave 1/0
CLIP_NORM = 2.0  # keeps the big flatten->Linear layers from spiking in the first steps
PRODUCER_NAME = "bnfold sample_models/make_models.py"
_BN = nn.modules.batchnorm._BatchNorm


# --------------------------------------------------------------------------- models


def cnn1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 16, kernel_size=3, padding=1),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 32, kernel_size=3, padding=1),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 28, 10),
    )


def cnn2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 28 * 28, 10),
    )


def keras_style() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(16),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def mlp_bn() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def decoder_convtranspose() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(16, 8, kernel_size=4, stride=2, padding=1, groups=2, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2),
        nn.BatchNorm2d(4),
    )


@dataclass(frozen=True)
class Spec:
    name: str
    build: object  # () -> nn.Module
    input_shape: tuple[int, ...]  # without the batch axis
    output_name: str
    task: str  # "classify" (10 classes) or "regress"
    n_bn: int
    description: str


SPECS: list[Spec] = [
    Spec(
        "cnn1d",
        cnn1d,
        (3, 28),
        "logits",
        "classify",
        2,
        "Tutorial 1-D CNN: Conv1d+BN1d+ReLU x2, flatten, Linear(896->10).",
    ),
    Spec(
        "cnn2d",
        cnn2d,
        (3, 28, 28),
        "logits",
        "classify",
        2,
        "2-D CNN: Conv2d+BN2d+ReLU x2, flatten, Linear(25088->10).",
    ),
    Spec(
        "keras_style",
        keras_style,
        (3, 28, 28),
        "logits",
        "classify",
        2,
        "Keras-style CNN: Conv2d->ReLU->BN2d->MaxPool x2, flatten, Linear(1568->10).",
    ),
    Spec(
        "mlp_bn",
        mlp_bn,
        (64,),
        "logits",
        "classify",
        1,
        "MLP: Linear(64->128)->BN1d->ReLU->Linear(128->10) (Gemm + BatchNormalization).",
    ),
    Spec(
        "decoder_convtranspose",
        decoder_convtranspose,
        (16, 8, 8),
        "output",
        "regress",
        2,
        "Decoder: ConvTranspose2d(16->8,k4,s2,p1,groups=2,no bias)->BN2d->ReLU->"
        "ConvTranspose2d(8->4,k2,s2)->BN2d.",
    ),
]


# --------------------------------------------------------------------------- data / training


def _inputs(gen: torch.Generator, shape: tuple[int, ...], n: int) -> torch.Tensor:
    # Non-zero mean, non-unit scale, so the BN running statistics move well away
    # from their defaults (mean 0, var 1).
    return torch.randn((n, *shape), generator=gen) * 1.5 + 0.5


def _make_task(spec: Spec, gen: torch.Generator):
    """Return a deterministic target function x -> y for the spec's synthetic task."""
    if spec.task == "classify":
        # Labels = argmax of a fixed random linear projection of the flattened input.
        d = int(np.prod(spec.input_shape))
        proj = torch.randn(d, 10, generator=gen)
        return lambda x: (x.flatten(1) @ proj).argmax(dim=1)
    # Regression: a fixed 1x1 channel mix of the input, nearest-upsampled 4x.
    mix = torch.randn(4, spec.input_shape[0], generator=gen) / spec.input_shape[0] ** 0.5
    return lambda x: F.interpolate(torch.einsum("oc,nchw->nohw", mix, x), scale_factor=4)


def train(spec: Spec) -> nn.Module:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = spec.build()
    target = _make_task(spec, gen)
    bn_params = [p for m in model.modules() if isinstance(m, _BN) for p in m.parameters()]
    bn_ids = {id(p) for p in bn_params}
    other = [p for p in model.parameters() if id(p) not in bn_ids]
    opt = torch.optim.SGD(
        [{"params": other}, {"params": bn_params, "lr": LR * BN_LR_MULT}], lr=LR, momentum=0.9
    )
    model.train()  # BN in train mode: batch statistics, running_mean/var updated
    for _ in range(TRAIN_STEPS):
        x = _inputs(gen, spec.input_shape, BATCH)
        y = target(x)
        out = model(x)
        loss = F.cross_entropy(out, y) if spec.task == "classify" else F.mse_loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------- export / checks


def export(spec: Spec, model: nn.Module, path: Path) -> None:
    example = torch.zeros((2, *spec.input_shape))
    with warnings.catch_warnings():
        # dynamo=False emits a DeprecationWarning about the legacy exporter.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,  # legacy TorchScript exporter
            do_constant_folding=False,  # skips the Conv+BN fusing "eval peephole" pass
            opset_version=OPSET,
            input_names=["input"],
            output_names=[spec.output_name],
            dynamic_axes={"input": {0: "N"}, spec.output_name: {0: "N"}},
            export_params=True,
            keep_initializers_as_inputs=False,
        )
    m = onnx.load(str(path))
    m.producer_name = PRODUCER_NAME
    m.producer_version = f"torch {torch.__version__}"
    m.doc_string = (
        f"bnfold sample model '{spec.name}': {spec.description} "
        f"Trained {TRAIN_STEPS} seeded SGD steps on synthetic data (BN stats non-default), "
        f"exported in eval mode with torch.onnx.export(dynamo=False, do_constant_folding=False, "
        f"opset_version={OPSET}) so BatchNormalization nodes are kept. "
        f"Regenerate: python sample_models/make_models.py"
    )
    del m.metadata_props[:]
    for k, v in {
        "generated_by": "sample_models/make_models.py",
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=False, do_constant_folding=False)",
        "seed": str(SEED),
        "batchnorm_count": str(spec.n_bn),
    }.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save_model(m, str(path), save_as_external_data=False)


@torch.no_grad()
def bn_stats_summary(model: nn.Module) -> tuple[float, float, float, float]:
    """Min over BN layers of max|running_mean|, max|running_var-1|, max|w-1|, max|b|."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    mean = min(float(b.running_mean.abs().max()) for b in bns)
    var = min(float((b.running_var - 1).abs().max()) for b in bns)
    w = min(float((b.weight - 1).abs().max()) for b in bns)
    bias = min(float(b.bias.abs().max()) for b in bns)
    return mean, var, w, bias


def verify(spec: Spec, model: nn.Module, path: Path) -> dict:
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer), (
        "external data"
    )
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    if n_bn != spec.n_bn:
        raise RuntimeError(
            f"{spec.name}: expected {spec.n_bn} BatchNormalization nodes, got {n_bn}"
        )
    # Every BN parameter must be a plain initializer.  (The exporter de-duplicates
    # equal initializers: with a fresh BN, weight==running_var==1 and
    # bias==running_mean==0, so two of the four would become Identity nodes.)
    inits = {t.name for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "BatchNormalization" and not set(n.input[1:5]) <= inits:
            raise RuntimeError(f"{spec.name}: {n.name} has non-initializer parameters")
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(SEED + 1)
    x = _inputs(gen, spec.input_shape, 5)  # batch 5 != export batch 2: dynamic axis works
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    (got,) = sess.run(None, {"input": x.numpy()})
    assert got.shape == ref.shape, (got.shape, ref.shape)
    diff = float(np.abs(got - ref).max())
    mean, var, w, b = bn_stats_summary(model)
    return {
        "name": spec.name,
        "bn": n_bn,
        "opset": opset,
        "ir": m.ir_version,
        "size": path.stat().st_size,
        "diff": diff,
        "mean": mean,
        "var": var,
        "w": w,
        "b": b,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: this script's folder)",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    rows = []
    for spec in SPECS:
        model = train(spec)
        path = args.out / f"{spec.name}.onnx"
        export(spec, model, path)
        rows.append(verify(spec, model, path))

    print(f"torch {torch.__version__}, onnx {onnx.__version__}")
    hdr = (
        f"{'model':<24}{'BN':>3}{'opset':>6}{'IR':>4}{'bytes':>10}{'max|ort-torch|':>16}"
        f"{'min max|rm|':>13}{'min max|rv-1|':>15}{'min max|w-1|':>14}{'min max|b|':>12}"
    )
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for r in rows:
        print(
            f"{r['name']:<24}{r['bn']:>3}{r['opset']:>6}{r['ir']:>4}{r['size']:>10}"
            f"{r['diff']:>16.2e}{r['mean']:>13.3g}{r['var']:>15.3g}{r['w']:>14.3g}{r['b']:>12.3g}"
        )
        ok &= r["diff"] <= 1e-4 and r["size"] < 2 * 1024 * 1024
        ok &= min(r["mean"], r["var"], r["w"], r["b"]) > 1e-3
    print(
        "(rm/rv = running_mean/var, w/b = BN affine weight/bias; 'min max' = smallest, over "
        "the model's BN layers, of the largest deviation from the fresh-module default)"
    )
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
