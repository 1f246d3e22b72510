"""Fixtures shared by every test. Helper functions live in ``helpers.py`` (and ``foldchecks.py``,
``fuzz_models.py``); this file holds fixtures only.

Isolation: every test gets its own temporary folder as ``TMPDIR`` (``tempfile.gettempdir()`` in this
process, the environment of every subprocess it starts). A test therefore never sees what other
processes on the machine leave in the shared temporary folder (another bnfold run's ``bnfold-*``
work folders, say), and what it finds in its temporary folder afterwards was left by the code
under test.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helper modules' own ``assert`` statements get pytest's detailed failure messages too.
pytest.register_assert_rewrite("helpers", "foldchecks", "fuzz_models")

#: The temporary folder the test session itself started with (shared with other processes).
SHARED_TEMP = Path(tempfile.gettempdir())


@pytest.fixture(autouse=True)
def private_tempdir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A fresh, empty temporary folder per test: ``TMPDIR`` and ``tempfile.tempdir`` point to it.

    It is a sibling of the test's ``tmp_path``, not inside it, so a test that snapshots its
    ``tmp_path`` does not see temporary work folders come and go.
    """
    folder = tmp_path_factory.mktemp("TMPDIR", numbered=True)
    monkeypatch.setenv("TMPDIR", str(folder))
    for name in ("TEMP", "TMP"):  # consulted first on Windows, after TMPDIR elsewhere
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder


@pytest.fixture
def shared_temp() -> Path:
    """The machine's shared temporary folder (where other processes' files appear)."""
    return SHARED_TEMP
