"""Small helpers every module of the fold pass shares: dtype tables, attribute readers, labels.

Nothing here changes a graph or holds state.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

FLOAT_DTYPES = {
    ir.DataType.FLOAT: np.dtype(np.float32),
    ir.DataType.DOUBLE: np.dtype(np.float64),
    ir.DataType.FLOAT16: np.dtype(np.float16),
    ir.DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
INT_DTYPES = {
    ir.DataType.INT64: np.dtype(np.int64),
    ir.DataType.INT32: np.dtype(np.int32),
    ir.DataType.INT16: np.dtype(np.int16),
    ir.DataType.INT8: np.dtype(np.int8),
    ir.DataType.UINT64: np.dtype(np.uint64),
    ir.DataType.UINT32: np.dtype(np.uint32),
    ir.DataType.UINT16: np.dtype(np.uint16),
    ir.DataType.UINT8: np.dtype(np.uint8),
    ir.DataType.BOOL: np.dtype(np.bool_),
}
NUMPY_DTYPES = {**FLOAT_DTYPES, **INT_DTYPES}
#: A computed constant or flattened feature count beyond this many elements is hostile.
MAX_COMPUTED_ELEMENTS = 1 << 28
#: The default ONNX domain, under both of its spellings.
STD = ("", "ai.onnx")
#: Nodes a BN (or a decomposed BN) folds into backward.
PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Side-effect-free ops whose result the pass computes when they only read constants; the same ops are
#: removed once a fold leaves them without users.
CONST_OPS = frozenset(
    {
        "Identity",
        "Constant",
        "ConstantOfShape",
        "Cast",
        "CastLike",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Expand",
        "Transpose",
        "Concat",
        "Shape",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Sqrt",
        "Reciprocal",
        "Neg",
    }
)
#: The ops a decomposed BN is made of.
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def attr(node: ir.Node, name: str, default):  # noqa: ANN001, ANN201 - any attribute type
    """The value of attribute ``name`` of ``node``; ``default`` when absent or a reference."""
    a = node.attributes.get(name)
    if a is None or a.is_ref():
        return default
    return a.value


def str_attr(node: ir.Node, name: str, default: str) -> str:
    v = attr(node, name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def node_label(node: ir.Node | None) -> str:
    """The node's name, or ``<Op → first output>`` for an unnamed node."""
    if node is None:
        return "?"
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs and node.outputs[0] is not None else None
    return f"<{node.op_type} → {out}>"


def op_name(node: ir.Node) -> str:
    """The op type, qualified by its domain when that is not the default one."""
    return node.op_type if node.domain in STD else f"{node.domain}::{node.op_type}"


def is_bn(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in STD


def rank(value: ir.Value | None) -> int | None:
    """The declared rank of ``value`` (no inference)."""
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def dims_str(dims) -> str:  # noqa: ANN001 - any sequence of int | None
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def is_constish(value: ir.Value) -> bool:
    """Whether ``value`` is plainly a constant (a tensor, a Constant or ConstantOfShape output)."""
    if value.const_value is not None:
        return True
    p = value.producer()
    return p is not None and p.op_type in ("Constant", "ConstantOfShape")


def copy_attr(a: ir.Attr) -> ir.Attr:
    if a.is_ref():
        return ir.RefAttr(a.name, a.ref_attr_name, a.type)
    return ir.Attr(a.name, a.type, a.value)


def bias_name(old: ir.Value | None, node: ir.Node, kind: str, suffix: str = "_bias") -> str:
    """The name for a new bias: the old bias's name, else ``<node name or kind><suffix>``."""
    return (old.name if old is not None else None) or f"{node.name or kind}{suffix}"
