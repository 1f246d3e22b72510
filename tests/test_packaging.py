"""The package's outer surface: the public API, the version, ``py.typed``, cheap ``import bnfold``.

``.ci/run`` additionally builds the wheel and the sdist and installs the wheel in a fresh virtual
environment; these tests check what can be checked from the checkout.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bnfold

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------- public API
def test_every_name_in_all_resolves():
    assert len(bnfold.__all__) == len(set(bnfold.__all__)), "a name is listed twice in __all__"
    for name in bnfold.__all__:
        assert getattr(bnfold, name) is not None, name


def test_all_and_the_lazy_table_agree():
    """Nothing public is missing from ``__all__``, and ``__all__`` lists nothing the package does
    not serve: the lazily imported names plus ``__version__`` are exactly ``__all__``."""
    assert set(bnfold._LAZY) | {"__version__"} == set(bnfold.__all__)


def test_dir_shows_the_public_names_and_no_other_public_attribute_exists():
    assert set(bnfold.__all__) <= set(dir(bnfold))
    # After every public name was imported, the package namespace holds no other public name
    # (submodules bound as attributes by their import are part of the package, not its API;
    # ``annotations`` is the ``from __future__`` import).
    for name in bnfold.__all__:
        getattr(bnfold, name)
    submodules = {name for name, value in vars(bnfold).items() if type(value) is type(importlib)}
    public = {n for n in vars(bnfold) if not n.startswith("_")} - submodules - {"annotations"}
    assert public <= set(bnfold.__all__), public - set(bnfold.__all__)


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        bnfold.no_such_name  # noqa: B018


def test_public_names_are_what_the_lazy_table_says():
    for name, (module, attr) in bnfold._LAZY.items():
        assert getattr(bnfold, name) is getattr(importlib.import_module(module), attr), name


def test_import_bnfold_imports_neither_torch_nor_onnxruntime():
    code = (
        "import sys, bnfold\n"
        "dir(bnfold)\n"
        "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --------------------------------------------------------------------------------------- version
def test_version_is_pep440_and_has_one_source():
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", bnfold.__version__)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"], "the version is written in pyproject.toml too"
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "bnfold.__version__"}


def test_installed_metadata_and_cli_agree_with_the_package():
    assert importlib.metadata.version("bnfold") == bnfold.__version__, (
        "the installed metadata is stale: reinstall (pip install -e .)"
    )
    out = subprocess.run(
        [sys.executable, "-m", "bnfold", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout.strip() == f"bnfold {bnfold.__version__}"


def test_the_changelog_has_a_section_for_the_version():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## {re.escape(bnfold.__version__)}\b", changelog, re.M)
    assert re.search(r"^## Unreleased\b", changelog, re.M)


# --------------------------------------------------------------------------------------- py.typed
def test_the_package_is_typed():
    """PEP 561: ``py.typed`` sits in the package and pyproject ships it as package data."""
    assert (Path(bnfold.__file__).parent / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["bnfold"]


# --------------------------------------------------------------------------------------- test suite
def test_the_longest_tests_are_marked_slow():
    """`python -m pytest -m "not slow"` is the quick local loop: the SIGKILL crash test and the
    long differential fuzz carry the declared ``slow`` marker (CI runs everything)."""
    import test_crash
    import test_fuzz

    for test in (
        test_crash.test_sigkill_never_leaves_a_half_written_output,
        test_fuzz.test_fold_is_equivalent_or_kept_with_a_reason,
    ):
        assert "slow" in {m.name for m in getattr(test, "pytestmark", [])}, test.__name__
