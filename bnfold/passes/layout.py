"""Channel-axis tracking through layout nodes: ``Transpose``, no-op ``Cast`` and ``Identity``.

Exporters from NHWC frameworks (tf2onnx, Keras 3's torch backend) wrap convolutions and pools in
``Transpose`` nodes and (Keras 3 / TorchScript) every op in a ``Cast`` to the type it already has.
A per-channel map y = s · x + t along axis ``a`` of a value commutes with such nodes:

- ``Transpose(perm)``: output axis ``i`` is input axis ``perm[i]``, so the channel axis ``a`` of the
  input is axis ``perm.index(a)`` of the output (forward) and axis ``a`` of the output is axis
  ``perm[a]`` of the input (backward);
- ``Cast`` to the value's own float type and ``Identity``: the same tensor (axis unchanged).

Nothing here changes a graph.
"""

from __future__ import annotations

import onnx_ir as ir

from .common import FLOAT_DTYPES, STD, attr
from .context import FoldContext
from .shapes import dtype_of


def is_noop_cast(ctx: FoldContext, node: ir.Node) -> bool:
    """A ``Cast`` (or ``Identity``) whose output is its input: the target type is the input's own
    float type (a float Cast that changes the type rounds, so it is not a no-op)."""
    if node.domain not in STD or not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type != "Cast":
        return False
    to = attr(node, "to", None)
    src = dtype_of(ctx, node.inputs[0])
    return to is not None and src is not None and src in FLOAT_DTYPES and int(to) == int(src)


def transpose_perm(node: ir.Node, rank: int | None) -> list[int] | None:
    """The permutation of a ``Transpose`` (the default reverses the axes, which needs the rank)."""
    perm = attr(node, "perm", None)
    if perm is not None:
        perm = [int(p) for p in perm]
        return perm if sorted(perm) == list(range(len(perm))) else None
    return list(reversed(range(rank))) if rank is not None else None


def axis_after(node: ir.Node, axis: int, rank: int | None) -> int | None:
    """The channel axis of ``node``'s output when it is ``axis`` of its input (forward)."""
    if node.op_type != "Transpose":
        return axis
    perm = transpose_perm(node, rank)
    return perm.index(axis) if perm is not None and axis < len(perm) else None


def axis_before(node: ir.Node, axis: int, rank: int | None) -> int | None:
    """The channel axis of ``node``'s input when it is ``axis`` of its output (backward)."""
    if node.op_type != "Transpose":
        return axis
    perm = transpose_perm(node, rank)
    return perm[axis] if perm is not None and axis < len(perm) else None


def is_layout(ctx: FoldContext, node: ir.Node) -> bool:
    """Whether the channel axis can be tracked through ``node`` (Transpose, no-op Cast/Identity)."""
    if node.domain not in STD:
        return False
    if node.op_type == "Transpose":
        return True
    return is_noop_cast(ctx, node)
