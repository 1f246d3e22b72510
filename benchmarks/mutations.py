"""Mutation benchmark: does the verdict refuse wrong folds and accept correct ones?

For each model, bnfold folds it correctly (no verification of its own), then fold bugs are injected
into the folded model, one at a time, on up to three folded layers (first, middle, last):

=================  ===================================================================================
mutant             what the buggy fold did
=================  ===================================================================================
wrong_eps          used ε' = 1e-3 (or ε/100 when ε >= 1e-4) instead of the BN's ε
bias_missing       dropped the bias of one output channel (the one with the largest |bias|)
bias_shift         shifted that channel's bias by 1e-3 × max |bias|
channel_scale      scaled one output channel's weights by 1 + 1e-3
swap_channels      applied channel j's BN parameters to channel i and vice versa
transposed         transposed the weight's first two axes (square weights only)
wrong_axis         scaled the weight along the input axis instead of the output axis (square only;
                   for ConvTranspose this is the classic axis-0-versus-axis-1 bug)
=================  ===================================================================================

"Exceeds float32 noise", rigorously: with ``truth`` the original model evaluated in float64 (onnx's
ReferenceEvaluator, every parameter and input exact), ``noise = max(max |orig - truth|, u × max
|truth|)`` is the original model's own rounding error in its dtype under ONNX Runtime, but at least
the rounding of the output itself (``u``, the dtype's unit roundoff, is half an ulp: no computation
in that dtype can come closer), and a mutant's effect is
``max |mutant - orig|`` (both run by ORT in the model's dtype, optimizations off). A mutant is
*above noise* when, on some output, ``effect > K × noise`` (K = 10 by default, ``--k``); then at
least (K - 2) × noise of the effect is the mutation itself, whatever the rounding did. Mutants at or
below that are listed but not counted: no checker can be asked to tell them from rounding.
The light model-zoo graphs get random weights (their own are constant placeholders) and lose their
final Softmax, which saturates to one-hot on random weights and would hide every difference.

Each correct fold and each mutant is judged by the product path, ``bnfold.verify`` with its default
(calibrated) verdict, exactly as ``bnfold fold`` and ``bnfold verify`` run it, and, for comparison,
by the old fixed element-wise tolerances (``bnfold.verify`` with each output's
``default_tolerances``, what ``--tol NAME=1e-4,1e-4`` gives), on the same inputs. Reported: false
refusals of correct folds (goal 0) and the share of above-noise mutants each verdict catches (goal
100%). Run from the repository root::

    python benchmarks/mutations.py [--quick] [--markdown] [--k 10]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import bnfold  # noqa: E402
from bnfold.compare import default_tolerances  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


# ------------------------------------------------------------------------------------ the models
@dataclass
class Subject:
    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]


def _feeds(model: onnx.ModelProto, seed: int = 0, dynamic: int = 16) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs; symbolic dims are 1 (first) or ``dynamic`` (others)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else (1 if i == 0 else dynamic)
            for i, d in enumerate(tt.shape.dim)
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def randomize_light(path: Path, seed: int = 0, gain: float = 1.3) -> onnx.ModelProto:
    """A light model-zoo graph with its ConstantOfShape weight placeholders replaced by random
    initializers (He-scaled Conv/Gemm weights times ``gain``, realistic BN statistics), IR 7."""
    m = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    role: dict[str, tuple[str, int]] = {}
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            role.setdefault(x, (n.op_type, i))
    new_inits, nodes = [], []
    for n in m.graph.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in shapes:
            nodes.append(n)
            continue
        shape = tuple(int(d) for d in shapes[n.input[0]])
        op, i = role.get(n.output[0], ("", 0))
        if op == "BatchNormalization":
            value = {
                1: rng.uniform(0.5, 1.5, shape),
                2: rng.standard_normal(shape) * 0.2,
                3: rng.standard_normal(shape) * 0.2,
                4: rng.uniform(0.5, 2.0, shape),
            }[i]
        elif op in ("Conv", "Gemm", "MatMul") and i == 1 and len(shape) >= 2:
            fan_in = int(np.prod(shape[1:])) if op == "Conv" else int(shape[-1])
            value = rng.standard_normal(shape) * gain * np.sqrt(2.0 / fan_in)
        else:
            value = rng.standard_normal(shape) * 0.1
        new_inits.append(numpy_helper.from_array(value.astype(np.float32), n.output[0]))
    used = {x for n in nodes for x in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)
    m.graph.ClearField("initializer")
    m.graph.initializer.extend(keep + new_inits)
    init_names = {t.name for t in m.graph.initializer} | {t.name for t in new_inits}
    inputs = [vi for vi in m.graph.input if vi.name not in init_names and vi.name in used]
    m.graph.ClearField("input")
    m.graph.input.extend(inputs)
    # a trailing Softmax saturates to one-hot on random weights and hides every difference; the
    # logits are what the verdict should see
    for node in list(m.graph.node):
        if node.op_type == "Softmax" and node.output[0] in {o.name for o in m.graph.output}:
            for o in m.graph.output:
                if o.name == node.output[0]:
                    o.name = node.input[0]
            m.graph.node.remove(node)
    m.ir_version = 7
    return m


def subjects(quick: bool) -> list[Subject]:
    from deep_models import convtranspose_square, deep_resnet
    from fuzz_models import F16, F32, generate

    found: list[Subject] = []
    for path in sorted((ROOT / "sample_models").glob("*.onnx")):
        if quick and path.stem not in ("cnn2d", "decoder_convtranspose", "mlp_bn"):
            continue
        m = onnx.load(str(path))
        found.append(Subject(path.stem, m, _feeds(m)))
    m = convtranspose_square()
    found.append(Subject("deconv_square", m, _feeds(m)))
    for layers, gain, dtype, seed in (
        [(50, 1.4, np.float32, 0)]
        if quick
        else [(50, 1.4, np.float32, 0), (50, 1.4, np.float32, 1), (50, 1.3, np.float32, 2)]
    ) + [(18, 1.0, np.float16, 0)]:
        m = deep_resnet(layers, size=32, gain=gain, seed=seed, dtype=dtype)
        tag = "fp16" if dtype == np.float16 else "fp32"
        found.append(Subject(f"resnet{layers}_{tag}_s{seed}", m, _feeds(m, seed)))
    if not quick:
        for name in ("resnet50", "inception_v2", "densenet121", "shufflenet"):
            path = LIGHT / f"light_{name}.onnx"
            if path.exists():
                m = randomize_light(path)
                found.append(Subject(f"zoo_{name}", m, _feeds(m)))
    wanted, seed = (4 if quick else 24), 0
    while sum(s.name.startswith("fuzz") for s in found) < wanted and seed < 2000:
        case = generate(random.Random(seed))
        seed += 1
        if case is None or case.dtype not in (F32, F16):
            continue
        found.append(Subject(f"fuzz{seed - 1}_{case.dtype}", case.model, dict(case.feeds)))
    return found


# ------------------------------------------------------------------------------------ mutations
def _inits(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in m.graph.initializer}


def _get(m: onnx.ModelProto, name: str) -> np.ndarray | None:
    t = _inits(m).get(name)
    return None if t is None else numpy_helper.to_array(t).copy()


def _set(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    _inits(m)[name].CopyFrom(numpy_helper.from_array(value, name))


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _node(m: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in m.graph.node if n.name == name), None)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _out_axis(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if _attr(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and w.ndim == 2:
        return 1
    return None


def _bias_name(m: onnx.ModelProto, node: onnx.NodeProto, channels: int) -> str | None:
    names = _inits(m)
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2:
        name = node.input[2]
    elif node.op_type == "MatMul":
        add = next(
            (n for n in m.graph.node if n.op_type == "Add" and node.output[0] in n.input), None
        )
        name = None if add is None else next((x for x in add.input if x in names), None)
    else:
        return None
    if not name or name not in names or _get(m, name).size != channels:
        return None
    return name


def _bn_scale(original: onnx.ModelProto, bn_name: str) -> np.ndarray | None:
    bn = _node(original, bn_name)
    if bn is None:
        return None
    gamma, var = _get(original, bn.input[1]), _get(original, bn.input[4])
    if gamma is None or var is None:
        return None
    eps = float(_attr(bn, "epsilon", 1e-5))
    return gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)


def _refold(original: onnx.ModelProto, edit) -> onnx.ModelProto | None:
    """Edit the original's BN (a wrong parameter), fold correctly: a fold that used it."""
    m = _copy(original)
    if not edit(m):
        return None
    r = bnfold.fold(m, verify=False)
    return r.model


def mutants(
    original: onnx.ModelProto, folded: onnx.ModelProto, decisions
) -> list[tuple[str, onnx.ModelProto]]:
    out: list[tuple[str, onnx.ModelProto]] = []
    chosen = [d for d in decisions if d.folded and d.direction == "backward" and d.graph == "main"]
    if len(chosen) > 3:
        chosen = [chosen[0], chosen[len(chosen) // 2], chosen[-1]]
    for d in chosen:
        node = _node(folded, d.target or "")
        if node is None or len(node.input) < 2:
            continue
        w = _get(folded, node.input[1])
        if w is None or w.dtype.kind != "f":
            continue
        axis = _out_axis(node, w)
        if axis is None:
            continue
        channels = w.shape[axis]
        bias = _bias_name(folded, node, channels)

        def with_weight(value: np.ndarray, node=node, w=w) -> onnx.ModelProto:
            m = _copy(folded)
            _set(m, node.input[1], value.astype(w.dtype))
            return m

        tag = f"{d.target_op}"
        if bias is not None:
            b = _get(folded, bias)
            c = int(np.argmax(np.abs(b.reshape(-1))))
            flat = b.reshape(-1).copy()
            flat[c] = 0
            m = _copy(folded)
            _set(m, bias, flat.reshape(b.shape).astype(b.dtype))
            out.append((f"bias_missing@{tag}", m))
            flat = b.reshape(-1).astype(np.float64)
            flat[c] += 1e-3 * max(float(np.max(np.abs(flat))), 1e-3)
            m = _copy(folded)
            _set(m, bias, flat.reshape(b.shape).astype(b.dtype))
            out.append((f"bias_shift@{tag}", m))
        scaled = np.moveaxis(w.astype(np.float64), axis, 0).copy()
        scaled[channels // 2] *= 1 + 1e-3
        out.append((f"channel_scale@{tag}", with_weight(np.moveaxis(scaled, 0, axis))))
        if w.ndim >= 2 and w.shape[0] == w.shape[1]:
            out.append((f"transposed@{tag}", with_weight(np.swapaxes(w, 0, 1))))
            s = _bn_scale(original, d.name)
            if s is not None and s.size == channels and np.all(s != 0):
                other = 1 - axis if axis in (0, 1) else 0
                shape_out = [1] * w.ndim
                shape_out[axis] = -1
                shape_in = [1] * w.ndim
                shape_in[other] = -1
                wrong = w.astype(np.float64) / s.reshape(shape_out) * s.reshape(shape_in)
                out.append((f"wrong_axis@{tag}", with_weight(wrong)))

        bn = _node(original, d.name)
        if bn is None:
            continue

        def wrong_eps(m: onnx.ModelProto, name=d.name) -> bool:
            n = _node(m, name)
            eps = float(_attr(n, "epsilon", 1e-5))
            for a in n.attribute:
                if a.name == "epsilon":
                    a.f = 1e-3 if eps < 1e-4 else eps / 100
                    return True
            n.attribute.append(onnx.helper.make_attribute("epsilon", 1e-3))
            return True

        def swap(m: onnx.ModelProto, name=d.name) -> bool:
            n = _node(m, name)
            arrays = [_get(m, x) for x in n.input[1:5]]
            if any(a is None or a.ndim != 1 or a.size < 2 for a in arrays):
                return False
            if len(set(n.input[1:5])) < 4:
                return False
            i, j = 0, arrays[0].size - 1
            for x, a in zip(n.input[1:5], arrays, strict=True):
                a[[i, j]] = a[[j, i]]
                _set(m, x, a)
            return True

        for kind, edit in (("wrong_eps", wrong_eps), ("swap_channels", swap)):
            try:
                m = _refold(original, edit)
            except Exception:  # a mutant the fold refuses is no mutant
                m = None
            if m is not None:
                out.append((f"{kind}@{tag}", m))
    return out


# ------------------------------------------------------------------------------------ measuring
def _ort(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    from fuzz_models import _ort as run

    return [np.asarray(o) for o in run(model, feeds)]


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both = np.isfinite(a64) & np.isfinite(b64)
    if (np.isfinite(a64) != np.isfinite(b64)).any():
        return float("inf")
    return float(np.max(np.abs(a64[both] - b64[both]))) if both.any() else 0.0


def _unit(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).eps) / 2 if np.dtype(dtype).kind == "f" else 0.0


def _absmax(a: np.ndarray) -> float:
    a64 = np.asarray(a, np.float64)
    a64 = a64[np.isfinite(a64)]
    return float(np.max(np.abs(a64))) if a64.size else 0.0


@dataclass
class Row:
    model: str
    mutants: int = 0
    above: int = 0
    today_caught: int = 0
    cal_caught: int = 0
    today_refused_correct: bool = False
    cal_refused_correct: bool = False
    noise: float = 0.0
    scale: float = 0.0
    seconds: float = 0.0
    missed: str = ""


def measure(subject: Subject, k: float) -> Row | None:
    from fuzz_models import run_truth

    started = time.perf_counter()
    original, feeds = subject.model, subject.feeds
    try:
        result = bnfold.fold(original, verify=False)
    except bnfold.BnfoldError:
        return None
    folded = result.model
    if not any(d.folded for d in result.decisions):
        return None
    row = Row(subject.name)
    orig = _ort(original, feeds)
    truth = run_truth(original, feeds)
    # the original's own error, but never less than the rounding of the output itself (half an
    # ulp of its largest value): no computation in the model's dtype can be closer than that
    noise = [
        max(_maxdiff(o, t), _unit(o.dtype) * _absmax(t)) for o, t in zip(orig, truth, strict=True)
    ]
    row.noise = max(noise)
    row.scale = max(float(np.max(np.abs(np.asarray(o, np.float64)))) for o in orig)

    fixed = {
        vi.name: default_tolerances(o.dtype)
        for vi, o in zip(original.graph.output, orig, strict=True)
    }

    def today(candidate) -> bool:  # the old default: fixed element-wise tolerances per dtype
        return bool(bnfold.verify(original, candidate, data=[feeds], output_tolerances=fixed))

    def calibrated(candidate) -> bool:  # the product path: bnfold.verify's default verdict
        return bool(bnfold.verify(original, candidate, data=[feeds]))

    row.today_refused_correct = not today(folded)
    row.cal_refused_correct = not calibrated(folded)
    missed = []
    for name, mutant in mutants(original, folded, result.decisions):
        row.mutants += 1
        effect = [_maxdiff(m, o) for m, o in zip(_ort(mutant, feeds), orig, strict=True)]
        if not any(e > k * max(n, 1e-300) for e, n in zip(effect, noise, strict=True)):
            continue
        row.above += 1
        t, c = today(mutant), calibrated(mutant)
        row.today_caught += not t
        row.cal_caught += not c
        if c:
            missed.append(f"{name} (effect {max(effect):.2g})")
    row.missed = "; ".join(missed)
    row.seconds = time.perf_counter() - started
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a fast subset (about a minute)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--k", type=float, default=10.0, help="'above noise' factor K (default 10)")
    ap.add_argument("--only", metavar="TEXT", help="only models whose name contains TEXT")
    args = ap.parse_args()
    header = [
        "model",
        "max|out|",
        "fp noise",
        "refused (fixed/bnfold)",
        "mutants",
        "above noise",
        "caught by fixed tol",
        "caught by bnfold.verify",
        "s",
    ]
    rows: list[Row] = []
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    else:
        print("  ".join(header))
    for subject in subjects(args.quick):
        if args.only and args.only not in subject.name:
            continue
        row = measure(subject, args.k)
        if row is None:
            continue
        rows.append(row)
        cells = [
            row.model,
            f"{row.scale:.3g}",
            f"{row.noise:.2g}",
            f"{'REFUSED' if row.today_refused_correct else 'ok'}/"
            f"{'REFUSED' if row.cal_refused_correct else 'ok'}",
            str(row.mutants),
            str(row.above),
            str(row.today_caught),
            str(row.cal_caught),
            f"{row.seconds:.1f}",
        ]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells), flush=True)
        if row.missed:
            print(f"    bnfold.verify missed: {row.missed}", flush=True)
    above = sum(r.above for r in rows)
    print(
        f"\n{len(rows)} correct folds: false refusals by fixed tolerances "
        f"{sum(r.today_refused_correct for r in rows)}, by bnfold.verify "
        f"{sum(r.cal_refused_correct for r in rows)}"
    )
    print(
        f"{sum(r.mutants for r in rows)} mutants, {above} above {args.k:g}x fp noise: caught by "
        f"fixed tolerances {sum(r.today_caught for r in rows)}/{above}, by bnfold.verify "
        f"{sum(r.cal_caught for r in rows)}/{above}"
    )


if __name__ == "__main__":
    main()
