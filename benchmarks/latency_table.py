"""Does folding ever make a model slower? One latency row per model, folded against original.

For every model: fold it with the default options (``bnfold.fold``, verified), then time original
and folded model interleaved under ONNX Runtime (CPU, 1 thread, ``bnfold.bench``) at the levels
``disable`` and ``all``, and print the folded/original median ratio with its 95% bootstrap interval
at each level and the session-creation ratio at ``all``. A row whose interval lies above 1 is
flagged ``SLOWER``. The models:

* the shipped sample models (``sample_models/*.onnx``);
* the onnx wheel's light model-zoo graphs (``onnx/backend/test/data/light/*.onnx``);
* Keras-style models built here: ``Conv → ReLU → BN → MaxPool → Conv ("same" padding)`` stacks of a
  few widths and image sizes (the pattern whose forward fold needs a border-correction ``Add``).

With ``--allow-slower-folds`` a second row per Keras-style model shows what forcing those folds
costs (``bnfold fold --allow-slower-folds``). Run from the repository root::

    python benchmarks/latency_table.py                 # a few minutes on 2 cores
    python benchmarks/latency_table.py --runs 300 --allow-slower-folds --markdown
    python benchmarks/latency_table.py --only keras    # a subset: names containing "keras"

Timing on a shared machine is noisy: compare the intervals, not single medians.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import bnfold  # noqa: E402

#: (name, channels per stage, image size, input channels): the Keras tutorial's CNN, wider ones.
KERAS_SHAPES = [
    ("keras_mnist", (32, 64), 28, 1),
    ("keras_cifar", (32, 64, 128), 32, 3),
    ("keras_wide", (64, 128), 56, 3),
]


def keras_model(channels: tuple[int, ...], size: int, cin: int, seed: int) -> onnx.ModelProto:
    """Conv(3x3, same) → ReLU → BN → MaxPool(2) per stage, then Conv(3x3, same) → GAP → Flatten."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    x, c_prev = "input", cin
    for i, c in enumerate(channels):
        w = init(f"w{i}", rng.standard_normal((c, c_prev, 3, 3)) * np.sqrt(2 / (9 * c_prev)))
        b = init(f"b{i}", rng.standard_normal(c) * 0.1)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        bn = [
            init(f"g{i}", rng.uniform(0.5, 1.5, c)),
            init(f"beta{i}", rng.standard_normal(c) * 0.2),
            init(f"m{i}", rng.uniform(0.1, 1.0, c)),
            init(f"v{i}", rng.uniform(0.5, 2.0, c)),
        ]
        nodes.append(helper.make_node("BatchNormalization", [f"r{i}", *bn], [f"n{i}"]))
        nodes.append(
            helper.make_node("MaxPool", [f"n{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2])
        )
        x, c_prev = f"p{i}", c
    w = init("w_last", rng.standard_normal((c_prev, c_prev, 3, 3)) * np.sqrt(2 / (9 * c_prev)))
    nodes.append(helper.make_node("Conv", [x, w], ["c_last"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("GlobalAveragePool", ["c_last"], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "keras_style",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c_prev])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def models(tmp: Path, only: str | None) -> list[tuple[str, Path]]:
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    found = [(p.stem, p) for p in sorted((ROOT / "sample_models").glob("*.onnx"))]
    found += [(p.stem, p) for p in sorted(light.glob("light_*.onnx"))]
    for k, (name, channels, size, cin) in enumerate(KERAS_SHAPES):
        path = tmp / f"{name}.onnx"
        onnx.save(keras_model(channels, size, cin, seed=k), path)
        found.append((name, path))
    return [(n, p) for n, p in found if only is None or only in n]


def row(name: str, path: Path, out: Path, runs: int, allow_slower: bool) -> list[str]:
    result = bnfold.fold(path, out, allow_slower_folds=allow_slower)
    r = result.report
    reasons = Counter(d.reason.value for d in r.kept)
    kept = ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())) or "0"
    cells = {"disable": "-", "all": "-"}
    create, verdict = "-", "" if r.passed else "FOLD FAILED"
    if r.written and r.folded:
        b = bnfold.bench(
            [path, out], runs=runs, labels=["original", "folded"], levels=["disable", "all"]
        )
        for ratio in b.ratios:
            cells[ratio.level] = (
                f"{ratio.median_ratio:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}]"
            )
            if ratio.level == "all":
                create = f"{ratio.session_create_ratio:.2f}"
            if ratio.significant and ratio.ci_low > 1:
                verdict = (verdict + " " if verdict else "") + f"SLOWER at {ratio.level}"
    elif r.written:
        verdict = verdict or "nothing folded (identical model)"
    label = name + (" (--allow-slower-folds)" if allow_slower else "")
    return [
        label,
        f"{len(r.folded)}/{len(r.decisions)}",
        kept,
        cells["disable"],
        cells["all"],
        create,
        verdict or "ok",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100, help="timed runs per model per level")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--only", help="only the models whose name contains this")
    ap.add_argument(
        "--allow-slower-folds",
        action="store_true",
        help="add a forced row for each model that has a BN kept for cost",
    )
    args = ap.parse_args()
    header = [
        "model",
        "folded",
        "kept (reason)",
        "folded/original disable [95% CI]",
        "folded/original all [95% CI]",
        "session all",
        "verdict",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models(Path(tmp), args.only):
            rows.append(row(name, path, Path(tmp) / f"{name}.folded.onnx", args.runs, False))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            if args.allow_slower_folds and "slower_fold" in rows[-1][2]:
                forced = Path(tmp) / f"{name}.forced.onnx"
                rows.append(row(name, path, forced, args.runs, True))
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return 1 if any("SLOWER" in r[-1] for r in rows if "allow-slower" not in r[0]) else 0


if __name__ == "__main__":
    sys.exit(main())
