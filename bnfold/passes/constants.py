"""Resolving a value to a constant, and computing constant expressions the way a runtime would.

A constant is a :class:`Const`: dtype and shape known up front, data loaded on demand (weights may be
memory-mapped and are released after reading). :func:`const` accepts

- a tensor (an initializer or a folded weight), a ``Constant`` node, ``ConstantOfShape``;
- ``Identity`` chains, and side-effect-free ops of constants, each evaluated in its own dtype by one
  small function per op family (:data:`_EVALUATORS`): ``Shape`` (of a constant), ``Cast``/``CastLike``,
  ``Reshape``, ``Unsqueeze``/``Squeeze``, ``Expand``, ``Transpose``, ``Concat``,
  ``Sqrt``/``Reciprocal``/``Neg`` and ``Add``/``Sub``/``Mul``/``Div`` (with the legacy
  ``broadcast``/``axis`` rules below opset 7); e.g. torch's ``Expand(CastLike(0, x), Shape(W))`` zero
  bias, the dynamo exporter's ``Concat`` of ``Constant`` shapes and ``Transpose`` of a Linear weight.

It refuses (a :class:`~bnfold.reasons.Refusal`) a graph input (in IR ≥ 4 an initializer that is also a
graph input may be overridden by the caller; in IR < 4 every initializer is listed as an input and is
a constant), a value bound outside a subgraph or function, anything else computed, chains deeper than
64 and results of more than :data:`~bnfold.passes.common.MAX_COMPUTED_ELEMENTS` elements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold.reasons import Refusal, SkipReason

from .common import (
    CONST_OPS,
    FLOAT_DTYPES,
    INT_DTYPES,
    MAX_COMPUTED_ELEMENTS,
    NUMPY_DTYPES,
    STD,
    attr,
    node_label,
)
from .context import FoldContext
from .weights import FoldedTensor

_MAX_DEPTH = 64


@dataclass
class Const:
    """A constant input: dtype/shape known up front, data loaded on demand."""

    dtype: ir.DataType
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    load64: Callable[[], np.ndarray]
    release: Callable[[], None] = lambda: None
    #: ``load64()`` is ``load()`` in float64 (False for a folded weight: it keeps unrounded values).
    exact_load: bool = True


def computed(
    dtype: ir.DataType,
    shape: tuple[int, ...],
    load: Callable[[], np.ndarray],
    release: Callable[[], None] = lambda: None,
) -> Const:
    """A constant computed by the pass (from other constants) in its own dtype, as a runtime would."""
    return Const(
        dtype,
        tuple(int(d) for d in shape),
        load,
        lambda: np.asarray(load(), dtype=np.float64),
        release,
    )


def weight(ctx: FoldContext, value: ir.Value | None, what: str) -> Const:
    """A float constant weight or bias of a node the BN folds into."""
    c = const(ctx, value, what=what, weight=True)
    if c.dtype not in FLOAT_DTYPES:
        raise Refusal(SkipReason.UNSUPPORTED_DTYPE, f"{what} has dtype {c.dtype}")
    return c


def const(
    ctx: FoldContext, value: ir.Value | None, *, what: str, weight: bool, depth: int = 0
) -> Const:
    """Resolve ``value`` to a constant, or refuse with the reason it is not one."""
    non_const = SkipReason.NON_CONSTANT_WEIGHT if weight else SkipReason.NON_CONSTANT_PARAMS
    if value is None:
        raise Refusal(non_const, f"{what} is missing")
    while True:
        if value.is_graph_input():
            _refuse_graph_input(ctx, value, what, weight)
        if value.const_value is not None:
            return tensor_const(value.const_value)
        producer = value.producer()
        if producer is None or producer.domain not in STD:
            raise Refusal(non_const, f"{what} {value.name} is not a constant")
        depth += 1
        if depth > _MAX_DEPTH:
            raise Refusal(non_const, f"{what} {value.name} is computed too deep to resolve")
        if producer.op_type == "Identity":
            value = producer.inputs[0]
            if value is None:
                raise Refusal(non_const, f"{what} is missing")
            continue
        evaluate = _EVALUATORS.get(producer.op_type) if producer.op_type in CONST_OPS else None
        if evaluate is None:
            raise Refusal(
                non_const,
                f"{what} {value.name} comes from {producer.op_type} {node_label(producer)}",
            )
        c = evaluate(_Eval(ctx, producer, value, what, weight, depth))
        size = int(np.prod(c.shape, dtype=object))
        if size > MAX_COMPUTED_ELEMENTS:  # never materialise a hostile ConstantOfShape/Expand
            raise Refusal(
                non_const,
                f"{what} {value.name} would have {size:.3g} elements; too large to compute",
            )
        return c


def _refuse_graph_input(ctx: FoldContext, value: ir.Value, what: str, weight: bool) -> None:
    """Refuse a graph input, unless it is an IR < 4 initializer of the main graph (a constant)."""
    if value.graph is not None and value.graph is not ctx.main:
        raise Refusal(
            SkipReason.IN_SUBGRAPH, f"{what} {value.name} is an input of {ctx.scope(value.graph)}"
        )
    if value.is_initializer() and ctx.ir_version < 4:
        return  # IR < 4: initializers are listed as inputs, and are constants
    if value.is_initializer():
        reason = SkipReason.OVERRIDABLE_WEIGHT if weight else SkipReason.OVERRIDABLE_PARAMS
        raise Refusal(reason, f"{what} {value.name} is an initializer that is also a graph input")
    non_const = SkipReason.NON_CONSTANT_WEIGHT if weight else SkipReason.NON_CONSTANT_PARAMS
    raise Refusal(non_const, f"{what} {value.name} is a graph input")


def tensor_const(tensor: ir.TensorProtocol) -> Const:
    if isinstance(tensor, FoldedTensor):
        return Const(
            tensor.dtype,
            tuple(tensor.shape.numpy()),
            tensor.numpy,
            tensor.compute64,
            exact_load=False,
        )
    return Const(
        tensor.dtype,
        tuple(tensor.shape.numpy()),
        tensor.numpy,
        lambda t=tensor: np.asarray(t.numpy(), dtype=np.float64),
        _releaser(tensor),
    )


def _releaser(tensor: ir.TensorProtocol) -> Callable[[], None]:
    """Unmap an external tensor once its data has been read, so RSS does not grow with the model."""

    def release() -> None:
        if isinstance(tensor, ir.ExternalTensor):
            try:
                tensor.release()
            except BufferError:  # a numpy view still refers to the map; it goes with the view
                pass

    return release


def constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor of a ``Constant`` node, read without modifying the node (unlike
    ``ir.convenience.get_const_tensor``, which renames the tensor: it may belong to the caller)."""
    if len(node.attributes) != 1:
        return None
    a = next(iter(node.attributes.values()))
    if a.is_ref():
        return None
    if a.name == "value":
        return a.as_tensor()
    if a.name in ("value_float", "value_floats"):
        return ir.Tensor(np.array(a.value, dtype=np.float32))
    if a.name in ("value_int", "value_ints"):
        return ir.Tensor(np.array(a.value, dtype=np.int64))
    return None


# ---------------------------------------------------------------------- the evaluator, per op family
@dataclass
class _Eval:
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


def _constant(e: _Eval) -> Const:
    tensor = constant_tensor(e.node)
    if tensor is None:
        raise Refusal(e.non_const, f"{e.what} {e.value.name} is a Constant this tool cannot read")
    return tensor_const(tensor)


def _constant_of_shape(e: _Eval) -> Const:
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


def _shape(e: _Eval) -> Const:
    c = e.arg(0)
    start, end = int(attr(e.node, "start", 0)), attr(e.node, "end", None)
    arr = np.array(list(c.shape)[start : None if end is None else int(end)], dtype=np.int64)
    return computed(ir.DataType.INT64, arr.shape, lambda a=arr: a)


def _cast(e: _Eval) -> Const:
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


def _reshape(e: _Eval) -> Const:
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


def _unsqueeze_squeeze(e: _Eval) -> Const:
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


def _expand(e: _Eval) -> Const:
    c = e.arg(0)
    shape = e.ints(1)
    try:
        out = np.broadcast_shapes(tuple(c.shape), tuple(shape))
    except ValueError:
        raise e.invalid(f"cannot expand {list(c.shape)} to {shape}") from None
    return computed(
        c.dtype, out, lambda c=c, o=out: np.array(np.broadcast_to(c.load(), o)), c.release
    )


def _transpose(e: _Eval) -> Const:
    c = e.arg(0)
    perm = attr(e.node, "perm", None)
    perm = list(range(len(c.shape)))[::-1] if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(len(c.shape))):
        raise e.invalid(f"perm {perm} does not fit shape {list(c.shape)}")
    moved = lambda get: lambda: np.ascontiguousarray(np.transpose(get(), perm))  # noqa: E731
    out = tuple(c.shape[p] for p in perm)
    return Const(c.dtype, out, moved(c.load), moved(c.load64), c.release)


def _concat(e: _Eval) -> Const:
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


def _unary(e: _Eval) -> Const:
    c = e.arg(0)
    if c.dtype not in FLOAT_DTYPES:
        raise Refusal(e.non_const, f"{e.label}: dtype {c.dtype} is not computed by this tool")
    fn = _UNARY[e.node.op_type]

    def unary(c=c, fn=fn) -> np.ndarray:  # noqa: ANN001
        with np.errstate(all="ignore"):
            return fn(np.asarray(c.load()))

    return computed(c.dtype, c.shape, unary)


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _binary(e: _Eval) -> Const:
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


def _legacy_broadcast(e: _Eval, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple:
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
_EVALUATORS: dict[str, Callable[[_Eval], Const]] = {
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
