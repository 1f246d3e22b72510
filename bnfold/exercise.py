"""Input sizes that exercise every weight: what to feed a model whose input dims are symbolic.

Verifying ``[N, C, H, W]`` with symbolic H and W on a ``1x1`` image checks only the centre tap of a
3x3 kernel: a fold that corrupts the other eight passes. :func:`derive_input_shapes` chooses sizes
from what the graph itself constrains instead:

* the batch dimension (axis 0 of an input of rank >= 2) is 1; fixed dimensions are kept; shapes the
  user gave (``--input-shape``) are used as given;
* every other symbolic dimension gets the smallest size ``S`` (the same for all of them, searched
  upwards from 1 to ``max_size``) for which a forward walk of the graph's shapes finds:

  - **every kernel tap of every Conv sees non-padding data** at some output position, along every
    spatial axis (kernel extents, strides, dilations, explicit pads and ``auto_pad``), and every
    ConvTranspose tap lands inside its (cropped) output;
  - every Conv/ConvTranspose/pooling output keeps at least one element (spatial dims stay >= the
    kernel after strides, through the whole Conv/Pool stack);
  - shapes fit where the graph fixes them: a Gemm or MatMul with a constant weight of K inputs
    fixes the size of what reaches it (e.g. ``Flatten -> Gemm`` fixes C·H·W), a Reshape with a
    constant target shape must divide evenly, and elementwise ops with a constant operand must
    broadcast.

The walk understands Conv, ConvTranspose, the pooling ops, BatchNormalization, elementwise and
activation ops, Flatten, Reshape, Gemm, MatMul, Concat, Transpose, Squeeze/Unsqueeze-free paths and
identity-like ops; past any other op the shape is unknown and constrains nothing further. When no
``S`` up to ``max_size`` satisfies the constraints (e.g. ``Flatten -> Gemm`` needs H != W), it raises
:class:`InputShapeError`, which asks for ``--input-shape NAME=...``. When nothing constrains a
symbolic dimension it gets ``UNCONSTRAINED`` (8), not 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from bnfold.errors import UsageError

__all__ = ["InputShapeError", "UNCONSTRAINED", "derive_input_shapes"]

logger = logging.getLogger(__name__)

#: size of a symbolic dimension that nothing in the graph constrains
UNCONSTRAINED = 8

_SHAPE_PRESERVING = frozenset(
    "Relu LeakyRelu Sigmoid Tanh HardSigmoid HardSwish Elu Selu Celu Gelu Softplus Softsign "
    "Mish Erf Exp Log Abs Neg Sqrt Reciprocal Clip Identity Dropout Cast Floor Ceil Round Sign Not "
    "BatchNormalization InstanceNormalization LRN Softmax LogSoftmax".split()
)
_BROADCASTING = frozenset("Add Sub Mul Div Pow Max Min Sum Mean Where PRelu".split())
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


class InputShapeError(UsageError):
    """No sensible size can be derived for an input's symbolic dimensions; give --input-shape."""


class _Violation(Exception):
    pass


Shape = tuple[int, ...] | None


def _ints(node: ir.Node, name: str, default: list[int] | None = None) -> list[int] | None:
    attr = node.attributes.get(name)
    return default if attr is None else [int(v) for v in attr.as_ints()]


def _int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else str(attr.as_string())


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _window(node: ir.Node, spatial: tuple[int, ...], kernel: list[int], transpose: bool):
    """Per axis: (size_in, kernel, stride, dilation, pad_begin, pad_end) for a Conv-like node."""
    n = len(kernel)
    strides = _ints(node, "strides", [1] * n) or [1] * n
    dilations = _ints(node, "dilations", [1] * n) or [1] * n
    pads = _ints(node, "pads", [0] * 2 * n) or [0] * 2 * n
    auto_pad = _str(node, "auto_pad", "NOTSET")
    axes = []
    for i in range(n):
        size, k, s, d = spatial[i], kernel[i], strides[i], dilations[i]
        extent = d * (k - 1) + 1
        pb, pe = pads[i], pads[i + n]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and not transpose:
            out = math.ceil(size / s)
            total = max(0, (out - 1) * s + extent - size)
            pb = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pe = total - pb
        elif auto_pad == "VALID":
            pb = pe = 0
        axes.append((size, k, s, d, pb, pe))
    return axes


def _conv_out(node: ir.Node, shape: tuple[int, ...], kernel: list[int], check_taps: bool):
    spatial = shape[2:]
    if len(spatial) != len(kernel):
        raise _Violation(f"{node.op_type} expects {len(kernel)} spatial dims")
    out = []
    ceil_mode = _int(node, "ceil_mode", 0)
    for size, k, s, d, pb, pe in _window(node, spatial, kernel, transpose=False):
        extent = d * (k - 1) + 1
        span = size + pb + pe - extent
        if span < 0:
            raise _Violation(f"{node.op_type} window larger than its input")
        length = (math.ceil(span / s) if ceil_mode else span // s) + 1
        if check_taps:
            for j in range(k):
                if not any(0 <= o * s - pb + j * d < size for o in range(length)):
                    raise _Violation(f"{node.op_type} kernel tap {j} sees only padding")
        out.append(length)
    return tuple(out)


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            raise _Violation(f"cannot broadcast {x} with {y}")
        out.append(max(x, y))
    return tuple(out)


def _infer_conv(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Conv: check the channels against the weight; the spatial sizes come from the window."""
    x = shapes[0] if shapes else None
    w_shape = shapes[1] if len(shapes) > 1 else None
    if x is None or w_shape is None or len(x) < 3:
        return unknown
    kernel = _ints(node, "kernel_shape") or list(w_shape[2:])
    if x[1] != w_shape[1] * _int(node, "group", 1):
        raise _Violation("Conv channels do not match its weight")
    return [(x[0], w_shape[0], *_conv_out(node, x, kernel, True))]


def _infer_conv_transpose(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """ConvTranspose: check the channels, the output length and that no kernel tap is cropped."""
    x = shapes[0] if shapes else None
    w_shape = shapes[1] if len(shapes) > 1 else None
    if x is None or w_shape is None or len(x) < 3:
        return unknown
    kernel = _ints(node, "kernel_shape") or list(w_shape[2:])
    group = _int(node, "group", 1)
    if x[1] != w_shape[0]:
        raise _Violation("ConvTranspose channels do not match its weight")
    out_shape = _ints(node, "output_shape")
    padding = _ints(node, "output_padding", [0] * len(kernel)) or [0] * len(kernel)
    spatial = []
    for i, (size, k, s, d, pb, pe) in enumerate(_window(node, x[2:], kernel, transpose=True)):
        length = s * (size - 1) + padding[i] + d * (k - 1) + 1 - pb - pe
        if out_shape:
            length = out_shape[-len(kernel) + i]
        if length < 1:
            raise _Violation("ConvTranspose output is empty")
        for j in range(k):
            if not any(0 <= i_ * s + j * d - pb < length for i_ in range(size)):
                raise _Violation(f"ConvTranspose kernel tap {j} is cropped away")
        spatial.append(length)
    return [(x[0], w_shape[1] * group, *spatial)]


def _infer_pool(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """MaxPool/AveragePool/LpPool: the window shrinks the spatial sizes; extra outputs unknown."""
    x = shapes[0] if shapes else None
    if x is None or len(x) < 3:
        return unknown
    kernel = _ints(node, "kernel_shape") or []
    return [(*x[:2], *_conv_out(node, x, kernel, False))] + [None] * (len(node.outputs) - 1)


def _infer_global_pool(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Global pools: every spatial size becomes 1."""
    x = shapes[0] if shapes else None
    return [None if x is None else (*x[:2], *([1] * (len(x) - 2)))]


def _infer_same(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Element-wise unary ops: the output has the input's shape (so has Dropout's mask)."""
    x = shapes[0] if shapes else None
    return [x] + [x if node.op_type == "Dropout" else None for _ in node.outputs[1:]]


def _infer_broadcast(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Broadcasting element-wise ops: numpy broadcasting of all the inputs."""
    if any(s is None for s in shapes) or not shapes:
        return unknown
    out = shapes[0]
    for s in shapes[1:]:
        out = _broadcast(out, s)
    return [out]


def _infer_flatten(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Flatten: two dimensions, split at ``axis``."""
    x = shapes[0] if shapes else None
    if x is None:
        return unknown
    axis = _int(node, "axis", 1)
    axis = axis + len(x) if axis < 0 else axis
    return [(int(np.prod(x[:axis])), int(np.prod(x[axis:])))]


def _infer_reshape(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Reshape to a constant target: resolve 0 and -1, and keep the element count."""
    x = shapes[0] if shapes else None
    target = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if x is None or target is None:
        return unknown
    dims = [int(v) for v in target.reshape(-1)]
    dims = [x[i] if d == 0 and i < len(x) else d for i, d in enumerate(dims)]
    total = int(np.prod(x))
    if -1 in dims:
        rest = int(np.prod([d for d in dims if d != -1]))
        if rest == 0 or total % rest:
            raise _Violation("Reshape does not divide evenly")
        dims[dims.index(-1)] = total // rest
    elif int(np.prod(dims)) != total:
        raise _Violation("Reshape changes the element count")
    return [tuple(dims)]


def _infer_gemm(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Gemm: the (optionally transposed) inner dimensions must agree."""
    a, b = shapes[0] if shapes else None, shapes[1] if len(shapes) > 1 else None
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return unknown
    if _int(node, "transA", 0):
        a = a[::-1]
    if _int(node, "transB", 0):
        b = b[::-1]
    if a[1] != b[0]:
        raise _Violation(f"Gemm needs {b[0]} inputs, gets {a[1]}")
    return [(a[0], b[1])]


def _infer_matmul(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """MatMul: the inner dimensions must agree; the output is known for a 2-D right operand."""
    a, b = shapes[0] if shapes else None, shapes[1] if len(shapes) > 1 else None
    if a is None or b is None or len(b) < 2 or len(a) < 1:
        return unknown
    if a[-1] != b[-2]:
        raise _Violation(f"MatMul needs {b[-2]} inputs, gets {a[-1]}")
    return [(*a[:-1], b[-1])] if len(b) == 2 else unknown


def _infer_concat(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Concat: all dimensions but ``axis`` must agree; ``axis`` sums."""
    if any(s is None for s in shapes):
        return unknown
    axis = _int(node, "axis", 0)
    axis = axis + len(shapes[0]) if axis < 0 else axis
    out = list(shapes[0])
    for s in shapes[1:]:
        if len(s) != len(out) or any(s[i] != out[i] for i in range(len(out)) if i != axis):
            raise _Violation("Concat inputs disagree")
        out[axis] += s[axis]
    return [tuple(out)]


def _infer_transpose(node: ir.Node, shapes: list[Shape], unknown: list[Shape]) -> list[Shape]:
    """Transpose: permute by ``perm`` (reverse when absent)."""
    x = shapes[0] if shapes else None
    if x is None:
        return unknown
    perm = _ints(node, "perm") or list(range(len(x)))[::-1]
    return [tuple(x[p] for p in perm)]


_Infer = Callable[[ir.Node, list[Shape], list[Shape]], list[Shape]]

#: shape inference per default-domain op; an op not listed has unknown output shapes
_INFER: dict[str, _Infer] = {
    "Conv": _infer_conv,
    "ConvTranspose": _infer_conv_transpose,
    **dict.fromkeys(_POOLS, _infer_pool),
    **dict.fromkeys(_GLOBAL_POOLS, _infer_global_pool),
    **dict.fromkeys(_SHAPE_PRESERVING, _infer_same),
    **dict.fromkeys(_BROADCASTING, _infer_broadcast),
    "Flatten": _infer_flatten,
    "Reshape": _infer_reshape,
    "Gemm": _infer_gemm,
    "MatMul": _infer_matmul,
    "Concat": _infer_concat,
    "Transpose": _infer_transpose,
}


def _infer(node: ir.Node, shapes: list[Shape]) -> list[Shape]:
    """Output shapes of ``node`` from its input shapes (None: unknown); _Violation if impossible."""
    unknown: list[Shape] = [None] * len(node.outputs)
    if node.domain not in ("", "ai.onnx"):
        return unknown
    handler = _INFER.get(node.op_type)
    return unknown if handler is None else handler(node, shapes, unknown)


def _walk(model: ir.Model, feeds: Mapping[str, tuple[int, ...]]) -> None:
    """Propagate ``feeds`` through the main graph; raise _Violation where a constraint fails."""
    shapes: dict[int, Shape] = {}

    def shape_of(value: ir.Value | None) -> Shape:
        if value is None:
            return None
        if id(value) in shapes:
            return shapes[id(value)]
        if value.const_value is not None:
            return tuple(int(d) for d in value.const_value.shape)
        array = _const(value)
        return None if array is None else tuple(array.shape)

    for value in model.graph.inputs:
        if value.name in feeds:
            shapes[id(value)] = tuple(feeds[value.name])
    for node in model.graph:
        ins = [shape_of(v) for v in node.inputs]
        outs = _infer(node, ins)
        for value, s in zip(node.outputs, outs, strict=False):
            if s is not None:
                shapes[id(value)] = s


def derive_input_shapes(
    model: ir.Model,
    given: Mapping[str, tuple[int, ...]] | None = None,
    *,
    max_size: int = 1024,
) -> dict[str, tuple[int, ...]]:
    """Full shapes for every (non-initializer) graph input of ``model``; see the module docstring.

    Raises :class:`InputShapeError` when an input's symbolic dims cannot be sized sensibly.
    """
    given = {name: tuple(int(d) for d in shape) for name, shape in (given or {}).items()}
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    fixed: dict[str, tuple[int, ...]] = {}
    templates: dict[str, list[int | None]] = {}
    for value in inputs:
        name = value.name or ""
        if name in given:
            fixed[name] = given[name]
            continue
        shape = value.shape
        if shape is None:
            raise InputShapeError(
                f"input {name!r} has no declared shape; give it with --input-shape {name}=D1,D2,..."
            )
        dims: list[int | None] = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0 and len(shape) >= 2:
                dims.append(1)  # the batch
            else:
                dims.append(None)
        if all(d is not None for d in dims):
            fixed[name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
        else:
            templates[name] = dims
    if not templates:
        return fixed

    def fill(size: int) -> dict[str, tuple[int, ...]]:
        return {
            name: tuple(size if d is None else d for d in dims) for name, dims in templates.items()
        }

    def problem(size: int) -> str | None:
        try:
            _walk(model, {**fixed, **fill(size)})
        except _Violation as violation:
            return str(violation)
        return None

    last = None
    for size in range(1, max_size + 1):
        last = problem(size)
        if last is None:
            break
    else:
        names = ", ".join(repr(n) for n in templates)
        example = next(iter(templates))
        raise InputShapeError(
            f"cannot derive sizes for the symbolic dimensions of input(s) {names} (no size up to "
            f"{max_size} fits the graph: {last}); give them with --input-shape "
            f"{example}=D1,D2,..."
        )
    # the smallest fitting size; if nothing constrained it, a modest default instead of 1
    if size == 1 and problem(UNCONSTRAINED) is None and _unconstrained(model, fixed, fill):
        size = UNCONSTRAINED
    derived = fill(size)
    logger.info(
        "derived input shapes: %s",
        ", ".join(f"{n}=[{','.join(map(str, s))}]" for n, s in derived.items()),
    )
    return {**fixed, **derived}


def _unconstrained(model: ir.Model, fixed: Mapping[str, Any], fill: Any) -> bool:
    """True when sizes 1 and 2 both fit, i.e. the graph does not pin the size down."""
    try:
        _walk(model, {**fixed, **fill(2)})
    except _Violation:
        return False
    return True
