"""Fold the shipped sample models and the onnx wheel's light model-zoo graphs; print one table.

For each model: BatchNormalization count before/after, why the kept ones were kept, node count
before/after, fold time and total time (load + fold + save + verify), the verification error, and the
latency ratio folded/original under ONNX Runtime (CPU, 1 thread, interleaved runs, 95% bootstrap
interval) at optimization level 'disable' and 'all', plus the session-creation ratio at 'all'.
Run from the repository root::

    python benchmarks/fold_models.py [--markdown]

The light model-zoo graphs (IR 3, opset 9) have every initializer listed as a graph input and their
Conv weights are ConstantOfShape nodes; their weights are constant fill values, so their outputs
carry little signal and the verification error on them is a weak test. The sample models have real
(trained) weights and statistics.
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

import onnx  # noqa: E402

import bnfold  # noqa: E402


def models() -> list[Path]:
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    found = sorted((ROOT / "sample_models").glob("*.onnx"))
    found += [
        light / f"light_{n}.onnx" for n in ("resnet50", "densenet121", "inception_v2", "shufflenet")
    ]
    return [p for p in found if p.exists()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model per level")
    ap.add_argument("--no-bench", action="store_true", help="skip the latency comparison")
    args = ap.parse_args()

    header = [
        "model",
        "BN",
        "folded",
        "kept (reason)",
        "nodes",
        "fold s",
        "total s",
        "max abs err",
        "latency disable",
        "latency all",
        "session all",
        "result",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in models():
            t0 = time.perf_counter()
            result = bnfold.fold(path, Path(tmp) / path.name)
            total = time.perf_counter() - t0
            r = result.report
            reasons = Counter(d.reason.value for d in r.kept)
            kept = ", ".join(f"{n} {k}" for k, n in reasons.items()) or "0"
            v = r.verification
            err = (
                max((o.max_abs_error for o in v.outputs), default=0.0)
                if v and not v.skipped_reason
                else None
            )
            t = r.timings
            lat = {"disable": "-", "all": "-"}
            create = "-"
            if r.written and not args.no_bench:
                b = bnfold.bench(
                    [path, Path(tmp) / path.name], runs=args.runs, labels=["original", "folded"]
                )
                for ratio in b.ratios:
                    lat[ratio.level] = (
                        f"{ratio.median_ratio:.3f} [{ratio.ci_low:.2f}, {ratio.ci_high:.2f}]"
                    )
                    if ratio.level == "all":
                        create = f"{ratio.session_create_ratio:.2f}"
            rows.append(
                [
                    path.stem,
                    str(len(r.decisions)),
                    str(len(r.folded)),
                    kept,
                    f"{r.nodes_before}→{r.nodes_after}",
                    f"{t.get('fold', 0):.3f}",
                    f"{total:.2f}",
                    "-" if err is None else f"{err:.2g}",
                    lat["disable"],
                    lat["all"],
                    create,
                    "PASSED" if r.passed else "FAILED",
                ]
            )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
