"""The long differential-fuzzing run of bnfold's fold: thousands of random models.

Each model is drawn by ``tests/fuzz_models.py`` from ``random.Random(seed)`` for seeds
``--seed`` .. ``--seed + --models - 1`` (so any model is reproduced from its seed), folded with
``bnfold.fold``, and judged against a float64 truth (see that module's docstring). Prints the counts:
models tried, folded, kept, imprecise (exact in real arithmetic, but rounding in the model's dtype
costs more than the original's), wrong, crashed, refused with a BnfoldError, skipped (the original
itself does not run, or the two engines disagree on it); BNs folded and kept, with the kept reasons;
a breakdown by dtype and placement; and every wrong or crashed model with its seed. Exit status 1
when any model is wrong or crashed.

With ``--corrupt`` it fuzzes the other side instead: ``bnfold fold`` (the CLI, in-process) on
corrupted copies of the sample models (random byte edits, and structural edits: rewired inputs,
changed ops, attributes, weight values/shapes/dtypes, deleted or duplicated nodes, opsets), and, for
15% of the seeds, issue 15's hostile families (a sparse 1 TiB tensor, a Constant in external data,
-o a device node or a FIFO, a crafted previous output naming another input's data, a .pt2 zip bomb). Exit 0 and
exit 2 with one line are fine; exit 1 means a fold broke a model that ran (verification caught it),
exit 3 or a traceback is a crash.

Usage::

    python benchmarks/fuzz_long.py --models 20000 --seed 0          # both cores
    python benchmarks/fuzz_long.py --models 1 --seed 1234 --show     # one model, in detail
    python benchmarks/fuzz_long.py --corrupt --models 4000 --seed 0  # corrupted files through the CLI
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import fuzz_models as fm  # noqa: E402  (after the path set-up)


def _one(seed: int) -> tuple[int, fm.Outcome | None]:
    case = fm.generate(random.Random(seed))
    if case is None:
        return seed, None
    return seed, fm.check(case)


def _chunk(seeds: list[int]) -> list[tuple[int, fm.Outcome | None]]:
    import warnings

    warnings.simplefilter("ignore")
    return [_one(s) for s in seeds]


def run(models: int, seed: int, jobs: int) -> tuple[fm.Tally, int, dict, list]:
    seeds = list(range(seed, seed + models))
    size = 50
    chunks = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    tally = fm.Tally()
    ungenerated = 0
    breakdown: dict[str, Counter] = defaultdict(Counter)
    imprecise: list[tuple[int, fm.Outcome]] = []
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = (r for chunk in pool.map(_chunk, chunks) for r in chunk)
            _collect(results, tally, breakdown, imprecise)
    else:
        _collect((r for chunk in map(_chunk, chunks) for r in chunk), tally, breakdown, imprecise)
    ungenerated = models - sum(tally.models.values())
    return tally, ungenerated, breakdown, imprecise


def _collect(results, tally: fm.Tally, breakdown: dict, imprecise: list) -> None:
    import ast

    for seed, outcome in results:
        if outcome is None:
            continue
        tally.add(seed, outcome)
        spec = ast.literal_eval(outcome.description)
        breakdown[f"dtype {spec['dtype']}"][outcome.status] += 1
        breakdown[f"placement {spec['placement']}"][outcome.status] += 1
        op = (spec.get("producer") or spec.get("consumer") or {}).get("op", "-")
        breakdown[f"op {op}"][outcome.status] += 1
        if outcome.status == "imprecise":
            imprecise.append((seed, outcome))


# ------------------------------------------------------------------------------ corrupted files
SAMPLES = ROOT / "sample_models"
_OPS = [
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Relu",
    "Identity",
    "BatchNormalization",
    "Mul",
    "Flatten",
    "MaxPool",
]


def _mutate_bytes(data: bytearray, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(data))
        k = rng.random()
        if k < 0.6:
            data[i] = rng.randrange(256)
        elif k < 0.8:
            del data[i : i + rng.randint(1, 16)]
        else:
            data[i:i] = rng.randbytes(rng.randint(1, 16))
    return "bytes"


def _mutate_graph(model, rng: random.Random) -> str:  # noqa: ANN001 - onnx.ModelProto
    """One structural edit that keeps the file a parseable model: rewire an input, change an op,
    an attribute, a weight's value/shape/dtype, delete or duplicate a node, add an output, change
    the opset."""
    import copy

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    names = (
        [i.name for i in g.input]
        + [i.name for i in g.initializer]
        + [o for n in g.node for o in n.output]
    )
    if not g.node:
        return "none"
    n = rng.choice(list(g.node))
    k = rng.randrange(10)
    if k == 0 and n.input:
        n.input[rng.randrange(len(n.input))] = rng.choice(names)
        return "rewire"
    if k == 1:
        n.op_type = rng.choice(_OPS)
        return "op"
    if k == 2 and n.attribute:
        a = rng.choice(list(n.attribute))
        if a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([-1, 0, 1, 2, 3, 2**31, -(2**40)])
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = rng.choice([0.0, -1.0, 1e30, float("nan"), float("inf"), 1e-45])
        elif a.type == onnx.AttributeProto.INTS and len(a.ints):
            a.ints[rng.randrange(len(a.ints))] = rng.choice([-1, 0, 5, 2**40])
        return "attribute"
    if k in (3, 4, 7) and g.initializer:
        t = rng.choice(list(g.initializer))
        arr = numpy_helper.to_array(t).copy()
        if arr.dtype.kind != "f" or not arr.size:
            return "none"
        if k == 3:
            arr.reshape(-1)[rng.randrange(arr.size)] = rng.choice(
                [np.nan, np.inf, -np.inf, 0.0, 1e30, 65504, 1e-30]
            )
        elif k == 4:
            arr = arr.reshape(tuple(reversed(arr.shape)))
        else:
            arr = arr.astype(rng.choice([np.float16, np.float64, np.int64, np.int8]))
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        return ("value", "shape", "dtype")[(3, 4, 7).index(k)]
    if k == 5:
        g.node.remove(n)
        return "delete"
    if k == 6:
        c = copy.deepcopy(n)
        c.output[0] += "_dup"
        c.name += "_dup"
        g.node.append(c)
        return "duplicate"
    if k == 8:
        g.output.append(
            helper.make_tensor_value_info(rng.choice(names), onnx.TensorProto.FLOAT, None)
        )
        return "output"
    model.opset_import[0].version = rng.choice([6, 7, 9, 11, 13, 14, 15, 18, 21])
    return "opset"


_HOSTILE = ["sparse-tib", "constant-external", "device-output", "fifo-output",
            "crafted-previous-output", "zip-bomb-pt2"]  # fmt: skip


def _external_entry(t, location: str, offset: int, length: int) -> None:  # noqa: ANN001
    import onnx

    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)


def _hostile_one(seed: int, rng: random.Random, src: Path, d: Path) -> tuple[str, int, str]:
    """Issue 15's families: inputs and outputs crafted against bnfold's integrity, not its parser.

    Fine: exit 2 in one line with nothing harmed, or exit 0 with a self-contained output. The codes
    -4 (an output referencing data that is not there) and -5 (a file bnfold must not touch was
    changed, replaced or removed) are failures."""
    import stat
    import zipfile

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from typer.testing import CliRunner

    from bnfold.cli import app

    family = rng.choice(_HOSTILE)
    model = onnx.load(str(src))
    path, out = d / "m.onnx", d / "o.onnx"
    args = ["fold", str(path), "-o", str(out), "-q"]
    guard: dict[Path, bytes] = {}
    if family == "sparse-tib":
        big = d / "big.data"
        with open(big, "wb") as f:
            f.truncate(1 << rng.choice([36, 38, 40]))
        t = onnx.TensorProto(
            name="huge", data_type=onnx.TensorProto.FLOAT, dims=[big.stat().st_size // 4]
        )
        _external_entry(t, "big.data", 0, big.stat().st_size)
        model.graph.initializer.append(t)
    elif family == "constant-external":
        value = np.float32(rng.uniform(-2, 2)).reshape(())
        (d / "k.bin").write_bytes(value.tobytes())
        t = numpy_helper.from_array(value, "kv")
        _external_entry(t, "k.bin", 0, 4)
        model.graph.node.insert(0, helper.make_node("Constant", [], ["__k"], value=t))
        model.graph.output.append(helper.make_tensor_value_info("__k", onnx.TensorProto.FLOAT, []))
        args.append("--no-verify")
    elif family == "device-output":
        out = d / "null"  # a private device node: never risk the machine's /dev/null
        try:
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except (OSError, AttributeError):
            return family, 2, "skipped (cannot create a device node)"
        args[3] = str(out)
    elif family == "fifo-output":
        os.mkfifo(out)
    elif family == "crafted-previous-output":
        # input v.onnx keeps its weight in out/m.onnx.data; a crafted earlier output out/m.onnx
        # names that file as its own data: folding m.onnx must not delete it
        (d / "out").mkdir()
        w = model.graph.initializer[0]
        victim_data = d / "out" / "m.onnx.data"
        victim_data.write_bytes(numpy_helper.to_array(w).tobytes())
        guard[victim_data] = victim_data.read_bytes()
        victim = onnx.ModelProto()
        victim.CopyFrom(model)
        _external_entry(victim.graph.initializer[0], "out/m.onnx.data", 0, len(guard[victim_data]))
        onnx.save(victim, d / "v.onnx")
        crafted = onnx.ModelProto()
        crafted.CopyFrom(model)
        _external_entry(crafted.graph.initializer[0], "m.onnx.data", 0, len(guard[victim_data]))
        onnx.save(crafted, d / "out" / "m.onnx")
        args = ["fold", str(d / "v.onnx"), str(path), "-O", str(d / "out"), "-q"]
    elif family == "zip-bomb-pt2":
        path = d / "m.pt2"
        args[1] = str(path)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("m/archive_format", "pt2")
            z.writestr("m/extra/bomb", b"\0" * (rng.randint(16, 64) << 20))
    if family != "zip-bomb-pt2":
        path.write_bytes(model.SerializeToString())
    result = CliRunner().invoke(app, args)
    code, message = result.exit_code, (result.stderr or "").strip()
    if code == 2 and len(message.splitlines()) != 1:
        code = -2
    if family == "device-output" and not stat.S_ISCHR(os.stat(out).st_mode):
        code, message = -5, "the device node was replaced"
    if family == "fifo-output" and not stat.S_ISFIFO(os.stat(out).st_mode):
        code, message = -5, "the FIFO was replaced"
    for f, data in guard.items():
        if not f.exists() or f.read_bytes() != data:
            code, message = -5, f"{f.name} was changed or removed"
    if family == "constant-external" and code == 0:
        moved = d / "moved"
        moved.mkdir()
        os.replace(out, moved / "o.onnx")
        try:
            onnx.load(str(moved / "o.onnx"))  # loads every external tensor it references
        except Exception as exc:  # noqa: BLE001
            code, message = -4, f"output is not self-contained: {exc}"
    return family, code, message[-1500:]


def _corrupt_one(seed: int) -> tuple[int, str, int, str]:
    """Corrupt a sample model (seeded), run ``bnfold fold`` on it; (seed, how, exit code, message)."""
    import tempfile

    import onnx
    from typer.testing import CliRunner

    from bnfold.cli import app

    rng = random.Random(seed)
    samples = sorted(SAMPLES.glob("*.onnx"))
    src = samples[seed % len(samples)]
    if rng.random() < 0.15:
        with tempfile.TemporaryDirectory() as d:
            how, code, message = _hostile_one(seed, rng, src, Path(d))
        return seed, f"{src.name}:{how}", code, message
    if rng.random() < 0.5:
        data = bytearray(src.read_bytes())
        how = _mutate_bytes(data, rng)
    else:
        model = onnx.load(str(src))
        how = "+".join(_mutate_graph(model, rng) for _ in range(rng.randint(1, 3)))
        try:
            data = bytearray(model.SerializeToString())
        except Exception:
            return seed, how, 2, "unserialisable"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        path.write_bytes(bytes(data))
        result = CliRunner().invoke(app, ["fold", str(path), "-o", str(Path(d) / "o.onnx"), "-q"])
        message = result.stderr or ""
        code = result.exit_code
        if code == 2 and len(message.strip().splitlines()) != 1:
            code = -2  # an error that is not one line
        if "Traceback" in message and code != 3:
            code = -3  # a traceback printed although the run did not fail as a bug
    return seed, f"{src.name}:{how}", code, message.strip()[-1500:]


def _corrupt_chunk(seeds: list[int]) -> list[tuple[int, str, int, str]]:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    return [_corrupt_one(s) for s in seeds]


def corrupt(models: int, seed: int, jobs: int) -> int:
    """Run bnfold on ``models`` corrupted sample files. Fine: exit 0 (folded), 2 (refused, one line).
    Exit 1 means the fold broke a model that ran (verification caught it; with --no-verify it would
    have been written); 3, a traceback, or a multi-line error are crashes."""
    seeds = list(range(seed, seed + models))
    chunks = [seeds[i : i + 50] for i in range(0, len(seeds), 50)]
    t0 = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = [r for chunk in pool.map(_corrupt_chunk, chunks) for r in chunk]
    else:
        results = [r for chunk in map(_corrupt_chunk, chunks) for r in chunk]
    codes = Counter(code for _, _, code, _ in results)
    print(
        f"bnfold fold on corrupted sample models: seeds {seed}..{seed + models - 1}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(
        f"files {models}: folded (exit 0) {codes[0]}, refused in one line (exit 2) {codes[2]}, "
        f"verification failed (exit 1) {codes[1]}, crashed (exit 3) {codes[3]}, "
        f"traceback or multi-line error {codes[-3] + codes[-2]}, output not self-contained "
        f"{codes[-4]}, a protected file harmed {codes[-5]}"
    )
    bad = [(s, how, c, m) for s, how, c, m in results if c not in (0, 2)]
    for s, how, c, m in bad:
        print(f"\nexit {c} seed {s} ({how}):\n{m}")
    print("\nPASSED" if not bad else f"\nFAILED: {len(bad)} file(s)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", type=int, default=5000, help="number of seeds to draw (default 5000)"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: all cores)",
    )
    p.add_argument(
        "--show",
        action="store_true",
        help="print each model's spec and outcome (use with few --models)",
    )
    p.add_argument(
        "--corrupt",
        action="store_true",
        help="instead: run 'bnfold fold' on --models corrupted sample models (random byte edits "
        "and structural edits) and count exit codes",
    )
    args = p.parse_args(argv)
    if args.corrupt:
        return corrupt(args.models, args.seed, args.jobs)

    if args.show:
        for s in range(args.seed, args.seed + args.models):
            case = fm.generate(random.Random(s))
            if case is None:
                print(f"seed {s}: the draw makes no valid model")
                continue
            import onnx

            print(f"seed {s}: {case.description}\n{onnx.printer.to_text(case.model.graph)}")
            o = fm.check(case)
            print(f"-> {o.status} {o.decisions} {o.message}\n")
        return 0

    t0 = time.perf_counter()
    tally, ungenerated, breakdown, imprecise = run(args.models, args.seed, args.jobs)
    elapsed = time.perf_counter() - t0
    m, b = tally.models, tally.bns
    tried = sum(m.values())
    print(
        f"bnfold fuzz: seeds {args.seed}..{args.seed + args.models - 1}, {args.jobs} job(s), {elapsed:.0f} s"
    )
    print(
        f"models tried {tried} (+{ungenerated} draws that make no valid model); "
        f"folded {m['folded']}, kept {m['kept']}, imprecise {m['imprecise']}, wrong {m['wrong']}, "
        f"crashed {m['crash']}, BnfoldError {m['error']}, skipped {m['skipped']}"
    )
    print(f"BatchNorms: {sum(b.values())}, folded {b['folded']}, kept {b['kept']}")
    print("kept reasons: " + ", ".join(f"{r} {n}" for r, n in tally.reasons.most_common()))
    print()
    statuses = ["folded", "kept", "imprecise", "wrong", "crash", "error", "skipped"]
    print(f"{'':28}" + "".join(f"{s:>10}" for s in statuses))
    for key in sorted(breakdown):
        print(f"{key:28}" + "".join(f"{breakdown[key][s]:>10}" for s in statuses))
    if imprecise:
        ratios = sorted(o.offset_ratio for _, o in imprecise)
        print(
            f"\nimprecise: {len(imprecise)} models, all with a BN whose max |mean| / std is between "
            f"{ratios[0]:.3g} and {ratios[-1]:.3g}:"
        )
        for seed, o in imprecise[:12]:
            print(f"  seed {seed} [{o.dtype}, |mean|/std {o.offset_ratio:.3g}]: {o.message[:160]}")
    for seed, o in tally.failures:
        print(f"\n{o.status.upper()} seed {seed}: {o.description}\n{o.message}")
        print(f"  reproduce: python benchmarks/fuzz_long.py --models 1 --seed {seed} --show")
    print("\nPASSED" if not tally.failures else f"\nFAILED: {len(tally.failures)} model(s)")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
