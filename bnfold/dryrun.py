"""``bnfold inspect``: what ``fold`` would do to every BatchNormalization, without writing anything.

The pass runs on a private copy of the model (a path is loaded with its weights memory-mapped; an
``onnx.ModelProto`` is wrapped, not modified; an ``onnx_ir.Model`` is cloned, sharing its tensors).
Folded weights are lazy, so a dry run never computes them: it costs about as much as loading.
"""

from __future__ import annotations

__all__ = ["inspect_model"]

import os
import time
from typing import Any

from . import io as _io
from .api import _count_nodes, _kind_of
from .passes import BatchNormFoldPass
from .report import FoldReport


def inspect_model(
    model: str | os.PathLike | Any,
    *,
    lower_remaining: bool = False,
    duplicate_shared: bool = False,
    allow_slower_folds: bool = False,
) -> FoldReport:
    """Decide every BatchNormalization of ``model`` as :func:`bnfold.fold` would, and report it.

    Args:
        model: a path to an ``.onnx`` file, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; none of
            them is modified, and nothing is written.
        lower_remaining, duplicate_shared, allow_slower_folds: the options of :func:`bnfold.fold`.

    Returns:
        A :class:`~bnfold.report.FoldReport` with one decision per BatchNormalization (and per
        decomposed BN that would fold): direction "backward" / "forward" / "decomposed" / "branch"
        and the target node, or the reason it would be kept (direction "lowered" when ``lower_remaining``
        would rewrite it). ``output`` is None, ``written`` False, ``verification`` None;
        ``nodes_after`` is the main graph's node count after the fold; ``timings`` has "load" and
        "fold". Bad input raises a :class:`~bnfold.errors.BnfoldError`.
    """
    kind, path = _kind_of(model)
    given: Any = model  # a ModelProto or an onnx_ir.Model when kind says so
    t0 = time.perf_counter()
    if kind == "path":
        assert path is not None  # _kind_of returns the path of a "path"
        ir_model = _io.load(path)
    elif kind == "proto":
        ir_model = _io.from_proto(given)
    else:
        ir_model = given.clone() if hasattr(given, "clone") else _io.from_proto(_io.to_proto(given))
    t1 = time.perf_counter()
    nodes_before = _count_nodes(ir_model)
    fold_pass = BatchNormFoldPass(
        lower_remaining=lower_remaining,
        duplicate_shared=duplicate_shared,
        allow_slower_folds=allow_slower_folds,
    )
    fold_pass(ir_model)
    t2 = time.perf_counter()
    return FoldReport(
        decisions=list(fold_pass.decisions),
        input=str(path) if path is not None else None,
        output=None,
        nodes_before=nodes_before,
        nodes_after=_count_nodes(ir_model),
        written=False,
        timings={"load": t1 - t0, "fold": t2 - t1},
    )
