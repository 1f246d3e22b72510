"""Resolving a value to a constant, and computing constant expressions the way a runtime would.

A constant is a :class:`Const`: dtype and shape known up front, data loaded on demand (weights may be
memory-mapped and are released after reading). :func:`const` accepts

- a tensor (an initializer or a folded weight), a ``Constant`` node, ``ConstantOfShape``;
- ``Identity`` chains, and side-effect-free ops of constants, each evaluated in its own dtype by one
  small function per op family (:data:`bnfold.passes.const_eval.EVALUATORS`): ``Shape`` (of a constant), ``Cast``/``CastLike``,
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
    MAX_COMPUTED_ELEMENTS,
    STD,
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
        from .const_eval import EVALUATORS, Eval  # the evaluators read their inputs through const()

        evaluate = EVALUATORS.get(producer.op_type) if producer.op_type in CONST_OPS else None
        if evaluate is None:
            raise Refusal(
                non_const,
                f"{what} {value.name} comes from {producer.op_type} {node_label(producer)}",
            )
        c = evaluate(Eval(ctx, producer, value, what, weight, depth))
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
