"""Docs that cannot go stale: every path and public name the README names exists.

A module that became a package (``bnfold/passes.py`` → ``bnfold/passes/``) keeps its import path,
so a README path ``bnfold/X.py`` is satisfied by either ``bnfold/X.py`` or ``bnfold/X/__init__.py``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import bnfold

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# A repository path in running text: starts at a word boundary that is not part of a longer path.
PATH = re.compile(
    r"(?<![\w./-])((?:bnfold|benchmarks|sample_models|tests)/[\w.-]+(?:/[\w.-]+)*)(::\w+)?"
)


def _resolves(rel: str) -> bool:
    """``rel`` exists as a file or folder, or names a module that is now a package."""
    path = ROOT / rel.rstrip(".")
    if path.exists():
        return True
    if path.suffix == ".py":
        return (path.with_suffix("") / "__init__.py").is_file()
    return False


def readme_paths() -> list[tuple[str, str | None]]:
    found = [(m.group(1).rstrip("."), m.group(2)) for m in PATH.finditer(README)]
    return sorted(set(found), key=lambda p: (p[0], p[1] or ""))


def layout_modules() -> list[str]:
    """The modules and folders the ``bnfold/...`` entries of the README's "Project layout" block
    list, as paths (``bnfold/api.py``, ``bnfold/torch/files.py``, ``bnfold/cli/commands/``)."""
    section = README.split("## Project layout", 1)[1]
    block = section.split("```", 2)[1]
    entries = re.findall(r"^(bnfold/(?:\w+/)*)(.*?)(?=^\S|\Z)", block, re.S | re.M)
    assert entries, "the layout block has no bnfold/ entry"
    names = set()
    for folder, text in entries:
        text = re.sub(r"\([^)]*\)", "", text)  # "(the onnx_ir pass)" is prose
        names.update(folder + n for n in re.findall(r"(?<![\w./])(\w+\.py|\w+/)", text))
    return sorted(names)


def test_the_readme_names_paths_and_the_scan_finds_them():
    paths = {p for p, _ in readme_paths()}
    # The scan is not vacuous: these are named in the README today.
    assert {"sample_models/cnn2d.onnx", "benchmarks/fold_models.py"} <= paths
    assert any(p.startswith("bnfold/") for p in paths)
    assert "bnfold/api.py" in layout_modules()


@pytest.mark.parametrize("rel, test", readme_paths(), ids=lambda v: v or "")
def test_every_path_the_readme_names_exists(rel, test):
    assert _resolves(rel), f"README names {rel}, which does not exist"
    if test:  # tests/test_x.py::test_name
        source = (ROOT / rel).read_text(encoding="utf-8")
        assert re.search(rf"^def {re.escape(test[2:])}\(", source, re.M), f"{rel}{test} is gone"


def test_every_module_in_the_readme_layout_exists():
    missing = [m for m in layout_modules() if not _resolves(m)]
    assert not missing, f"the README's project layout names missing modules: {missing}"


def test_the_resolver_rejects_what_does_not_exist():
    assert not _resolves("bnfold/verify.py")  # the stale name the README used to carry
    assert not _resolves("sample_models/no_such_model.onnx")
    assert _resolves("bnfold/io.py") and _resolves("sample_models/")


@pytest.mark.parametrize(
    "dotted", sorted(set(re.findall(r"\bbnfold(?:\.[A-Za-z_]\w*)+", README))), ids=str
)
def test_every_bnfold_name_the_readme_uses_resolves(dotted):
    """``bnfold.fold``, ``bnfold.torch.fold_module``...: attributes of the package or a submodule.
    (``bnfold.torch`` imports torch only when one of its functions runs.)"""
    parts = dotted.split(".")
    obj = bnfold
    for i, name in enumerate(parts[1:], start=1):
        if not hasattr(obj, name):
            obj = importlib.import_module(".".join(parts[: i + 1]))
        else:
            obj = getattr(obj, name)
