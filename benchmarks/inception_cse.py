"""Why is the folded ``light_inception_v2`` slower at ONNX Runtime level ``all``? Evidence.

The light model-zoo graph's weights are ``ConstantOfShape`` fill values (0.02), so several inception
branches compute bit-identical values: same input, same weights, same BN/scale parameters. ONNX
Runtime's ``ConstantSharing`` + ``CommonSubexpressionElimination`` (level ``basic``) sees that in
the *original* graph (the fill nodes have equal inputs and attributes) and runs each such branch
once. The fold materialises every weight into its own initializer; ONNX Runtime does not compare
initializer contents, so the folded graph runs every branch. This script prints:

* the node counts of both models after ORT's ``basic`` optimisations (the Convs CSE removed);
* the groups of folded initializers with identical bytes;
* interleaved medians at ``all`` (1 thread) with 95% bootstrap intervals of the ratios:
  folded/original, (folded with identical initializers shared)/original, and folded/original with
  ORT's ``CommonSubexpressionElimination`` disabled in both sessions.

Run from the repository root: ``python benchmarks/inception_cse.py --rounds 200`` (≈ 1 min).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import bnfold  # noqa: E402

MODEL = Path(onnx.__file__).parent / "backend/test/data/light/light_inception_v2.onnx"


def unshare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy where each further reader of a shared initializer reads its own copy."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    seen: set[str] = set()
    copies = 0
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__copy{copies}"
                copies += 1
                out.graph.initializer.append(copy)
                if out.ir_version < 4:
                    out.graph.input.append(
                        onnx.helper.make_tensor_value_info(copy.name, copy.data_type, copy.dims)
                    )
                node.input[i] = copy.name
            seen.add(name)
    return out, copies


def session(model: bytes, level: str, no_cse: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if no_cse:
        so.add_session_config_entry(
            "optimization.disable_specified_optimizers", "CommonSubexpressionElimination"
        )
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def op_counts(model: bytes, path: Path) -> Counter:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(path)
    ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def ratio_ci(base: list[float], other: list[float], rng: np.random.Generator) -> str:
    a, b = np.array(base), np.array(other)
    boot = [
        np.median(rng.choice(b, b.size)) / np.median(rng.choice(a, a.size)) for _ in range(2000)
    ]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return f"{np.median(b) / np.median(a):.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folded_path = Path(tmp) / "folded.onnx"
        bnfold.fold(str(MODEL), str(folded_path))
        original = MODEL.read_bytes()
        folded_model = onnx.load(str(folded_path))
        unshared_model, copies = unshare(folded_model)
        folded, unshared = folded_model.SerializeToString(), unshared_model.SerializeToString()
        for name, blob in (("original", original), ("folded", folded), ("unshared", unshared)):
            counts = op_counts(blob, Path(tmp) / f"{name}_basic.onnx")
            print(f"{name:9s} after ORT basic: {dict(sorted(counts.items()))}")
    print(f"unshared: {copies} initializer reads given their own copy")
    sessions = {
        "original": session(original, "ORT_ENABLE_ALL"),
        "folded": session(folded, "ORT_ENABLE_ALL"),
        "unshared": session(unshared, "ORT_ENABLE_ALL"),
        "original_nocse": session(original, "ORT_ENABLE_ALL", no_cse=True),
        "unshared_nocse": session(unshared, "ORT_ENABLE_ALL", no_cse=True),
    }
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"data_0": x})
    rng = np.random.default_rng(1)
    order = list(sessions)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, {"data_0": x})
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k:15s} median {np.median(v) * 1e3:7.2f} ms")
    pairs = [
        ("folded/original (all)", "original", "folded"),
        ("unshared/original (all)", "original", "unshared"),
        ("unshared/original (all, CSE disabled)", "original_nocse", "unshared_nocse"),
    ]
    for label, base, other in pairs:
        print(f"{label:40s} {ratio_ci(times[base], times[other], rng)}")


if __name__ == "__main__":
    main()
