"""Random small models with BatchNormalization, and the differential check of bnfold's fold on them.

Shared by ``tests/test_fuzz.py`` (a short, deterministic hypothesis run in the normal suite) and
``benchmarks/fuzz_long.py`` (thousands of models). ``generate(rng)`` draws every choice from ``rng``
(a ``random.Random``; under hypothesis, ``st.randoms()``), so a model is reproduced from its seed:

* producer: Conv / ConvTranspose (1-D to 3-D, groups, strides, dilations, explicit pads or auto_pad,
  output_padding, with or without bias), Gemm (transA/transB, alpha, beta, C absent / [N] / [1, N] /
  [M, N] / [1]), MatMul (2-D, optional Add bias on either side; sometimes 3-D, which is kept);
* BatchNormalization: opset 9 to 22 (training_mode, opset-15 parameter dtypes that differ from X),
  statistics tiny, huge, zero or negative γ, zero variance, random ε (default, 0, 1e-12 ... 0.1),
  parameters as initializers, Constant nodes or Identity of those;
* dtype: float32, float16, bfloat16, float64;
* placement: backward (producer → BN), BN → BN chains, the producer's output shared or a graph
  output, a weight shared by two producers, the BN's output used twice or a graph output, forward
  (BN → Conv / Gemm / MatMul, through MaxPool / Flatten), BN on a graph input.

``check(case)`` folds with ``bnfold.fold`` (no verification of its own) and judges the result:

* a documented ``BnfoldError`` is reported as ``error``; any other exception is a ``crash``;
* every BN has one decision; a kept BN has a ``SkipReason`` and a detail;
* the folded model passes ``onnx.checker`` (full check) and keeps the graph's inputs and outputs;
* equivalence: original and folded model run in the model's dtype under ONNX Runtime (CPU, graph
  optimizations disabled). bfloat16, which ORT's CPU provider does not run, is emulated (float32
  arithmetic, every node's output rounded to bfloat16, as accelerators do); where ORT lacks a kernel
  (float64 Conv) onnx's ReferenceEvaluator runs both. Both are compared with the *truth*, the original
  model evaluated in float64 (ReferenceEvaluator). The fold is ``wrong`` when its error exceeds
  ``4 × the original's own error + tol(dtype) × max |truth|`` on an output, or it is not finite where
  the original is: a wrong verdict means the fold changed the function beyond what rounding in the
  model's own dtype explains.
"""

from __future__ import annotations

import math
import random
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32, F16, BF16, F64 = (
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float64),
)
ELEM = {
    F32: TensorProto.FLOAT,
    F16: TensorProto.FLOAT16,
    BF16: TensorProto.BFLOAT16,
    F64: TensorProto.DOUBLE,
}
NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16", F64: "float64"}
#: unit roundoff of each dtype
UNIT = {F64: 2.0**-53, F32: 2.0**-24, F16: 2.0**-11, BF16: 2.0**-8}
#: the rounding bound of a computation: ROUNDING_FACTOR × unit roundoff × its magnitude (below)
ROUNDING_FACTOR = 8.0
#: "as exact as the original": within ERROR_FACTOR × the original's error + TOL × max |truth|
ERROR_FACTOR = 4.0
TOL = {F64: 1e-12, F32: 1e-5, F16: 1e-2, BF16: 6e-2}
FLOAT_ELEMS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


# ------------------------------------------------------------------------------------ the model
@dataclass
class Case:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    dtype: np.dtype
    description: str


class _Builder:
    def __init__(self, rng: random.Random, dtype: np.dtype, opset: int) -> None:
        self.rng = rng
        self.np = np.random.default_rng(rng.getrandbits(32))
        self.dtype = dtype
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.notes: list[str] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def const(self, array: np.ndarray, base: str, *, how: str = "init") -> str:
        """A constant as an initializer, a Constant node, or an Identity of an initializer."""
        name = self.name(base)
        if how == "constant":
            self.nodes.append(
                helper.make_node(
                    "Constant", [], [name], value=numpy_helper.from_array(array, name + "_v")
                )
            )
        elif how == "identity":
            src = self.name(base + "_src")
            self.inits.append(numpy_helper.from_array(array, src))
            self.nodes.append(helper.make_node("Identity", [src], [name]))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def input(self, shape: list[int], scale: float) -> str:
        name = self.name("X")
        self.inputs.append(helper.make_tensor_value_info(name, ELEM[self.dtype], shape))
        self.feeds[name] = (self.np.standard_normal(shape) * scale).astype(self.dtype)
        return name

    def output(self, name: str) -> None:
        if name not in {o.name for o in self.outputs}:
            self.outputs.append(helper.make_tensor_value_info(name, ELEM[self.dtype], None))

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op[:4].lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def weights(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        scale = math.sqrt(2.0 / max(1, fan_in)) * 10 ** self.rng.uniform(-1, 1)
        return (self.np.standard_normal(shape) * scale).astype(self.dtype)


def _pick(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


# ----------------------------------------------------------------------------- producers
def _conv_out(size: int, k: int, s: int, d: int, pads: tuple[int, int]) -> int:
    return (size + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1


def conv(
    b: _Builder,
    x: str,
    shape: list[int],
    *,
    cout: int | None = None,
    transpose: bool = False,
    weight: str | None = None,
) -> tuple[str, list[int], dict]:
    """A Conv / ConvTranspose on ``x`` ([N, C, spatial...]); returns (output, its shape, the spec)."""
    rng = b.rng
    rank = len(shape) - 2
    cin = shape[1]
    group = rng.choice([g for g in (1, 2, 3, 4) if cin % g == 0])
    if cout is None:
        cout = group * rng.randint(1, 3)
    elif cout % group:
        group = 1
    k = [rng.randint(1, 3) for _ in range(rank)]
    s = [rng.choice([1, 1, 2]) for _ in range(rank)]
    d = [rng.choice([1, 1, 2]) for _ in range(rank)]
    attrs: dict[str, Any] = {"group": group} if group > 1 or rng.random() < 0.3 else {}
    if rng.random() < 0.7:
        attrs["kernel_shape"] = k
    if any(v != 1 for v in s) or rng.random() < 0.2:
        attrs["strides"] = s
    if any(v != 1 for v in d) or rng.random() < 0.2:
        attrs["dilations"] = d
    auto = _pick(rng, [("NOTSET", 6), ("SAME_UPPER", 1), ("SAME_LOWER", 1), ("VALID", 1)])
    if auto.startswith("SAME") and any(v != 1 for v in d):
        auto = "NOTSET"  # ONNX Runtime: dilation is not supported with SAME padding
    pads = [(0, 0)] * rank
    if auto != "NOTSET":
        attrs["auto_pad"] = auto
    elif rng.random() < 0.7:
        top = [(k[i] - 1) * (d[i] if transpose else 1) for i in range(rank)]
        pads = [(rng.randint(0, top[i]), rng.randint(0, top[i])) for i in range(rank)]
        attrs["pads"] = [p[0] for p in pads] + [p[1] for p in pads]
    spatial = shape[2:]
    if transpose:
        out_pad = [
            rng.randint(0, max(s[i], d[i]) - 1) if rng.random() < 0.3 else 0 for i in range(rank)
        ]
        if any(out_pad):
            attrs["output_padding"] = out_pad
        w_shape = (cin, cout // group, *k)
        fan_in = cin // group * math.prod(k)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out_spatial = [spatial[i] * s[i] for i in range(rank)]
        else:
            out_spatial = [
                s[i] * (spatial[i] - 1)
                + out_pad[i]
                + ((k[i] - 1) * d[i] + 1)
                - pads[i][0]
                - pads[i][1]
                for i in range(rank)
            ]
    else:
        w_shape = (cout, cin // group, *k)
        fan_in = cin // group * math.prod(k)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out_spatial = [-(-spatial[i] // s[i]) for i in range(rank)]
        else:
            out_spatial = [_conv_out(spatial[i], k[i], s[i], d[i], pads[i]) for i in range(rank)]
    if any(o < 1 for o in out_spatial):
        return "", [], {}
    w = weight or b.const(b.weights(w_shape, fan_in), "W")
    inputs = [x, w]
    bias = rng.random() < 0.6
    if bias:  # sometimes a large offset, so the BN mean is large next to the spread
        offset = 10 ** rng.uniform(1, 3) if rng.random() < 0.2 else 0.5
        inputs.append(b.const((b.np.standard_normal(cout) * offset).astype(b.dtype), "bias"))
    op = "ConvTranspose" if transpose else "Conv"
    out = b.node(op, inputs, **attrs)
    spec = {
        "op": op,
        "rank": rank,
        "group": group,
        "k": k,
        "bias": bias,
        **{a: v for a, v in attrs.items() if a != "kernel_shape"},
    }
    return out, [shape[0], cout, *out_spatial], spec


def gemm(
    b: _Builder, x: str, shape: list[int], *, n: int | None = None
) -> tuple[str, list[int], dict]:
    rng = b.rng
    m, k = shape
    n = n or rng.randint(1, 6)
    trans_a = rng.random() < 0.3
    trans_b = rng.random() < 0.5
    if trans_a:  # feed Aᵀ: transpose the input first
        x = b.node("Transpose", [x], perm=[1, 0])
    bw = b.weights((n, k) if trans_b else (k, n), k)
    inputs = [x, b.const(bw, "B")]
    attrs: dict[str, Any] = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b or rng.random() < 0.2:
        attrs["transB"] = int(trans_b)
    if rng.random() < 0.3:
        attrs["alpha"] = rng.choice([0.5, 2.0, -1.0, 1e-3])
    if rng.random() < 0.3:
        attrs["beta"] = rng.choice([0.0, 0.5, 2.0, -1.0])
    c_shape = _pick(rng, [(None, 2), ((n,), 3), ((1, n), 1), ((m, n), 1), ((1,), 1), ((m, 1), 1)])
    if c_shape is not None:
        inputs.append(b.const((b.np.standard_normal(c_shape) * 0.5).astype(b.dtype), "C"))
    out = b.node("Gemm", inputs, **attrs)
    return out, [m, n], {"op": "Gemm", "C": c_shape, **attrs}


def matmul(
    b: _Builder, x: str, shape: list[int], *, n: int | None = None
) -> tuple[str, list[int], dict]:
    rng = b.rng
    k = shape[-1]
    n = n or rng.randint(1, 6)
    out = b.node("MatMul", [x, b.const(b.weights((k, n), k), "Wm")])
    spec: dict[str, Any] = {"op": "MatMul", "rank": len(shape)}
    if rng.random() < 0.5:
        bias_shape = rng.choice([(n,), (1, n)])
        bias = b.const((b.np.standard_normal(bias_shape) * 0.5).astype(b.dtype), "mb")
        out = b.node("Add", [out, bias] if rng.random() < 0.7 else [bias, out])
        spec["bias"] = bias_shape
    return out, [*shape[:-1], n], spec


# ----------------------------------------------------------------------------- BatchNormalization
def _activation_stats(b: _Builder, x: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (axis 1) mean and variance of ``x`` on the model's inputs: what a BN trained on
    this data would have recorded."""
    graph = helper.make_graph(
        b.nodes, "calib", b.inputs, [helper.make_tensor_value_info(x, ELEM[b.dtype], None)], b.inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    try:
        with np.errstate(all="ignore"):
            (y,) = _reference(convert(model, F64), {k: v.astype(F64) for k, v in b.feeds.items()})
            axes = tuple(i for i in range(y.ndim) if i != 1)
            return y.mean(axis=axes), y.var(axis=axes)
    except Exception:
        return None


def _stats(b: _Builder, x: str, c: int, dtype: np.dtype) -> tuple[dict[str, np.ndarray], str]:
    """γ, β, μ, σ² for ``c`` channels: calibrated on the data (as training records them), ordinary
    random, or extreme."""
    rng, g = b.rng, b.np
    kind = _pick(
        rng,
        [
            ("calibrated", 6),
            ("normal", 3),
            ("tiny_var", 1),
            ("huge_var", 1),
            ("zero_gamma", 1),
            ("negative_gamma", 1),
            ("big_mean", 1),
            ("zero_var", 1),
            ("extreme", 1),
        ],
    )
    gamma = g.uniform(0.5, 1.5, c) * g.choice([-1.0, 1.0], c)
    beta = g.standard_normal(c) * 0.5
    mean = g.standard_normal(c) * 0.5
    var = g.uniform(0.2, 2.0, c)
    calibrated = _activation_stats(b, x) if kind == "calibrated" else None
    if calibrated is not None:
        m, v = calibrated
        mean = m + g.standard_normal(c) * np.sqrt(v) * 0.1
        var = v * 10 ** g.uniform(-0.3, 0.3, c)
    elif kind == "calibrated":
        kind = "normal"
    if kind == "tiny_var":
        var = 10 ** g.uniform(-8, -3, c)
    elif kind == "huge_var":
        var = 10 ** g.uniform(3, 8, c)
    elif kind == "zero_gamma":
        gamma[g.random(c) < 0.5] = 0.0
    elif kind == "negative_gamma":
        gamma = -np.abs(gamma)
    elif kind == "big_mean":
        mean = g.standard_normal(c) * 10 ** rng.uniform(1, 4)
    elif kind == "zero_var":
        var[g.random(c) < 0.5] = 0.0
    elif kind == "extreme":
        gamma = gamma * 10 ** g.uniform(-4, 4, c)
        var = 10 ** g.uniform(-6, 6, c)
        beta = beta * 10 ** rng.uniform(-2, 3)
    with np.errstate(over="ignore"):
        return {
            "scale": gamma.astype(dtype),
            "B": beta.astype(dtype),
            "mean": mean.astype(dtype),
            "var": var.astype(dtype),
        }, kind


def batchnorm(
    b: _Builder, x: str, shape: list[int], *, output: str | None = None
) -> tuple[str, dict]:
    rng = b.rng
    c = shape[1]
    param_dtype = b.dtype
    if b.opset >= 15 and b.dtype in (F16, BF16) and rng.random() < 0.3:
        param_dtype = F32  # opset 15: T1/T2 may differ from T
    stats, kind = _stats(b, x, c, param_dtype)
    how = _pick(rng, [("init", 8), ("constant", 1), ("identity", 1)])
    names = [b.const(stats[k], k[:2], how=how) for k in ("scale", "B", "mean", "var")]
    attrs: dict[str, Any] = {}
    eps = _pick(rng, [(None, 4), (1e-3, 2), (1e-12, 1), (0.0, 1), (0.1, 1), (1e-5, 1)])
    if eps is not None:
        attrs["epsilon"] = eps
    if b.opset >= 14 and rng.random() < 0.1:
        attrs["training_mode"] = 0
    out = output or b.name("bn")
    b.nodes.append(
        helper.make_node("BatchNormalization", [x, *names], [out], name=b.name("BN"), **attrs)
    )
    return out, {
        "stats": kind,
        "epsilon": eps,
        "params": how,
        **({"param_dtype": NAMES[param_dtype]} if param_dtype != b.dtype else {}),
    }


# ----------------------------------------------------------------------------- templates
PLACEMENTS = [
    ("backward", 10),
    ("chain", 2),
    ("producer_shared", 1),
    ("producer_is_output", 1),
    ("shared_weight", 2),
    ("bn_used_twice", 1),
    ("bn_is_output_and_used", 1),
    ("forward", 4),
    ("forward_through", 2),
    ("bn_on_input", 1),
]


def _input_for(b: _Builder, kind: str) -> tuple[str, list[int]]:
    rng = b.rng
    scale = 10 ** (
        rng.uniform(1, 3) if rng.random() < 0.15 else rng.uniform(-1, 1)
    )  # sometimes large
    if kind in ("Conv", "ConvTranspose"):
        rank = _pick(rng, [(1, 3), (2, 4), (3, 1)])
        size = {1: (3, 9), 2: (3, 7), 3: (2, 4)}[rank]
        shape = [rng.randint(1, 2), rng.choice([1, 2, 3, 4, 6])] + [
            rng.randint(*size) for _ in range(rank)
        ]
    elif kind == "MatMul3d":
        shape = [rng.randint(1, 2), rng.randint(1, 4), rng.randint(1, 6)]
    else:
        shape = [rng.randint(1, 4), rng.randint(1, 6)]
    return b.input(shape, scale), shape


def _producer(
    b: _Builder, kind: str, x: str, shape: list[int], **kw
) -> tuple[str, list[int], dict]:
    if kind in ("Conv", "ConvTranspose"):
        return conv(b, x, shape, transpose=kind == "ConvTranspose", **kw)
    if kind == "Gemm":
        return gemm(b, x, shape, **{k: v for k, v in kw.items() if k == "n"})
    return matmul(b, x, shape, **{k: v for k, v in kw.items() if k == "n"})


def _opset(rng: random.Random, dtype: np.dtype, kind: str) -> int:
    if dtype == BF16:
        return (
            22 if kind in ("Conv", "ConvTranspose", "MaxPool") else rng.choice([14, 15, 17, 21, 22])
        )
    return rng.choice([9, 11, 13, 14, 15, 17, 18, 21])


def generate(rng: random.Random) -> Case | None:
    """A random model, or None when the draw does not make a valid one (e.g. a kernel too big)."""
    dtype = _pick(rng, [(F32, 5), (F16, 2), (BF16, 2), (F64, 1)])
    placement = _pick(rng, PLACEMENTS)
    kind = _pick(
        rng, [("Conv", 5), ("ConvTranspose", 2), ("Gemm", 2), ("MatMul", 2), ("MatMul3d", 1)]
    )
    if placement in ("forward", "forward_through") and kind == "MatMul3d":
        kind = "MatMul"
    opset = _opset(rng, dtype, "Conv" if placement == "forward_through" else kind)
    b = _Builder(rng, dtype, opset)
    prod_kind = "MatMul" if kind == "MatMul3d" else kind
    spec: dict[str, Any] = {"dtype": NAMES[dtype], "opset": opset, "placement": placement}
    x, shape = _input_for(b, kind)

    if placement in ("forward", "forward_through", "bn_on_input"):
        # BN first (on the input, or after a Relu), then the node the BN may fold forward into.
        src = x if placement == "bn_on_input" or rng.random() < 0.5 else b.node("Relu", [x])
        y, bn_spec = batchnorm(b, src, shape)
        spec["bn"] = bn_spec
        if placement == "forward_through":
            if len(shape) > 2:
                if rng.random() < 0.5:
                    kp = [rng.choice([1, 2]) if d >= 2 else 1 for d in shape[2:]]
                    y = b.node("MaxPool", [y], kernel_shape=kp, strides=kp)
                    shape = shape[:2] + [
                        (d - k) // k + 1 for d, k in zip(shape[2:], kp, strict=True)
                    ]
                y = b.node("Flatten", [y], axis=1)
                shape = [shape[0], math.prod(shape[1:])]
                prod_kind = rng.choice(["Gemm", "MatMul"])
            else:
                y = b.node(rng.choice(["Identity", "Relu"]), [y])
        if placement != "bn_on_input":
            y, shape, p = _producer(b, prod_kind, y, shape)
            if not y:
                return None
            spec["consumer"] = p
        b.output(y)
    else:
        y, out_shape, p = _producer(b, prod_kind, x, shape)
        if not y:
            return None
        spec["producer"] = p
        if placement == "shared_weight":
            # a second producer with the same weight (and bias), e.g. a tied layer
            twin = onnx.NodeProto()
            twin.CopyFrom(
                next(
                    n
                    for n in reversed(b.nodes)
                    if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                )
            )
            twin.name, twin.output[0] = b.name("twin"), b.name("twin_out")
            b.nodes.append(twin)
            b.output(twin.output[0])
        if placement == "producer_shared":
            b.output(b.node("Relu", [y]))
        if placement == "producer_is_output":
            b.output(y)
        bn_out, bn_spec = batchnorm(b, y, out_shape)
        spec["bn"] = bn_spec
        if placement == "chain":
            bn_out, spec["bn2"] = batchnorm(b, bn_out, out_shape)
        if placement in ("bn_used_twice", "bn_is_output_and_used"):
            b.output(b.node("Relu", [bn_out]))
            if placement == "bn_used_twice":
                bn_out = b.node(rng.choice(["Identity", "Neg"]), [bn_out])
        elif rng.random() < 0.3:
            bn_out = b.node("Relu", [bn_out])
        b.output(bn_out)

    graph = helper.make_graph(b.nodes, "fuzz", b.inputs, b.outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception:
        return None  # a draw the generator could not make valid (shape inference disagrees)
    return Case(model, b.feeds, dtype, repr(spec))


# ----------------------------------------------------------------------------- running models
def _convert_tensor(t: TensorProto, to: np.dtype) -> TensorProto:
    if t.data_type not in FLOAT_ELEMS or t.data_location == TensorProto.EXTERNAL:
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(to), t.name)


def convert(
    model: onnx.ModelProto, to: np.dtype, *, round_to: np.dtype | None = None
) -> onnx.ModelProto:
    """The same model with every float tensor, type and Cast in dtype ``to``; with ``round_to``,
    every node's output is rounded to that dtype and back (storage in ``round_to``, arithmetic in
    ``to``)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.ClearField("value_info")
    elem = ELEM[to]
    g = m.graph
    for t in list(g.initializer):
        t.CopyFrom(_convert_tensor(t, to))
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type in FLOAT_ELEMS:
            vi.type.tensor_type.elem_type = elem
    nodes = []
    for node in g.node:
        for a in node.attribute:
            if a.HasField("t"):
                a.t.CopyFrom(_convert_tensor(a.t, to))
            if node.op_type == "Cast" and a.name == "to" and a.i in FLOAT_ELEMS:
                a.i = elem
        if round_to is None or node.op_type in ("Constant", "Identity", "Shape"):
            nodes.append(node)
            continue
        outs = list(node.output)
        for i, o in enumerate(outs):
            if o:
                node.output[i] = o + "__exact"
        nodes.append(node)
        for o in outs:
            if o:
                nodes.append(
                    helper.make_node("Cast", [o + "__exact"], [o + "__r"], to=ELEM[round_to])
                )
                nodes.append(helper.make_node("Cast", [o + "__r"], [o], to=elem))
    g.ClearField("node")
    g.node.extend(nodes)
    return m


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _ungroup_conv_transpose(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's ReferenceEvaluator gets grouped ConvTranspose wrong: split it into one per group."""
    grouped = [
        n
        for n in model.graph.node
        if n.op_type == "ConvTranspose" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    if not grouped:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant"}
    nodes = []
    for node in m.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "ConvTranspose" or group == 1:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits.get(node.input[1]) or consts[node.input[1]])
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits.get(node.input[2]) or consts[node.input[2]])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
        cin_g, cout_g = w.shape[0] // group, w.shape[1]
        parts = [f"{node.output[0]}__x{i}" for i in range(group)]
        outs = []
        for i in range(group):
            idx = node.output[0] + f"__i{i}"
            m.graph.initializer.append(
                numpy_helper.from_array(np.arange(i * cin_g, (i + 1) * cin_g, dtype=np.int64), idx)
            )
            nodes.append(helper.make_node("Gather", [node.input[0], idx], [parts[i]], axis=1))
            wi = node.output[0] + f"__w{i}"
            m.graph.initializer.append(numpy_helper.from_array(w[i * cin_g : (i + 1) * cin_g], wi))
            ins = [parts[i], wi]
            if bias is not None:
                bi = node.output[0] + f"__b{i}"
                m.graph.initializer.append(
                    numpy_helper.from_array(bias[i * cout_g : (i + 1) * cout_g], bi)
                )
                ins.append(bi)
            outs.append(node.output[0] + f"__y{i}")
            nodes.append(helper.make_node("ConvTranspose", ins, [outs[-1]], **attrs))
        nodes.append(helper.make_node("Concat", outs, [node.output[0]], axis=1))
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)
    return m


def _bn_op():
    """A BatchNormalization (inference) for the ReferenceEvaluator, whose own opset-9 to 13 kernel
    is inexact (errors near 1e-2 in float64)."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(
            self,
            x,
            scale,
            bias,
            mean,
            var,
            epsilon=None,
            momentum=None,
            training_mode=None,
            spatial=None,
            is_test=None,
        ):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            eps = 1e-5 if epsilon is None else float(epsilon)

            def p(a):
                return np.asarray(a, dtype=np.float64).reshape(shape)

            with np.errstate(all="ignore"):
                y = (x.astype(np.float64) - p(mean)) / np.sqrt(p(var) + eps) * p(scale) + p(bias)
            return (y.astype(x.dtype),)

    return BatchNormalization


def _magnitude_ops():
    """Ops of the magnitude network (see run_magnitude): each computes a bound of |its output|."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(
            self,
            x,
            scale,
            bias,
            mean,
            var,
            epsilon=None,
            momentum=None,
            training_mode=None,
            spatial=None,
            is_test=None,
        ):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            eps = 1e-5 if epsilon is None else float(epsilon)

            def p(a):
                return np.abs(np.asarray(a, dtype=np.float64)).reshape(shape)

            with np.errstate(all="ignore"):
                s = p(scale) / np.sqrt(np.maximum(p(var) + eps, 0))
            return ((np.abs(x) + p(mean)) * s + p(bias),)

    class Neg(OpRun):
        op_domain = ""

        def _run(self, x):
            return (np.abs(x),)

    class Sub(OpRun):
        op_domain = ""

        def _run(self, a, b):
            return (np.abs(a) + np.abs(b),)

    return [BatchNormalization, Neg, Sub]


def _reference(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, magnitude: bool = False
) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    model = _ungroup_conv_transpose(model)
    ops = _magnitude_ops() if magnitude else [_bn_op()]
    return [np.asarray(v) for v in ReferenceEvaluator(model, new_ops=ops).run(None, feeds)]


def run_native(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], dtype: np.dtype, engine: str | None = None
) -> tuple[list[np.ndarray], str]:
    """Run in the model's dtype: ORT (optimizations off); bfloat16 emulated on ORT; ORT's missing
    kernels (float64 Conv) on the ReferenceEvaluator. ``engine`` forces the one the original used."""
    if dtype == BF16:
        f32 = convert(model, F32, round_to=BF16)
        outs = _ort(f32, {k: v.astype(F32) for k, v in feeds.items()})
        return [o.astype(BF16) for o in outs], "ort-bf16-emulated"
    if engine in (None, "ort"):
        try:
            return _ort(model, feeds), "ort"
        except Exception as exc:
            if (
                engine == "ort"
                or "NOT_IMPLEMENTED" not in str(exc)
                and "Could not find an implementation" not in str(exc)
            ):
                raise
    return _reference(model, feeds), "reference"


def run_truth(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The original model in float64 (exact parameters and inputs, float64 arithmetic)."""
    f64 = convert(model, F64)
    with np.errstate(all="ignore"):
        return _reference(f64, {k: v.astype(F64) for k, v in feeds.items()})


def run_magnitude(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The magnitude network of ``model``: float64, every weight, constant and input replaced by its
    absolute value, and each op by one that bounds |output| (Gemm's α and β by |α|, |β|; a BN by
    (|x| + |μ|)·|γ|/√(σ²+ε) + |β|). Its output bounds the terms whose rounding makes the model's
    own error in its dtype: error ≲ unit roundoff × magnitude."""
    m = convert(model, F64)
    for t in m.graph.initializer:
        if t.data_type == TensorProto.DOUBLE:
            t.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(t)), t.name))
    for node in m.graph.node:
        for a in node.attribute:
            if a.HasField("t") and a.t.data_type == TensorProto.DOUBLE:
                a.t.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(a.t)), a.t.name))
            if node.op_type == "Gemm" and a.name in ("alpha", "beta"):
                a.f = abs(a.f)
    with np.errstate(all="ignore"):
        return [
            np.abs(v)
            for v in _reference(
                m, {k: np.abs(v.astype(F64)) for k, v in feeds.items()}, magnitude=True
            )
        ]


# ----------------------------------------------------------------------------- the check
@dataclass
class Outcome:
    status: str  # folded | kept | imprecise | wrong | crash | error | skipped
    description: str
    decisions: list[tuple[str, str | None]] = field(default_factory=list)  # (status, reason)
    message: str = ""
    dtype: str = ""
    #: max over BNs and channels of |μ| / √(σ² + ε): how much a BN cancels (see ``offset_ratio``)
    offset_ratio: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("wrong", "crash")


def compare(
    truth: np.ndarray,
    orig: np.ndarray,
    folded: np.ndarray,
    magnitude: np.ndarray,
    dtype: np.dtype,
    truth_magnitude: np.ndarray | None = None,
) -> tuple[str | None, str]:
    """Judge the folded model's output against the truth: (None | "wrong" | "imprecise", message).

    * wrong: its error exceeds what rounding in ``dtype`` can explain, ERROR_FACTOR × the original's
      error + ROUNDING_FACTOR × unit roundoff × max(magnitude of the folded computation) (+ the
      truth's own float64 rounding, from ``truth_magnitude``); or it is not finite where the
      original is. A wrong fold is a bug.
    * imprecise: within that rounding bound, but less exact than the original beyond ERROR_FACTOR ×
      its error + TOL × max |truth|: the fold is exact in real arithmetic, and its rounding costs
      more than the original's (e.g. a large BN mean next to a small spread, in float16).
    """
    t = np.asarray(truth, dtype=np.float64)
    a = np.asarray(orig).astype(np.float64)
    f = np.asarray(folded).astype(np.float64)
    if a.shape != f.shape:
        return "wrong", f"shape {f.shape}, expected {a.shape}"
    limit = float(ml_dtypes.finfo(dtype).max) * 0.5
    rep = np.isfinite(t) & (np.abs(t) <= limit)  # values the dtype can hold comfortably
    if not rep.any():
        return None, ""
    bad = rep & ~np.isfinite(f) & np.isfinite(a)
    if bad.any():
        return "wrong", f"{int(bad.sum())} non-finite value(s) where the original is finite"
    with np.errstate(invalid="ignore", over="ignore"):
        e_orig = float(np.max(np.abs(a - t)[rep])) if np.isfinite(a[rep]).all() else math.inf
        e_fold = float(np.max(np.abs(f - t)[rep]))
    scale = float(np.max(np.abs(t[rep])))
    mag = float(np.max(np.asarray(magnitude, dtype=np.float64)[rep]))
    rounding = ERROR_FACTOR * e_orig + ROUNDING_FACTOR * UNIT[dtype] * mag
    if truth_magnitude is not None:  # the float64 truth is itself rounded
        rounding += (
            ROUNDING_FACTOR
            * UNIT[F64]
            * float(np.max(np.asarray(truth_magnitude, dtype=np.float64)[rep]))
        )
    close = ERROR_FACTOR * e_orig + TOL[dtype] * scale
    what = (
        f"max error {e_fold:.3g} vs truth; original's {e_orig:.3g}; max |truth| {scale:.3g}; "
        f"rounding bound {rounding:.3g}"
    )
    if e_fold > max(rounding, close):
        return "wrong", what
    if e_fold > close:
        return "imprecise", what
    return None, what


def offset_ratio(model: onnx.ModelProto) -> float:
    """max |μ| / √(σ² + ε) over the model's BNs: the BN subtracts a mean this many standard
    deviations away from 0, so folding it moves a cancellation of that size into rounded weights."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in values:
            values[n.output[0]] = values[n.input[0]]
    ratio = 0.0
    for n in model.graph.node:
        if n.op_type != "BatchNormalization" or not all(i in values for i in n.input[3:5]):
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), np.float32(1e-5))
        mean, var = (np.asarray(values[i], dtype=np.float64) for i in n.input[3:5])
        with np.errstate(all="ignore"):
            r = np.abs(mean) / np.sqrt(var + float(eps))
        r = r[np.isfinite(r)]
        if r.size:
            ratio = max(ratio, float(r.max()))
    return ratio


def check(case: Case) -> Outcome:
    from bnfold.api import fold
    from bnfold.errors import BnfoldError
    from bnfold.report import SkipReason

    out = Outcome(
        "skipped", case.description, dtype=NAMES[case.dtype], offset_ratio=offset_ratio(case.model)
    )
    try:
        truth = run_truth(case.model, case.feeds)
        orig, engine = run_native(case.model, case.feeds, case.dtype)
    except Exception as exc:  # the original itself does not run: not a fold question
        out.message = f"original does not run: {str(exc).splitlines()[0][:200]}"
        return out
    for o, t, a in zip(case.model.graph.output, truth, orig, strict=True):
        if np.shape(t) != np.shape(a):  # the two engines disagree on the original: no judge
            out.message = (
                f"output {o.name}: reference shape {np.shape(t)}, {engine} shape {np.shape(a)}"
            )
            return out
    before = case.model.SerializeToString()
    try:
        result = fold(case.model, verify=False)
    except BnfoldError as exc:
        out.status, out.message = "error", f"{type(exc).__name__}: {exc}"
        return out
    except Exception:
        out.status, out.message = "crash", traceback.format_exc()
        return out
    problems: list[str] = []
    imprecise: list[str] = []
    if case.model.SerializeToString() != before:
        problems.append("the input ModelProto was modified")
    folded = result.model
    n_bn = sum(n.op_type == "BatchNormalization" for n in case.model.graph.node)
    out.decisions = [
        (
            "folded" if d.folded else "kept",
            None if d.folded else getattr(d.reason, "value", str(d.reason)),
        )
        for d in result.decisions
    ]
    if len(result.decisions) != n_bn:
        problems.append(f"{len(result.decisions)} decisions for {n_bn} BatchNormalization nodes")
    for d in result.decisions:
        if not d.folded and (not isinstance(d.reason, SkipReason) or not (d.detail or "").strip()):
            problems.append(f"kept BN {d.name} has no reason/detail: {d.reason!r} {d.detail!r}")
    n_folded = sum(d.folded for d in result.decisions)
    left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    lowered = sum(getattr(d, "direction", None) == "lowered" for d in result.decisions)
    if left != n_bn - n_folded - lowered:
        problems.append(f"{left} BatchNormalization left, expected {n_bn - n_folded}")
    try:
        onnx.checker.check_model(folded, full_check=True)
    except Exception as exc:
        problems.append(f"onnx.checker: {str(exc).splitlines()[0][:300]}")
    sig = [(v.name, v.type.SerializeToString()) for v in case.model.graph.input]
    if [
        (v.name, v.type.SerializeToString()) for v in folded.graph.input if v.name in dict(sig)
    ] != sig:
        problems.append("graph inputs changed")
    if [o.name for o in folded.graph.output] != [o.name for o in case.model.graph.output]:
        problems.append("graph outputs changed")
    if not problems:
        try:
            got, _ = run_native(folded, case.feeds, case.dtype, engine=engine)
        except Exception as exc:
            problems.append(
                f"folded model does not run on {engine}: {str(exc).splitlines()[0][:300]}"
            )
        else:
            magnitude = run_magnitude(folded, case.feeds)
            truth_magnitude = run_magnitude(case.model, case.feeds)
            for o, t, a, f, mag, tmag in zip(
                case.model.graph.output, truth, orig, got, magnitude, truth_magnitude, strict=True
            ):
                verdict, why = compare(t, a, f, mag, case.dtype, tmag)
                if verdict == "wrong":
                    problems.append(f"output {o.name}: {why}")
                elif verdict == "imprecise":
                    imprecise.append(f"output {o.name}: {why}")
    if problems:
        out.status, out.message = "wrong", "; ".join(problems)
    elif imprecise:
        out.status, out.message = "imprecise", "; ".join(imprecise)
    else:
        out.status = "folded" if n_folded else "kept"
    return out


@dataclass
class Tally:
    """Counts over many checks: models by outcome, BNs by decision and kept reason."""

    models: Counter = field(default_factory=Counter)
    bns: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    failures: list[tuple[Any, Outcome]] = field(default_factory=list)

    def add(self, key: Any, outcome: Outcome) -> None:
        self.models[outcome.status] += 1
        for status, reason in outcome.decisions:
            self.bns[status] += 1
            if reason:
                self.reasons[reason] += 1
        if outcome.failed:
            self.failures.append((key, outcome))
