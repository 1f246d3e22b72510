"""Folded weights: lazy tensors, and "check the range, then fold lazily" written once.

A folded weight is a :class:`FoldedTensor`: ``round(formula(W64))`` computed from the (possibly
memory-mapped) original only when its bytes are written, one weight at a time, so folding a model
with gigabytes of external weights never holds all of them in memory. A weight scaled per output row
(a backward fold into a Conv or a Gemm with transB=1) is computed a block of rows at a time, so the
float64 intermediate is a few MiB whatever the weight's size.

Whether the folded values fit the weight's dtype is checked *before* anything changes
(:func:`lazy_fold`): exactly, from per-channel maxima read in chunks (backward folds) or from the
folded values themselves (forward folds). A writer that can run the fold again (``bnfold.fold`` on a
path or a ModelProto) sets ``FoldContext.defer_range_check``: then a large weight is read once, when
it is written, and the range is checked there; a value out of range raises :class:`DeferredOverflow`,
the writer discards the staged output and folds again with that BN kept (``overflow``), so the
decisions are the same as with the check up front.
"""

from __future__ import annotations

__all__ = ["FoldedTensor"]

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bnfold import numerics
from bnfold.reasons import Refusal, SkipReason

from .common import FLOAT_DTYPES
from .context import FoldContext
from .rewiring import set_input

if TYPE_CHECKING:
    from .constants import Const

_CHUNK_BYTES = 64 << 20  # read weights in chunks of this size when scanning them
#: Rows of a row-separable folded weight are computed this many float64 bytes at a time.
_ROW_BLOCK_BYTES = 4 << 20
#: Weights at least this large skip the up-front range check when it may be deferred.
DEFER_MIN_BYTES = 1 << 20


class DeferredOverflow(Exception):
    """A folded weight whose range check was deferred overflowed while it was written.

    ``key`` is (graph label, BN label, what): the caller folds again with that fold refused."""

    def __init__(self, key: tuple[str, str, str], detail: str) -> None:
        super().__init__(f"{key[1]}: {detail}")
        self.key = key
        self.detail = detail


#: ``rows(block, sl)``: the float64 folded rows ``sl`` of a weight from its original rows ``block``.
RowFormula = Callable[[np.ndarray, slice], np.ndarray]


class FoldedTensor(ir.LazyTensor):
    """A folded weight: ``round(compute64())`` evaluated only when its bytes are needed.

    ``compute64`` returns the float64 result before rounding, so a second fold into the same weight
    (Conv → BN → BN) starts from unrounded values.
    """

    __slots__ = ("_blocks", "_overflow_key", "compute64")

    def __init__(
        self,
        compute64: Callable[[], np.ndarray],
        dtype: ir.DataType,
        shape: tuple[int, ...],
        name: str,
        *,
        blocks: Callable[[], Iterator[np.ndarray]] | None = None,
        overflow_key: tuple[str, str, str] | None = None,
    ) -> None:
        np_dtype = FLOAT_DTYPES[dtype]

        def func() -> ir.Tensor:
            with self._overflow_deferred():
                if blocks is not None:
                    arr = np.concatenate(list(blocks()), axis=0)
                else:
                    arr = numerics.round_to(compute64(), np_dtype, name)
            return ir.Tensor(arr, dtype=dtype, name=name)

        super().__init__(func, dtype=dtype, shape=ir.Shape(shape), name=name)
        self.compute64 = compute64
        self._blocks = blocks
        self._overflow_key = overflow_key

    @property
    def range_deferred(self) -> bool:
        """Whether this weight's range is checked only as it is written (see :func:`lazy_fold`)."""
        return self._overflow_key is not None

    @contextlib.contextmanager
    def _overflow_deferred(self) -> Iterator[None]:
        """An overflow of a weight whose range check was deferred becomes :class:`DeferredOverflow`."""
        try:
            yield
        except Refusal as refusal:
            if self._overflow_key is not None and refusal.reason is SkipReason.OVERFLOW:
                raise DeferredOverflow(self._overflow_key, refusal.detail) from None
            raise

    def tofile(self, file) -> None:  # noqa: ANN001 - a binary file, as in onnx_ir
        """Write the folded bytes block by block (never the whole folded weight in memory)."""
        if self._blocks is None or sys.byteorder != "little":
            super().tofile(file)
            return
        with self._overflow_deferred():
            for block in self._blocks():
                file.write(block.tobytes())  # one block (a few MiB) at a time


#: Installs a folded weight (prepared by :func:`lazy_fold`) as a node input.
Install = Callable[[], None]


def lazy_fold(
    ctx: FoldContext,
    node: ir.Node,
    index: int,
    w: Const,
    formula: Callable[[np.ndarray], np.ndarray],
    bound: Callable[[], np.ndarray],
    what: str,
    rows: RowFormula | None = None,
) -> Install:
    """Check the range now, fold lazily later.

    ``bound()`` gives |folded values| (or their per-channel maxima); unless the weight is float64,
    a value beyond its dtype's maximum refuses the fold (``overflow``) before anything changes. The
    returned step gives ``node`` (at input ``index``) the lazy folded weight ``formula(W64)``,
    computed by blocks of rows with ``rows`` when given. With ``ctx.defer_range_check``, a large
    weight is not read now: its range is checked as it is written (:class:`DeferredOverflow`).
    """
    key = (*ctx.current_bn, what) if ctx.current_bn is not None else None
    if key is not None and key in ctx.known_overflow:
        raise Refusal(SkipReason.OVERFLOW, ctx.known_overflow[key])
    nbytes = int(np.prod(w.shape, dtype=np.int64)) * FLOAT_DTYPES[w.dtype].itemsize
    deferred = ctx.defer_range_check and key is not None and nbytes >= DEFER_MIN_BYTES
    if FLOAT_DTYPES[w.dtype] != np.float64 and not deferred:
        values = bound()
        w.release()
        check_range(values, FLOAT_DTYPES[w.dtype], what)

    def install() -> None:
        set_input(
            ctx,
            node,
            index,
            folded(ctx, w, formula, node.inputs[index], rows, key if deferred else None),
        )

    return install


def check_range(values: np.ndarray, dtype: np.dtype, what: str) -> None:
    """Refuse (``overflow``) when a folded |value| exceeds the largest finite ``dtype`` value."""
    limit = float(ml_dtypes.finfo(dtype).max)
    values = np.where(np.isnan(values), 0.0, values)  # a NaN weight stays NaN; it hides no overflow
    if values.size and float(np.max(values)) > limit:
        raise Refusal(
            SkipReason.OVERFLOW,
            f"folded {what} would reach {float(np.max(values)):.3g}, "
            f"beyond the {dtype} maximum {limit:.3g}",
        )


def channel_absmax(load: Callable[[], np.ndarray], axis: int, channels: int) -> np.ndarray:
    """Per-channel max |w| along ``axis``, reading the weight in chunks (it may be memory-mapped)."""
    arr = load()
    moved = np.moveaxis(arr, axis, 0) if axis else arr
    out = np.zeros(channels, dtype=np.float64)
    per_channel = max(1, moved[0].size if moved.shape[0] else 1) * max(1, moved.dtype.itemsize)
    step = max(1, _CHUNK_BYTES // per_channel)
    for start in range(0, moved.shape[0], step):
        chunk = np.asarray(moved[start : start + step], dtype=np.float64)
        if chunk.size:
            out[start : start + step] = np.max(np.abs(chunk.reshape(chunk.shape[0], -1)), axis=1)
    return out


def conv_transpose_absmax(w: Const, group: int) -> np.ndarray:
    """Per-output-channel max |w| of a ConvTranspose weight [Cin, Cout/g, k...]."""
    arr = w.load()
    cin_g, cout_g = arr.shape[0] // group, arr.shape[1]
    out = np.zeros(cout_g * group)
    for gi in range(group):
        out[gi * cout_g : (gi + 1) * cout_g] = channel_absmax(
            lambda gi=gi: arr[gi * cin_g : (gi + 1) * cin_g], 1, cout_g
        )
    return out


def folded(
    ctx: FoldContext,
    c: Const,
    formula: Callable[[np.ndarray], np.ndarray],
    old: ir.Value,
    rows: RowFormula | None = None,
    overflow_key: tuple[str, str, str] | None = None,
) -> FoldedTensor:
    """A lazy folded weight: ``formula`` applied to the float64 original when it is written (by
    blocks of rows with ``rows``, reading the original once, in its own dtype)."""

    def compute64() -> np.ndarray:
        try:
            original = c.load64()
        finally:
            c.release()
        return formula(original)

    name = ctx.fresh(old.name or "W")
    blocks = None
    if rows is not None and c.exact_load and len(c.shape) >= 1 and c.shape[0] > 1:
        np_dtype = FLOAT_DTYPES[c.dtype]

        def blocks() -> Iterator[np.ndarray]:
            try:
                yield from _by_rows(c.load(), rows, np_dtype, name)
            finally:
                c.release()

    return FoldedTensor(compute64, c.dtype, c.shape, name, blocks=blocks, overflow_key=overflow_key)


def _by_rows(
    original: np.ndarray, rows: RowFormula, np_dtype: np.dtype, name: str
) -> Iterator[np.ndarray]:
    """``round(rows(original))`` a block of rows at a time: one rounding, as for the whole."""
    per_row = max(1, int(np.prod(original.shape[1:], dtype=np.int64))) * 8
    step = max(1, _ROW_BLOCK_BYTES // per_row)
    for start in range(0, original.shape[0], step):
        sl = slice(start, min(start + step, original.shape[0]))
        yield numerics.round_to(rows(original[sl], sl), np_dtype, name)


def eager(
    ctx: FoldContext, arr: np.ndarray, dtype: ir.DataType, arr64: np.ndarray, base: str
) -> FoldedTensor:
    """A small new constant (a bias, a shift) already computed: ``arr`` rounded, ``arr64`` exact."""
    return FoldedTensor(
        lambda a=arr64: np.asarray(a, dtype=np.float64), dtype, tuple(arr.shape), ctx.fresh(base)
    )
