"""Models built in code for the verdict tests and ``benchmarks/mutations.py``.

* :func:`deep_resnet`: an ImageNet-style residual net (7x7 stride-2 stem, max pool, four stages of
  3x3 Conv+BN+ReLU pairs with identity or 1x1 projection shortcuts, global average pool, Gemm head)
  with random weights scaled so activations grow with depth: at 50 layers the logits reach ~1e5,
  where a correct fold's float32 re-rounding moves near-zero logits by ~0.1.
* :func:`corner_tap_pair`: a model with symbolic H, W and 3x3 kernels, and a "candidate" whose
  corner taps are off by +1.0, which only an input larger than 1x1 can tell apart.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class _Net:
    def __init__(self, seed: int, dtype: np.dtype) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, prefix: str, array: np.ndarray) -> str:
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(self.dtype), n))
        return n

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, gain: float, relu: bool):
        w = self.rng.standard_normal((cout, cin, k, k)) * gain * np.sqrt(2.0 / (cin * k * k))
        y = self.name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.init("w", w), self.init("b", self.rng.standard_normal(cout) * 0.1)],
                [y],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
                name=y,
            )
        )
        var = self.rng.uniform(0.5, 2.0, cout)
        bn = self.name("bn")
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [
                    y,
                    self.init("g", self.rng.uniform(0.5, 1.5, cout)),
                    self.init("beta", self.rng.standard_normal(cout) * 0.2),
                    self.init("mean", self.rng.standard_normal(cout) * 0.2),
                    self.init("var", var),
                ],
                [bn],
                epsilon=1e-5,
                name=bn,
            )
        )
        if not relu:
            return bn
        r = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [bn], [r], name=r))
        return r


def deep_resnet(
    layers: int = 50,
    *,
    size: int = 32,
    width: int = 16,
    classes: int = 100,
    seed: int = 0,
    gain: float = 1.6,
    dtype: np.dtype = np.float32,
) -> onnx.ModelProto:
    """A ``layers``-deep residual Conv+BN net on ``[1, 3, size, size]`` input (see module doc)."""
    net = _Net(seed, dtype)
    x = net.conv_bn("x", 3, width, 7, 2, gain, relu=True)
    p = net.name("pool")
    net.nodes.append(
        helper.make_node("MaxPool", [x], [p], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    )
    x, cin = p, width
    blocks = max(1, (layers - 2) // 2)
    per_stage = [blocks // 4 + (1 if i < blocks % 4 else 0) for i in range(4)]
    for stage, count in enumerate(per_stage):
        cout = width * 2**stage
        for b in range(count):
            stride = 2 if (b == 0 and stage > 0) else 1
            h = net.conv_bn(x, cin, cout, 3, stride, gain, relu=True)
            h = net.conv_bn(h, cout, cout, 3, 1, gain, relu=False)
            short = (
                x
                if (stride == 1 and cin == cout)
                else net.conv_bn(x, cin, cout, 1, stride, 1.0, False)
            )
            s = net.name("add")
            net.nodes.append(helper.make_node("Add", [h, short], [s], name=s))
            r = net.name("relu")
            net.nodes.append(helper.make_node("Relu", [s], [r], name=r))
            x, cin = r, cout
    g = net.name("gap")
    net.nodes.append(helper.make_node("GlobalAveragePool", [x], [g], name=g))
    f = net.name("flat")
    net.nodes.append(helper.make_node("Flatten", [g], [f], name=f))
    fc = net.rng.standard_normal((cin, classes)) * gain * np.sqrt(2.0 / cin)
    net.nodes.append(
        helper.make_node(
            "Gemm", [f, net.init("fc", fc), net.init("fcb", np.zeros(classes))], ["logits"]
        )
    )
    elem = ELEM[net.dtype]
    graph = helper.make_graph(
        net.nodes,
        "deep_resnet",
        [helper.make_tensor_value_info("x", elem, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", elem, [1, classes])],
        net.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def corner_tap_pair(channels: int = 4, layers: int = 2, seed: int = 0):
    """(model, candidate): 3x3 Conv+BN+ReLU stack on ``[N, C, H, W]`` with symbolic N, H, W (no
    padding on the first conv, so a 1x1 input is rejected only by shape, padding 1 after), and the
    same model with +1.0 added to the four corner taps of every kernel of the first conv."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.3
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1] * 4)
        )
        for p, v in (
            ("g", rng.uniform(0.5, 1.5, channels)),
            ("b", rng.standard_normal(channels) * 0.1),
            ("m", rng.standard_normal(channels) * 0.1),
            ("v", rng.uniform(0.5, 1.5, channels)),
        ):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{i}"))
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"],
                [f"n{i}"],
            )
        )
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"]))
        x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "corner_taps",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    for t in candidate.graph.initializer:
        if t.name == "w0":
            w = numpy_helper.to_array(t).copy()
            for a, b in ((0, 0), (0, 2), (2, 0), (2, 2)):
                w[:, :, a, b] += 1.0
            t.CopyFrom(numpy_helper.from_array(w, "w0"))
    return model, candidate


def convtranspose_square(channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Two ConvTranspose(C -> C, 3x3, stride 2)+BN+ReLU layers on a fixed [1, C, 6, 6] input: square
    weights, so a fold that scales axis 0 instead of axis 1 makes a well-formed wrong model."""
    net = _Net(seed, np.dtype(np.float32))
    x = "x"
    for _ in range(2):
        w = net.rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2.0 / (channels * 9))
        y = net.name("deconv")
        net.nodes.append(
            helper.make_node(
                "ConvTranspose",
                [x, net.init("w", w), net.init("b", net.rng.standard_normal(channels) * 0.1)],
                [y],
                kernel_shape=[3, 3],
                strides=[2, 2],
                name=y,
            )
        )
        bn = net.name("bn")
        net.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [
                    y,
                    net.init("g", net.rng.uniform(0.5, 1.5, channels)),
                    net.init("beta", net.rng.standard_normal(channels) * 0.2),
                    net.init("mean", net.rng.standard_normal(channels) * 0.2),
                    net.init("var", net.rng.uniform(0.5, 2.0, channels)),
                ],
                [bn],
                name=bn,
            )
        )
        x = net.name("relu")
        net.nodes.append(helper.make_node("Relu", [bn], [x], name=x))
    graph = helper.make_graph(
        net.nodes,
        "deconv_square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 6])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        net.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
