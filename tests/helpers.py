"""Helpers for the fold tests: models written as ONNX text, run unoptimised, checked three ways.

Imported by test modules (``from helpers import ...``); ``conftest.py`` holds fixtures only.

A fold test reads like a specification::

    model = model_from_text('''
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 5] X) => (float[1, 4, 5] Y) {
            c = Conv <pads = [1, 1]> (X, W)
            Y = BatchNormalization (c, scale, B, mean, var)
        }''', {"W": ..., **bn_params(4)})
    assert_folds(model, 1)

``assert_folds`` checks the structure (BN count drops, the producers' weights changed), numerical
equivalence (ONNX Runtime with graph optimizations disabled: at higher levels ORT fuses Conv+BN
itself and would hide a wrong fold) and ``onnx.checker`` on the output. ``assert_kept`` checks that a
BN is kept for the expected reason and that the model is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
from onnx import helper, numpy_helper

from bnfold.api import FoldResult
from bnfold.api import fold as bnfold_fold
from bnfold.report import SkipReason

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: (rtol, atol) per output dtype. atol is relative to the output's scale: max(1, max |reference|).
TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float16): (1e-2, 5e-3),
    np.dtype(ml_dtypes.bfloat16): (3e-2, 2e-2),
}

Runner = Callable[[onnx.ModelProto, Mapping[str, np.ndarray]], list]


# --------------------------------------------------------------------------------------- building
def model_from_text(
    text: str, initializers: Mapping[str, np.ndarray] | None = None, ir_version: int | None = None
) -> onnx.ModelProto:
    """Parse ONNX text syntax and attach ``initializers`` (numpy arrays, by name).

    ``ir_version`` overrides the header's. Below IR 4 every initializer must also be a graph input;
    those not already declared in the text are appended to the inputs.
    """
    model = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    if ir_version is not None:
        model.ir_version = ir_version
    if model.ir_version < 4:
        declared = {i.name for i in model.graph.input}
        for init in model.graph.initializer:
            if init.name not in declared:
                model.graph.input.append(
                    helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                )
    return model


def bn_params(
    channels: int, dtype=np.float32, *, seed: int = 0, prefix: str = "", shape=None
) -> dict[str, np.ndarray]:
    """Non-trivial BN parameters ``{prefix}scale, B, mean, var``: γ has both signs, σ² in [0.1, 2]."""
    rng = np.random.default_rng(seed)
    shape = (channels,) if shape is None else tuple(shape)
    gamma = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    gamma.reshape(-1)[0] = -abs(gamma.reshape(-1)[0])  # at least one negative γ
    params = {
        "scale": gamma,
        "B": rng.standard_normal(shape),
        "mean": rng.standard_normal(shape),
        "var": rng.uniform(0.1, 2.0, shape),
    }
    return {prefix + k: v.astype(dtype) for k, v in params.items()}


def randn(*shape: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------------------- running
def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (what a caller must feed)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal values for every real input; symbolic dimensions become 2."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in real_inputs(model):
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        dtype = _np_dtype(tt.elem_type)
        if dtype == np.bool_:
            feeds[vi.name] = np.array(True)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run on ONNX Runtime's CPU provider with every graph optimization disabled."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, dict(feeds))


def run_reference(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """onnx's Python reference evaluator, for kernels ORT's CPU provider lacks (float64 Conv, BN-6)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, dict(feeds))


# --------------------------------------------------------------------------------------- inspecting
def count_op(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def const_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant``/``Identity``-of-constant outputs of the main graph, by name."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def unused_initializers(model: onnx.ModelProto) -> set[str]:
    used = {name for node in model.graph.node for name in node.input}
    for node in model.graph.node:  # outer-scope references from subgraphs
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used.update(name for n in g.node for name in n.input)
    used.update(o.name for o in model.graph.output)
    return {i.name for i in model.graph.initializer} - used


def _bn_count(nodes) -> int:
    """BatchNormalization nodes among ``nodes`` and in their subgraphs."""
    n = 0
    for node in nodes:
        n += node.op_type == "BatchNormalization"
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                n += _bn_count(g.node)
    return n


def node_signature(graph: onnx.GraphProto) -> list[tuple]:
    def attr(a: onnx.AttributeProto):
        if a.type == onnx.AttributeProto.GRAPH:
            return (a.name, tuple(node_signature(a.g)))
        return a.SerializeToString()

    return sorted(
        (n.op_type, tuple(n.input), tuple(n.output), tuple(attr(a) for a in n.attribute))
        for n in graph.node
    )


def fold(model: onnx.ModelProto) -> FoldResult:
    """``bnfold.fold`` on a ModelProto (without its own verification); checks invariants of any run:
    the input proto is not modified, and every BatchNormalization gets exactly one decision."""
    before = model.SerializeToString(deterministic=True)
    result = bnfold_fold(model, verify=False)
    assert model.SerializeToString(deterministic=True) == before, (
        "the input ModelProto was modified"
    )
    assert isinstance(result.model, onnx.ModelProto)
    nodes = [d for d in result.decisions if d.source == "node"]  # not lowered Mul/Add chains
    assert len(nodes) == _bn_count(model.graph.node) + sum(
        _bn_count(f.node) for f in model.functions
    )
    assert len({d.name for d in result.decisions}) == len(result.decisions)
    return result


def assert_close(
    got: Sequence[np.ndarray], want: Sequence[np.ndarray], rtol=None, atol=None
) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        r, a = TOLERANCES.get(np.dtype(w.dtype), (1e-4, 1e-5))
        r = r if rtol is None else rtol
        a = a if atol is None else atol
        w64 = np.asarray(w, dtype=np.float64)
        scale = max(1.0, float(np.max(np.abs(w64)))) if w64.size else 1.0
        np.testing.assert_allclose(np.asarray(g, dtype=np.float64), w64, rtol=r, atol=a * scale)


# --------------------------------------------------------------------------------------- asserting
def assert_folds(
    model: onnx.ModelProto,
    n_folded: int,
    *,
    run: Runner | None = run_ort,
    feeds: Mapping[str, np.ndarray] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> FoldResult:
    """Fold ``model`` and check that exactly ``n_folded`` BNs were folded, three ways:

    1. structure: the BN count drops by ``n_folded``; each producer folded into has a new weight
       (a different value, as an initializer); no initializer is left unused;
    2. numerics: original and folded agree under ``run`` (ORT, optimizations disabled) on seeded
       random inputs, with the dtype's tolerance (``run=None`` skips this; the caller checks);
    3. ``onnx.checker.check_model(folded, full_check=True)``.
    """
    onnx.checker.check_model(model, full_check=True)
    result = fold(model)
    folded = result.model
    decisions = [d for d in result.decisions if d.folded]
    assert len(decisions) == n_folded, [(d.name, d.reason, d.detail) for d in result.decisions]
    for d in decisions:
        assert d.target_op in PRODUCERS and d.detail and d.direction == "backward"

    # 1. structure
    assert (
        count_op(folded, "BatchNormalization") == count_op(model, "BatchNormalization") - n_folded
    )
    old_p = [n for n in model.graph.node if n.op_type in PRODUCERS]
    new_p = [n for n in folded.graph.node if n.op_type in PRODUCERS]
    assert [n.op_type for n in old_p] == [n.op_type for n in new_p]
    old_c, new_c = const_values(model), const_values(folded)
    new_inits = {i.name for i in folded.graph.initializer}
    changed = set()
    for old, new in zip(old_p, new_p, strict=True):
        # A folded weight takes back its original name once the original is gone, so compare values.
        old_inits = {i.name for i in model.graph.initializer}
        same_name = old.input[1] == new.input[1]
        if (
            same_name
            and (old.input[1] in old_inits) == (new.input[1] in new_inits)
            and (
                old.input[1] not in old_c
                or np.array_equal(old_c[old.input[1]], new_c.get(new.input[1]))
            )
        ):
            continue
        assert new.input[1] in new_inits, f"folded weight {new.input[1]} is not an initializer"
        if old.input[1] in old_c:
            assert not np.array_equal(old_c[old.input[1]], new_c[new.input[1]])
        changed.add(new.op_type)
    assert changed == {d.target_op for d in decisions}
    assert not unused_initializers(folded), unused_initializers(folded)

    # 2. numerics
    if run is not None:
        feeds = random_feeds(model) if feeds is None else feeds
        assert_close(run(folded, feeds), run(model, feeds), rtol=rtol, atol=atol)

    # 3. checker
    onnx.checker.check_model(folded, full_check=True)
    return result


def assert_kept(
    model: onnx.ModelProto,
    reason: SkipReason,
    *,
    run: Runner | None = run_ort,
    check: bool = True,
) -> FoldResult:
    """Fold ``model`` and check that nothing was folded, a BN was kept for ``reason`` with a detail,
    and the model is unchanged: the same nodes and initializer values and, under ``run``, the same
    outputs. ``check=False`` skips ``onnx.checker`` for inputs that are themselves invalid."""
    result = fold(model)
    kept = result.report.kept
    assert result.decisions and len(kept) == len(result.decisions), result.decisions
    assert reason in {d.reason for d in kept}, [(d.reason, d.detail) for d in kept]
    for d in kept:
        assert isinstance(d.reason, SkipReason) and d.detail.strip()
    folded = result.model
    assert node_signature(folded.graph) == node_signature(model.graph)
    old_c, new_c = const_values(model), const_values(folded)
    assert old_c.keys() == new_c.keys()
    for name, value in old_c.items():
        np.testing.assert_array_equal(new_c[name], value)
    if run is not None:
        feeds = random_feeds(model)
        for got, want in zip(run(folded, feeds), run(model, feeds), strict=True):
            np.testing.assert_array_equal(got, want)
    if check:
        onnx.checker.check_model(folded, full_check=True)
    return result


def round_exact(x: np.ndarray, dtype) -> np.ndarray:
    """float64 → ``dtype`` (float16, bfloat16, float32) correctly rounded: nearest, ties to even,
    decided by exact comparison with the neighbouring values. Independent of any library's cast."""
    dtype = np.dtype(dtype)
    uint = {2: np.uint16, 4: np.uint32}[dtype.itemsize]
    x = np.asarray(x, dtype=np.float64)
    approx = x.astype(np.float32).astype(dtype)  # at most one ulp away from the answer
    bits = approx.view(uint).astype(np.int64)
    best, best_err = approx.copy(), np.full(x.shape, np.inf)
    for step in (0, -1, 1):
        cand_bits = (bits + step) & (2 ** (8 * dtype.itemsize) - 1)
        cand = cand_bits.astype(uint).view(dtype)
        c64 = cand.astype(np.float64)
        with np.errstate(invalid="ignore"):
            err = np.abs(c64 - x)  # exact or monotone: the candidates are within an ulp of x
        better = np.isfinite(c64) & ((err < best_err) | ((err == best_err) & (cand_bits % 2 == 0)))
        best = np.where(better, cand, best)
        best_err = np.where(better, err, best_err)
    return best


def lit(array: np.ndarray) -> str:
    """An ONNX text tensor literal, e.g. ``float[2] {1.5, -2}``, for ``Constant <value = ...>``."""
    array = np.asarray(array)
    type_name = helper.tensor_dtype_to_string(helper.np_dtype_to_tensor_dtype(array.dtype))
    type_name = type_name.removeprefix("TensorProto.").lower()
    dims = ",".join(str(d) for d in array.shape)
    values = ", ".join(
        repr(float(v)) if array.dtype.kind == "f" else str(int(v)) for v in array.reshape(-1)
    )
    return f"{type_name}[{dims}] {{{values}}}"


def write_unfoldable_model(path) -> None:
    """X → Conv → Relu → BatchNormalization → Relu → Y: the BN has nothing to fold into on either
    side (Relu does not commute with a per-channel affine map), so bnfold keeps it."""
    rng = np.random.default_rng(7)
    inits = {
        "W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "B": rng.standard_normal(4).astype(np.float32),
        "mean": rng.standard_normal(4).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
    }
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,8,8] X) => (float[N,4,8,8] Y) {
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            r = Relu (c)
            b = BatchNormalization (r, scale, B, mean, var)
            Y = Relu (b)
        }""",
        inits,
    )
    onnx.save(model, str(path))
