"""The constant-expression evaluator: one small function per op family, in its own dtype, the way a
runtime computes it (see :mod:`bnfold.passes.constants`, which resolves a value and calls these).

:data:`EVALUATORS` maps an op type to its evaluator; an :class:`Eval` is one node to evaluate, whose
constant inputs are read back through :func:`bnfold.passes.constants.const`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold.reasons import Refusal, SkipReason

from .common import (
    FLOAT_DTYPES,
    INT_DTYPES,
    NUMPY_DTYPES,
    attr,
    node_label,
)
from .constants import Const, computed, const, constant_tensor, tensor_const
from .context import FoldContext


# ---------------------------------------------------------------------- the evaluator, per op family
@dataclass
class Eval:
    """One node to evaluate: its constant inputs are read through :meth:`arg` and :meth:`ints`."""

    ctx: FoldContext
    node: ir.Node
    value: ir.Value
    what: str
    weight: bool
    depth: int

    @property
    def non_const(self) -> SkipReason:
        return SkipReason.NON_CONSTANT_WEIGHT if self.weight else SkipReason.NON_CONSTANT_PARAMS

    @property
    def label(self) -> str:
        return f"{self.what} {self.value.name} ({self.node.op_type} {node_label(self.node)})"

    def arg(self, i: int) -> Const:
        v = self.node.inputs[i] if i < len(self.node.inputs) else None
        return const(self.ctx, v, what=self.what, weight=self.weight, depth=self.depth)

    def ints(self, i: int) -> list[int]:
        c = self.arg(i)
        if c.dtype not in INT_DTYPES:
            raise Refusal(self.non_const, f"{self.label}: input {i} has dtype {c.dtype}")
        return [int(d) for d in np.asarray(c.load()).reshape(-1)]

    def np_dtype(self, dtype: ir.DataType | None) -> np.dtype:
        if dtype not in NUMPY_DTYPES:
            raise Refusal(
                self.non_const, f"{self.label}: dtype {dtype} is not computed by this tool"
            )
        return NUMPY_DTYPES[dtype]

    def invalid(self, detail: str) -> Refusal:
        return Refusal(SkipReason.INVALID_PARAMS, f"{self.label}: {detail}")


def _constant(e: Eval) -> Const:
    tensor = constant_tensor(e.node)
    if tensor is None:
        raise Refusal(e.non_const, f"{e.what} {e.value.name} is a Constant this tool cannot read")
    return tensor_const(tensor)


def _constant_of_shape(e: Eval) -> Const:
    shape = tuple(e.ints(0))
    fill = attr(e.node, "value", None)
    if fill is None:
        fill_arr, dtype = np.zeros(1, dtype=np.float32), ir.DataType.FLOAT
    else:
        fill_arr, dtype = np.asarray(fill.numpy()).reshape(-1), fill.dtype
    if any(d < 0 for d in shape):
        raise Refusal(SkipReason.INVALID_PARAMS, f"{e.what}: negative dimension in {list(shape)}")
    return Const(
        dtype,
        shape,
        lambda f=fill_arr, s=shape: np.full(s, f[0], dtype=f.dtype),
        lambda f=fill_arr, s=shape: np.full(s, np.float64(f[0])),
    )


def _shape(e: Eval) -> Const:
    c = e.arg(0)
    start, end = int(attr(e.node, "start", 0)), attr(e.node, "end", None)
    arr = np.array(list(c.shape)[start : None if end is None else int(end)], dtype=np.int64)
    return computed(ir.DataType.INT64, arr.shape, lambda a=arr: a)


def _cast(e: Eval) -> Const:
    c = e.arg(0)
    if e.node.op_type == "Cast":
        try:
            to = ir.DataType(int(attr(e.node, "to", 0)))
        except (TypeError, ValueError):  # opset < 6 names the type with a string
            raise Refusal(
                e.non_const,
                f"{e.label}: cast target {attr(e.node, 'to', None)!r} is not read by this tool",
            ) from None
    else:
        like = e.node.inputs[1] if len(e.node.inputs) > 1 else None
        to = like.dtype if like is not None else None
        if to is None:
            raise Refusal(e.non_const, f"{e.label}: the dtype to cast to is unknown")
    target = e.np_dtype(to)
    e.np_dtype(c.dtype)
    return computed(to, c.shape, lambda c=c, d=target: np.asarray(c.load()).astype(d), c.release)


def _reshaped(c: Const, out: tuple[int, ...]) -> Const:
    return computed(c.dtype, out, lambda c=c, o=out: np.asarray(c.load()).reshape(o), c.release)


def _reshape(e: Eval) -> Const:
    c = e.arg(0)
    shape = e.ints(1)
    allowzero = int(attr(e.node, "allowzero", 0))
    out = [
        c.shape[i] if d == 0 and not allowzero and i < len(c.shape) else d
        for i, d in enumerate(shape)
    ]
    size = int(np.prod(c.shape, dtype=np.int64))
    if out.count(-1) == 1:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        if known == 0 or size % known:
            raise e.invalid(f"cannot reshape {list(c.shape)} to {shape}")
        out[out.index(-1)] = size // known
    if any(d < 0 for d in out) or int(np.prod(out, dtype=np.int64)) != size:
        raise e.invalid(f"cannot reshape {list(c.shape)} to {shape}")
    return _reshaped(c, tuple(out))


def _unsqueeze_squeeze(e: Eval) -> Const:
    c = e.arg(0)
    if len(e.node.inputs) > 1 and e.node.inputs[1] is not None:
        axes = e.ints(1)
    else:
        axes = list(attr(e.node, "axes", []) or [])
    if e.node.op_type == "Unsqueeze":
        rank = len(c.shape) + len(axes)
        out = list(c.shape)
        for a in sorted(a + rank if a < 0 else a for a in axes):
            out.insert(a, 1)
        return _reshaped(c, tuple(out))
    rank = len(c.shape)
    norm = (
        sorted({a + rank if a < 0 else a for a in axes})
        if axes
        else [i for i, d in enumerate(c.shape) if d == 1]
    )
    if any(not 0 <= a < rank or c.shape[a] != 1 for a in norm):
        raise e.invalid(f"cannot squeeze axes {axes} of {list(c.shape)}")
    return _reshaped(c, tuple(d for i, d in enumerate(c.shape) if i not in norm))


def _expand(e: Eval) -> Const:
    c = e.arg(0)
    shape = e.ints(1)
    try:
        out = np.broadcast_shapes(tuple(c.shape), tuple(shape))
    except ValueError:
        raise e.invalid(f"cannot expand {list(c.shape)} to {shape}") from None
    return computed(
        c.dtype, out, lambda c=c, o=out: np.array(np.broadcast_to(c.load(), o)), c.release
    )


def _transpose(e: Eval) -> Const:
    c = e.arg(0)
    perm = attr(e.node, "perm", None)
    perm = list(range(len(c.shape)))[::-1] if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(len(c.shape))):
        raise e.invalid(f"perm {perm} does not fit shape {list(c.shape)}")
    moved = lambda get: lambda: np.ascontiguousarray(np.transpose(get(), perm))  # noqa: E731
    out = tuple(c.shape[p] for p in perm)
    return Const(c.dtype, out, moved(c.load), moved(c.load64), c.release)


def _concat(e: Eval) -> Const:
    parts = [e.arg(i) for i in range(len(e.node.inputs))]
    if not parts:
        raise e.invalid("no inputs")
    rank, dtype = len(parts[0].shape), parts[0].dtype
    if any(p.dtype != dtype for p in parts):
        raise Refusal(e.non_const, f"{e.label}: inputs of different dtypes")
    axis = int(attr(e.node, "axis", 0))
    axis += rank if axis < 0 else 0
    others = [tuple(d for i, d in enumerate(p.shape) if i != axis) for p in parts]
    if not 0 <= axis < rank or any(
        len(p.shape) != rank or o != others[0] for p, o in zip(parts, others, strict=True)
    ):
        raise e.invalid(f"cannot concatenate {[list(p.shape) for p in parts]} on axis {axis}")
    out = list(parts[0].shape)
    out[axis] = sum(p.shape[axis] for p in parts)

    def join(get: Callable[[Const], np.ndarray]) -> Callable[[], np.ndarray]:
        return lambda: np.concatenate([np.asarray(get(p)) for p in parts], axis=axis)

    return Const(
        dtype,
        tuple(out),
        join(lambda p: p.load()),
        join(lambda p: p.load64()),
        lambda: [p.release() for p in parts] and None,
    )


_UNARY = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative}


def _unary(e: Eval) -> Const:
    c = e.arg(0)
    if c.dtype not in FLOAT_DTYPES:
        raise Refusal(e.non_const, f"{e.label}: dtype {c.dtype} is not computed by this tool")
    fn = _UNARY[e.node.op_type]

    def unary(c=c, fn=fn) -> np.ndarray:  # noqa: ANN001
        with np.errstate(all="ignore"):
            return fn(np.asarray(c.load()))

    return computed(c.dtype, c.shape, unary)


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _binary(e: Eval) -> Const:
    op = e.node.op_type
    a, b = e.arg(0), e.arg(1)
    if a.dtype != b.dtype or (
        a.dtype not in FLOAT_DTYPES and (op == "Div" or a.dtype not in INT_DTYPES)
    ):
        raise Refusal(
            e.non_const, f"{e.label}: {a.dtype} {op} {b.dtype} is not computed by this tool"
        )
    b_shape = tuple(b.shape)
    if e.ctx.opset < 7 and tuple(a.shape) != b_shape:
        b_shape = _legacy_broadcast(e, tuple(a.shape), b_shape)
    try:
        out = np.broadcast_shapes(tuple(a.shape), b_shape)
    except ValueError:
        raise e.invalid(f"shapes {list(a.shape)} and {list(b.shape)} do not broadcast") from None
    fn = _BINARY[op]
    dtype = e.np_dtype(a.dtype)

    def binary(a=a, b=b, fn=fn, dtype=dtype, b_shape=b_shape) -> np.ndarray:  # noqa: ANN001
        with np.errstate(all="ignore"):
            rhs = np.asarray(b.load()).reshape(b_shape)
            return np.asarray(fn(np.asarray(a.load()), rhs)).astype(dtype, copy=False)

    return computed(a.dtype, out, binary)


def _legacy_broadcast(e: Eval, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple:
    """Opset < 7: only B broadcasts, with broadcast=1, aligned at ``axis``; B's aligned shape."""
    axis = attr(e.node, "axis", None)
    if not int(attr(e.node, "broadcast", 0)):
        raise e.invalid(f"shapes {list(a_shape)} and {list(b_shape)} differ without broadcast=1")
    b_given = b_shape
    if axis is not None:
        axis = int(axis) + (len(a_shape) if int(axis) < 0 else 0)
        b_shape = (1,) * axis + b_shape + (1,) * max(0, len(a_shape) - axis - len(b_shape))
    if len(b_shape) > len(a_shape):
        raise e.invalid(f"B {list(b_given)} is larger than A {list(a_shape)}")
    return b_shape


#: One evaluator per op family; ``Identity`` is followed in :func:`const` itself.
EVALUATORS: dict[str, Callable[[Eval], Const]] = {
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Shape": _shape,
    "Cast": _cast,
    "CastLike": _cast,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze_squeeze,
    "Squeeze": _unsqueeze_squeeze,
    "Expand": _expand,
    "Transpose": _transpose,
    "Concat": _concat,
    "Sqrt": _unary,
    "Reciprocal": _unary,
    "Neg": _unary,
    "Add": _binary,
    "Sub": _binary,
    "Mul": _binary,
    "Div": _binary,
}
