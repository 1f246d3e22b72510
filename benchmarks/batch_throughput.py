"""Models per second for batch folding: a plain loop, ``--jobs 1``, ``--jobs 2``, a Dask cluster.

Builds a folder of small models (``--copies`` copies of each shipped sample model), then
folds the whole folder, each way timed end to end in its own fresh process (interpreter start-up and
imports included, as a user running the command would see):

* ``python loop``: a plain ``for`` loop calling ``bnfold.fold(src, dst)`` in one process;
* ``bnfold fold DIR -O OUT --jobs 1``: the CLI, one model after another in its own process;
* ``--jobs 2``: a pool of 2 spawned worker processes, created once for the batch and warmed
  (heavy imports done once per worker, then model after model);
* ``--scheduler``: a ``dask.distributed.LocalCluster(n_workers=2, threads_per_worker=1)`` on
  loopback (its start-up is outside the timing: a cluster is already running in real use).

Every way verifies each model (the default). Run from the repository root::

    python benchmarks/batch_throughput.py                  # 5 sample models x 4 copies
    python benchmarks/batch_throughput.py --copies 10 --no-dask
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOOP = """\
import sys
from pathlib import Path
import bnfold
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
failed = 0
for p in sorted(src.glob("*.onnx")):
    failed += not bnfold.fold(p, dst / p.name)
sys.exit(1 if failed else 0)
"""


def build_folder(folder: Path, copies: int) -> int:
    folder.mkdir(parents=True)
    samples = sorted((ROOT / "sample_models").glob("*.onnx"))
    for k in range(copies):
        for s in samples:
            shutil.copy(s, folder / f"{s.stem}_{k}.onnx")
    return copies * len(samples)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0,):
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
    return wall, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="copies of each sample model")
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask LocalCluster row")
    args = ap.parse_args()
    rows: list[tuple[str, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        n = build_folder(tmp_path / "models", args.copies)
        bnfold_cli = [sys.executable, "-m", "bnfold", "fold", str(tmp_path / "models"), "-q"]

        def out(name: str) -> Path:
            path = tmp_path / name
            path.mkdir()
            return path

        rows.append(
            (
                "python loop: bnfold.fold",
                *timed([sys.executable, "-c", LOOP, str(tmp_path / "models"), str(out("loop"))]),
            )
        )
        rows.append(
            ("bnfold fold --jobs 1", *timed(bnfold_cli + ["-O", str(out("j1")), "--jobs", "1"]))
        )
        rows.append(
            ("bnfold fold --jobs 2", *timed(bnfold_cli + ["-O", str(out("j2")), "--jobs", "2"]))
        )
        if not args.no_dask:
            from distributed import LocalCluster

            with LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=50,
            ) as cluster:
                env = {**os.environ, "BNFOLD_SCHEDULER": cluster.scheduler_address}
                rows.append(
                    (
                        "bnfold fold --scheduler (Dask, 2 workers)",
                        *timed(bnfold_cli + ["-O", str(out("dask"))], env),
                    )
                )
    print(
        f"{n} models ({args.copies} copies of each sample model), verified; {os.cpu_count()} cores"
    )
    width = max(len(r[0]) for r in rows)
    base = rows[0][1]
    print(f"{'way'.ljust(width)}  {'wall s':>7}  {'models/s':>8}  {'vs loop':>7}  exit")
    for name, wall, rc in rows:
        print(f"{name.ljust(width)}  {wall:7.2f}  {n / wall:8.2f}  {base / wall:6.2f}x  {rc}")
    return 1 if any(rc for _, _, rc in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
