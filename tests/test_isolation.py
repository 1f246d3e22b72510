"""Tests do not observe global state that other processes share (issue 16).

conftest's autouse ``private_tempdir`` gives every test its own empty temporary folder, as
``tempfile.gettempdir()`` in-process and as ``TMPDIR`` for subprocesses; bnfold creates its
temporary work folders through ``tempfile``, so they land there, and are removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import pytest

import bnfold

ROOT = Path(__file__).resolve().parent.parent
SEEN: set[Path] = set()


@pytest.mark.parametrize("run", [1, 2])
def test_every_test_gets_its_own_empty_tempdir(run, private_tempdir, shared_temp):
    assert Path(tempfile.gettempdir()) == private_tempdir
    assert os.environ["TMPDIR"] == str(private_tempdir)
    assert private_tempdir != shared_temp and private_tempdir.is_dir()
    assert not any(private_tempdir.iterdir())
    assert private_tempdir not in SEEN, "two tests shared a temporary folder"
    SEEN.add(private_tempdir)
    (private_tempdir / "left-behind").write_text("x")  # the next test must not see it


def test_subprocesses_inherit_the_private_tempdir(private_tempdir):
    out = subprocess.run(
        [sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(out.stdout.strip()) == private_tempdir


def test_bnfold_work_folders_honour_tmpdir(private_tempdir, monkeypatch):
    """Folding a ModelProto with verification stages the models in a work folder: it is made under
    TMPDIR (not next to the input, not in a fixed /tmp) and removed afterwards."""
    made: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        path = real_mkdtemp(*args, **kwargs)
        made.append(Path(path))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    result = bnfold.fold(onnx.load(ROOT / "sample_models" / "cnn2d.onnx"))
    assert result.passed
    assert made, "no temporary work folder was made (the check would be vacuous)"
    assert all(private_tempdir in p.parents for p in made), made
    # What is left is at most ONNX Runtime's own session-id file, written when it is imported.
    assert {p.name for p in private_tempdir.iterdir()} <= {".ses"}
