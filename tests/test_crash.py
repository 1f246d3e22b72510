"""Crash safety: SIGKILL at any moment of ``bnfold fold`` never leaves a half-written output.

The model has tens of MB of external data, and the output path already holds a previous fold (of
another model) with its own external data. ``python cli.py fold`` runs in a subprocess and is killed
with SIGKILL:

* as soon as its staging folder ``.out.onnx.bnfold-*`` appears, and while it writes the staged data;
* after seeded random delays spread over the length of a complete run;
* at each step of the commit (before and after the data file is published, after the model is
  replaced, before old data is removed), by a wrapper that kills the process from inside.

After every kill the output path holds either exactly the previous model, whose external data is
still there with its previous bytes, or the complete new model, which loads with its external data
and computes what the input computes. Any other visible file is a complete data file. Finally a
normal run succeeds and removes the staging folders the kills left behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

C, LAYERS = 256, 10  # ten 256x256x3x3 float32 weights: 22.5 MiB of external data


def build(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "X"
    for i in range(LAYERS):
        w = (rng.standard_normal((C, C, 3, 3)) * (2 / (9 * C)) ** 0.5).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        for k, v in {
            "s": rng.uniform(0.5, 1.5, C),
            "b": rng.normal(0, 0.1, C),
            "m": rng.normal(0, 0.1, C),
            "v": rng.uniform(0.5, 2.0, C),
        }.items():
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{k}{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        y = "Y" if i == LAYERS - 1 else f"y{i}"
        nodes.append(
            helper.make_node(
                "BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [y]
            )
        )
        x = y
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, C, 4, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, C, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def run_model(path: Path) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, C, 4, 4)).astype(np.float32)
    return session.run(None, {"X": x})[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def referenced_data(model_path: Path) -> set[str]:
    proto = onnx.load(str(model_path), load_external_data=False)
    return {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }


def visible_state(folder: Path) -> dict[str, str]:
    """Digest of every non-hidden file in the folder."""
    return {
        p.name: digest(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    }


FOLD = [sys.executable, str(ROOT / "cli.py"), "fold", "in.onnx", "-o", "out.onnx", "-q"]
#: the checkout first on the path, also for ``python -c`` (cli.py finds it by itself)
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}

KILL_INSIDE = """\
import os, signal, sys
import bnfold.io as bio
name, when = sys.argv[1].split(":")
real = getattr(bio, name)
def wrapped(*args, **kwargs):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(bio, name, wrapped)
sys.argv = ["bnfold"] + sys.argv[2:]
from bnfold.cli import main
main()
"""


class Scene:
    """The folder: in.onnx (+ data) to fold, out.onnx holding a previous fold, and the expectations."""

    def __init__(self, folder: Path) -> None:
        from bnfold.api import fold

        self.folder = folder
        build(folder / "in.onnx", seed=1)
        build(folder / "other.onnx", seed=2)
        self.inputs = {
            p: digest(folder / p)
            for p in ("in.onnx", "in.onnx.data", "other.onnx", "other.onnx.data")
        }
        self.expected = run_model(folder / "in.onnx")
        # The fold is deterministic: every complete new data file has these bytes.
        reference = folder.parent / f"{folder.name}-reference"
        reference.mkdir()
        fold(folder / "in.onnx", reference / "out.onnx", verify=False)
        (new_data,) = referenced_data(reference / "out.onnx")
        self.new_data = digest(reference / new_data)
        done = subprocess.run(
            [*FOLD[:3], "other.onnx", *FOLD[4:]], cwd=folder, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        self.remember()

    def remember(self) -> None:
        """Record the current output as 'the previous one' for the next kill."""
        self.previous = visible_state(self.folder)
        self.previous_data = {
            name: self.previous[name] for name in referenced_data(self.folder / "out.onnx")
        }

    def check(self, label: str) -> str:
        """The invariant after a kill; returns 'previous' or 'new'."""
        out = self.folder / "out.onnx"
        state = visible_state(self.folder)
        for name, d in self.inputs.items():
            assert state.get(name) == d, f"{label}: input {name} changed"
        assert "out.onnx" in state, f"{label}: the previous output disappeared"
        if state["out.onnx"] == self.previous["out.onnx"]:
            outcome = "previous"
            for name, d in self.previous_data.items():  # the data the old model reads is intact
                assert state.get(name) == d, f"{label}: {name}, read by the previous model, changed"
        else:
            outcome = "new"
            refs = referenced_data(out)
            assert refs, f"{label}: the new model has no external data"
            for name in refs:
                assert state.get(name) == self.new_data, (
                    f"{label}: {name} of the new model is not complete"
                )
            onnx.checker.check_model(str(out), full_check=True)
            got = run_model(out)
            np.testing.assert_allclose(
                got, self.expected, rtol=1e-4, atol=1e-4 * float(np.abs(self.expected).max())
            )
        known = {self.new_data, *self.previous.values()}
        for name, d in state.items():
            if name in self.inputs or name == "out.onnx":
                continue
            assert name.startswith("out.onnx.") and name.endswith(".data"), (
                f"{label}: stray file {name}"
            )
            assert d in known, f"{label}: {name} is neither a complete new data file nor an old one"
        for p in self.folder.iterdir():
            if p.name.startswith("."):
                assert p.name.startswith(".out.onnx.bnfold-") and p.is_dir(), (
                    f"{label}: unexpected {p.name}"
                )
        self.remember()
        return outcome


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL ``proc``; True if it was still running."""
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".out.onnx.bnfold-")]


def _poll_kill(folder: Path, ready, timeout: float = 60) -> bool:
    proc = subprocess.Popen(FOLD, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            break
        time.sleep(0.0005)
    return _kill(proc)


@pytest.mark.slow  # about 1-2 minutes of killed subprocesses; `-m "not slow"` skips it
def test_sigkill_never_leaves_a_half_written_output(tmp_path):
    scene = Scene(tmp_path)
    outcomes = []

    # 1. The moment the staging folder appears, and while the staged data file grows.
    killed = _poll_kill(tmp_path, lambda: bool(_staging(tmp_path)))
    outcomes.append(("staging appeared", killed, scene.check("staging appeared")))

    def data_growing() -> bool:
        return any(
            f.is_file() and f.stat().st_size > 0
            for d in _staging(tmp_path)
            for f in d.rglob("*.data")
        )

    killed = _poll_kill(tmp_path, data_growing)
    outcomes.append(("writing data", killed, scene.check("writing data")))

    # 2. Inside the commit, from within the process.
    for step in (
        "_publish_data:before",
        "_publish_data:after",
        "_replace_model:after",
        "_remove_files:before",
    ):
        proc = subprocess.run(
            [sys.executable, "-c", KILL_INSIDE, step, *FOLD[2:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=ENV,
        )
        assert proc.returncode == -signal.SIGKILL, (step, proc.returncode, proc.stderr)
        outcomes.append((step, True, scene.check(step)))

    # 3. Random moments over a complete run's length.
    t0 = time.monotonic()
    done = subprocess.run(FOLD, cwd=tmp_path, capture_output=True, text=True)
    full = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    outcomes.append(("complete run", False, scene.check("complete run")))
    rng = random.Random(20240601)
    for i in range(4):
        delay = rng.uniform(0.1, 1.1) * full
        proc = subprocess.Popen(
            FOLD, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        killed = _kill(proc)
        outcomes.append(
            (f"after {delay:.2f}s", killed, scene.check(f"random kill {i} at {delay:.2f}s"))
        )

    kinds = {o for _, _, o in outcomes}
    assert "previous" in kinds and "new" in kinds, outcomes
    # the commit-step kills land exactly where expected
    by_step = {label: o for label, _, o in outcomes}
    assert by_step["_publish_data:before"] == "previous"
    assert (
        by_step["_publish_data:after"] == "previous"
    )  # new data in place, old model still in charge
    assert by_step["_replace_model:after"] == "new"

    # 4. A later run removes the staging folders of the dead runs once they are old enough.
    left = _staging(tmp_path)
    assert left, "the kills should have left staging folders"
    old = time.time() - 3600
    for d in left:
        os.utime(d, (old, old))
    done = subprocess.run(FOLD, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert scene.check("final run") == "new"
    assert _staging(tmp_path) == []
    data_files = sorted(
        p.name
        for p in tmp_path.iterdir()
        if p.name.startswith("out.onnx.") and p.name.endswith(".data")
    )
    assert set(referenced_data(tmp_path / "out.onnx")) <= set(data_files)


def test_staging_folder_of_a_live_process_is_kept(tmp_path):
    from bnfold import io as bio

    live = tmp_path / f".out.onnx.bnfold-{os.getpid()}-abc"
    dead = tmp_path / ".out.onnx.bnfold-999999999-abc"
    young = tmp_path / ".out.onnx.bnfold-999999998-abc"
    for d in (live, dead, young):
        d.mkdir()
    old = time.time() - 3600
    for d in (live, dead):
        os.utime(d, (old, old))
    removed = bio.remove_stale_staging(tmp_path, "out.onnx")
    assert removed == [dead]
    assert live.exists() and young.exists() and not dead.exists()


# ------------------------------------------------------------------------------ the commit protocol
def _small(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 3, 1, 1)).astype(np.float32)  # > 256 bytes: stays external
    inits = [numpy_helper.from_array(w, "w")] + [
        numpy_helper.from_array(v.astype(np.float32), k)
        for k, v in {
            "s": rng.uniform(0.5, 1, 64),
            "b": rng.normal(size=64),
            "m": rng.normal(size=64),
            "v": rng.uniform(0.5, 1, 64),
        }.items()
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["X", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["Y"]),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 64, 2, 2])],
        inits,
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(path),
        save_as_external_data=True,
        location=path.name + ".data",
        size_threshold=0,
    )


def _data_files(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.startswith("out.onnx") and p.name.endswith(".data")
    )


def test_rewriting_an_output_never_overwrites_its_data_and_removes_the_old_data(tmp_path):
    from bnfold.api import fold

    _small(tmp_path / "a.onnx", 1)
    _small(tmp_path / "b.onnx", 2)
    out = tmp_path / "out.onnx"
    fold(tmp_path / "a.onnx", out, verify=False)
    assert _data_files(tmp_path) == ["out.onnx.data"]
    fold(tmp_path / "b.onnx", out)  # out.onnx.data is taken: the new data gets a fresh name
    (second,) = referenced_data(out)
    assert second != "out.onnx.data" and _data_files(tmp_path) == [second]  # the old one is gone
    fold(tmp_path / "a.onnx", out)
    assert referenced_data(out) == {"out.onnx.data"} and _data_files(tmp_path) == ["out.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)


def test_data_of_a_renamed_output_and_of_the_input_is_left_alone(tmp_path):
    from bnfold.api import fold

    _small(tmp_path / "a.onnx", 1)
    out = tmp_path / "out.onnx"
    fold(tmp_path / "a.onnx", out, verify=False)
    out.rename(tmp_path / "kept.onnx")  # still reads out.onnx.data
    kept = run_model_small(tmp_path / "kept.onnx")
    fold(tmp_path / "a.onnx", out, verify=False)
    np.testing.assert_array_equal(run_model_small(tmp_path / "kept.onnx"), kept)
    # A copy of the output folded back onto it: its data (the input's) must survive the cleanup.
    (tmp_path / "copy.onnx").write_bytes(out.read_bytes())
    fold(tmp_path / "copy.onnx", out, verify=False)
    assert all((tmp_path / n).is_file() for n in referenced_data(tmp_path / "copy.onnx"))
    run_model_small(tmp_path / "copy.onnx")


def run_model_small(path: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": np.ones((1, 3, 2, 2), np.float32)})[0]
