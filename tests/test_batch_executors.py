"""Batch folding on any ``concurrent.futures.Executor`` and on a real Dask cluster (``--scheduler``).

The Dask tests start a ``distributed.LocalCluster`` in this process, listening on loopback only, and
fold the same folder as ``--jobs`` (with a failing model in the middle): the per-model results,
order, JSON report, exit code and progress lines must be the same.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import write_unfoldable_model
from typer.testing import CliRunner

from bnfold.batch import dask_executor, expand_inputs, fold_many
from bnfold.cli import app
from bnfold.options import FoldOptions

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def tree(tmp_path) -> Path:
    """models/{a_cnn1d, b_broken, c_kept_bn, d_mlp_bn}.onnx: the failing model is in the middle."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(SAMPLES / "cnn1d.onnx", models / "a_cnn1d.onnx")
    (models / "b_broken.onnx").write_bytes(b"this is not a model")
    write_unfoldable_model(models / "c_kept_bn.onnx")
    shutil.copy(SAMPLES / "mlp_bn.onnx", models / "d_mlp_bn.onnx")
    return tmp_path


NAMES = ["a_cnn1d.onnx", "b_broken.onnx", "c_kept_bn.onnx", "d_mlp_bn.onnx"]


def summary(report: dict) -> list[tuple]:
    """What must not depend on where the models were folded (no timings, no absolute paths)."""
    return [
        (
            Path(m["input"]).name,
            m["exit_code"],
            m["passed"],
            m["error"],
            json.dumps(m.get("batchnorms"), sort_keys=True),
        )
        for m in report["models"]
    ]


def check_models(report: dict, out: Path) -> None:
    assert [
        Path(m["input"]).name for m in report["models"]
    ] == NAMES  # input order, not finish order
    broken = report["models"][1]
    assert broken["exit_code"] == 2 and "not a valid ONNX model" in broken["error"]
    assert all(m["passed"] for k, m in enumerate(report["models"]) if k != 1)
    assert report["exit_code"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "a_cnn1d.onnx",
        "c_kept_bn.onnx",
        "d_mlp_bn.onnx",
    ]


def test_fold_many_accepts_any_executor(tree):
    tasks = [(src, tree / "out" / rel) for src, rel in expand_inputs([tree / "models"])]
    seen = []

    with ThreadPoolExecutor(2) as pool:
        result = fold_many(
            tasks,
            options=FoldOptions(),
            executor=pool,
            on_done=lambda item, done, n: seen.append((done, n)),
        )

    check_models(result.to_dict(), tree / "out")
    assert sorted(seen) == [(1, 4), (2, 4), (3, 4), (4, 4)]  # progress once per model
    assert not pool._threads or all(not t.is_alive() for t in pool._threads)  # caller shut it down


def test_a_task_that_raises_on_the_executor_is_that_models_error(tree):
    class Exploding(ThreadPoolExecutor):
        def submit(self, fn, task, /):  # noqa: ANN001 - Executor.submit
            if "c_kept_bn" in task[0]:
                return super().submit(_raise)
            return super().submit(fn, task)

    tasks = [(src, tree / "out" / rel) for src, rel in expand_inputs([tree / "models"])]
    with Exploding(2) as pool:
        result = fold_many(tasks, executor=pool)

    items = result.items
    assert [i.exit_code for i in items] == [0, 2, 3, 0]
    assert items[2].error == "worker failed: lost the worker"


def _raise():
    raise RuntimeError("lost the worker")


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=50,
    ) as c:
        yield c


def test_dask_scheduler_gives_the_same_batch_as_jobs(tree, cluster):
    local = invoke("fold", tree / "models", "-O", tree / "local", "--jobs", "2", "--json", "-")
    dask = invoke(
        "fold",
        tree / "models",
        "-O",
        tree / "dask",
        "--scheduler",
        cluster.scheduler_address,
        "--json",
        "-",
    )

    assert local.exit_code == dask.exit_code == 2, dask.output
    local_report = json.loads(local.stdout)
    dask_report = json.loads(dask.stdout)
    check_models(dask_report, tree / "dask")
    assert summary(dask_report) == summary(local_report)
    assert dask_report["jobs"] == 2  # the cluster's worker threads


def test_dask_scheduler_from_the_environment_with_progress_lines(tree, cluster):
    env = {"BNFOLD_SCHEDULER": cluster.scheduler_address}

    result = invoke("fold", tree / "models", "-O", tree / "out", env=env)

    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    for k in range(1, 5):
        assert any(line.startswith(f"[{k}/4] ") for line in lines), result.output
    assert "b_broken.onnx" in result.output and lines[-1].strip().endswith("FAILED")
    assert sorted(p.name for p in (tree / "out").iterdir()) == NAMES[:1] + NAMES[2:]


def test_dask_executor_is_usable_from_the_api(tree, cluster):
    tasks = [(src, tree / "out" / rel) for src, rel in expand_inputs([tree / "models"])]
    with dask_executor(cluster.scheduler_address) as (executor, workers):
        result = fold_many(tasks, jobs=workers, executor=executor)
    check_models(result.to_dict(), tree / "out")


def test_unreachable_scheduler_is_one_line_exit_2(tree):
    pytest.importorskip("distributed")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from bnfold import batch

    with pytest.raises(Exception) as info:
        with batch.dask_executor(f"tcp://127.0.0.1:{port}", timeout=2):
            pass
    assert info.type.__name__ == "UsageError" and "cannot reach the Dask scheduler" in str(
        info.value
    )


def test_scheduler_without_dask_installed_is_one_line_exit_2(tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed → ImportError

    result = invoke("fold", tree / "models", "-O", tree / "out", "--scheduler", "tcp://h:8786")

    assert result.exit_code == 2
    assert (
        "pip install distributed" in result.output
        and "bnfold[" not in result.output
        and "Traceback" not in result.output
    )
    assert not (tree / "out").exists() or not any((tree / "out").iterdir())
