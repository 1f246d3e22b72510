"""Keras / TensorFlow exporter coverage: per fixture and per exporter route, how many Keras
BatchNormalization layers bnfold finds, folds and keeps (by reason), before issue 13 and now.

Reads ``tests/data/keras/MANIFEST.json`` (one entry per fixture made by
``tests/data/keras/make_keras_fixtures.py``) and the "before" numbers saved in
``benchmarks/data/keras_coverage_before.json`` (bnfold 0.1.0 at 1aafa91, before the lowered-BN
pass). Every fixture is folded and verified with ``bnfold.fold`` (ONNX Runtime, seeded random
inputs) and gated with ``bnfold check``'s ``check_model``. Run from the repository root::

    python benchmarks/keras_coverage.py [--markdown] [--per-file]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bnfold  # noqa: E402
from bnfold.batch import check_model  # noqa: E402

DATA = ROOT / "tests" / "data" / "keras"
BEFORE = ROOT / "benchmarks" / "data" / "keras_coverage_before.json"
ROUTES = [
    "tf2onnx_k2",
    "savedmodel_k2",
    "tf2onnx_k3",
    "keras3_tf",
    "savedmodel_k3",
    "keras3_torch",
    "keras3_torch_dynamo",
]


def measure(name: str, allow_slower_folds: bool = False) -> dict:
    result = bnfold.fold(str(DATA / name), allow_slower_folds=allow_slower_folds)
    report = result.report
    check = check_model(DATA / name)
    return {
        "found": len(report.batchnorms),
        "folded": len(report.folded),
        "kept": len(report.kept),
        "kept_reasons": dict(Counter(d.reason.value for d in report.kept if d.reason)),
        "verified": bool(report.verified),
        "check_exit": check.exit_code,
    }


def _reasons(r: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(r.items())) or "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--per-file", action="store_true", help="also print one row per fixture")
    ap.add_argument(
        "--allow-slower-folds",
        action="store_true",
        help="also fold BNs kept for cost (a forward fold into a padded Conv needs a border Add)",
    )
    args = ap.parse_args()
    manifest = json.loads((DATA / "MANIFEST.json").read_text())["files"]
    before = json.loads(BEFORE.read_text())["files"]
    rows = []
    for name, entry in sorted(manifest.items()):
        if "error" in entry:
            continue
        rows.append((name, entry, before.get(name), measure(name, args.allow_slower_folds)))

    sep = " | " if args.markdown else "  "
    head = [
        "route",
        "model",
        "files",
        "Keras BN layers",
        "fused by exporter",
        "found before → now",
        "folded before → now",
        "kept before → now",
        "check exits 0 on an unfolded BN, before → now",
        "verified",
    ]
    print(("| " if args.markdown else "") + sep.join(head) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + "---|" * len(head))
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for row in rows:
        groups[(row[1]["route"], row[1]["model"])].append(row)
    total = Counter()
    for route in ROUTES:
        for model in ("tutorial", "convbn"):
            g = groups.get((route, model), [])
            if not g:
                continue
            c = Counter()
            for _, entry, b, now in g:
                c["files"] += 1
                c["layers"] += entry["keras_bn_layers"]
                c["fused"] += len(entry.get("exporter_fused_bn", []))
                c["in_graph"] += entry["onnx_bn_layers"]
                for k in ("found", "folded", "kept"):
                    c[f"b_{k}"] += b[k] if b else 0
                    c[f"n_{k}"] += now[k]
                c["b_gate"] += bool(b and b["check_exit"] == 0 and entry["onnx_bn_layers"])
                c["n_gate"] += now["check_exit"] == 0 and now["folded"] < entry["onnx_bn_layers"]
                c["verified"] += now["verified"]
            total.update(c)
            cells = [
                route,
                model,
                str(c["files"]),
                str(c["layers"]),
                str(c["fused"]),
                f"{c['b_found']} → {c['n_found']}",
                f"{c['b_folded']} → {c['n_folded']}",
                f"{c['b_kept']} → {c['n_kept']}",
                f"{c['b_gate']} → {c['n_gate']} files",
                f"{c['verified']}/{c['files']}",
            ]
            print(
                ("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else "")
            )
    cells = [
        "**all**" if args.markdown else "all",
        "",
        str(total["files"]),
        str(total["layers"]),
        str(total["fused"]),
        f"{total['b_found']} → {total['n_found']}",
        f"{total['b_folded']} → {total['n_folded']}",
        f"{total['b_kept']} → {total['n_kept']}",
        f"{total['b_gate']} → {total['n_gate']} files",
        f"{total['verified']}/{total['files']}",
    ]
    print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    if args.per_file:
        print()
        for name, entry, b, now in rows:
            print(
                f"{name}: layers {entry['keras_bn_layers']}, in graph {entry['onnx_bn_layers']}; "
                f"before found {b['found']} folded {b['folded']} kept {_reasons(b['kept_reasons'])}"
                f" check {b['check_exit']}; now found {now['found']} folded {now['folded']} kept "
                f"{_reasons(now['kept_reasons'])} check {now['check_exit']} "
                f"verified {now['verified']}"
            )


if __name__ == "__main__":
    main()
