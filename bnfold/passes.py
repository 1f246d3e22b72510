"""The BatchNormalization folding pass.

For every ``BatchNormalization`` node the pass decides *fold or keep, and why*; a non-match is data
(a :class:`~bnfold.report.BNDecision` with a :class:`~bnfold.report.SkipReason`), never an exception.
The formulas live in :mod:`bnfold.numerics`; this module only matches graph patterns and rewires.

Folded weights are :class:`FoldedTensor` objects: lazy tensors that compute ``W · s`` from the
(memory-mapped) original only when they are written, one at a time, so folding a model with gigabytes
of external weights never holds all of them in memory.
"""

from __future__ import annotations

__all__ = ["BatchNormFoldPass", "FoldedTensor"]

import logging
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from . import numerics
from .numerics import FoldRefused
from .report import BNDecision, SkipReason

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {
    ir.DataType.FLOAT: np.dtype(np.float32),
    ir.DataType.DOUBLE: np.dtype(np.float64),
    ir.DataType.FLOAT16: np.dtype(np.float16),
    ir.DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
_CHUNK_BYTES = 64 << 20  # read weights in chunks of this size when scanning them


class _Keep(Exception):
    """Internal control flow: the BN is kept for ``reason``."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class FoldedTensor(ir.LazyTensor):
    """A folded weight: ``round(compute64())`` evaluated only when its bytes are needed.

    ``compute64`` returns the float64 result before rounding, so a second fold into the same weight
    (Conv → BN → BN) starts from unrounded values.
    """

    __slots__ = ("compute64",)

    def __init__(
        self, compute64: Callable[[], np.ndarray], dtype: ir.DataType, shape: tuple[int, ...], name: str
    ) -> None:
        np_dtype = _FLOAT_DTYPES[dtype]

        def func() -> ir.Tensor:
            return ir.Tensor(numerics.round_to(compute64(), np_dtype, name), dtype=dtype, name=name)

        super().__init__(func, dtype=dtype, shape=ir.Shape(shape), name=name)
        self.compute64 = compute64


@dataclass
class _Const:
    """A constant input: dtype/shape known up front, data loaded on demand."""

    dtype: ir.DataType
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    load64: Callable[[], np.ndarray]
    release: Callable[[], None] = lambda: None


def _releaser(tensor: ir.TensorProtocol) -> Callable[[], None]:
    """Unmap an external tensor once its data has been read, so RSS does not grow with the model."""

    def release() -> None:
        if isinstance(tensor, ir.ExternalTensor):
            try:
                tensor.release()
            except BufferError:  # a numpy view still refers to the map; it goes with the view
                pass

    return release


def _load64_then_release(c: _Const) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            return c.load64()
        finally:
            c.release()

    return load


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    if a is None:
        return default
    return a.value


def _scan_channel_absmax(load: Callable[[], np.ndarray], axis: int, channels: int) -> np.ndarray:
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


class BatchNormFoldPass(ir.passes.InPlacePass):
    """Fold inference-mode BatchNormalization into the node that produces its input.

    Handles, in the main graph:

    1. ``Conv`` (1-D/2-D/3-D, any groups, with or without bias; a missing bias is created).
    2. ``ConvTranspose`` (any rank, groups > 1, Cin ≠ Cout, with or without bias).
    3. ``Gemm`` with constant B (and C, when present): transA/transB, alpha, beta, C of shape [N],
       [1, N] or [M, N]. beta becomes 1 and C absorbs it.
    4. ``MatMul`` with a constant [K, N] weight and a 2-D input, optionally followed by ``Add`` of a
       constant bias of shape [N] or [1, N]; without one, an Add of the shift is created.

    Constants may be initializers, ``Constant`` nodes, ``ConstantOfShape`` of a constant shape, or an
    ``Identity`` of those. In IR < 4 models (where every initializer is also a graph input) initializers
    are constants; in IR ≥ 4 an initializer that is also a graph input may be overridden by the caller,
    so BNs that depend on one are kept.

    Everything else is kept with a :class:`SkipReason`: see ``decisions`` after the pass has run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.decisions: list[BNDecision] = []

    # ------------------------------------------------------------------ driver
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.decisions = []
        self._model = model
        self._graph = model.graph
        self._ir_version = model.ir_version
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self._names = self._all_names(model)
        self._dead_candidates: list[ir.Value] = []
        self._replaced: list[tuple[ir.Value, ir.Value]] = []  # (new initializer, value it replaced)
        modified = False

        main_nodes = list(model.graph)
        main_set = set(main_nodes)
        owners = _subgraph_owners(model.graph)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if not _is_bn(node) or node in main_set:
                continue
            owner = owners.get(id(node.graph))
            self.decisions.append(self._kept_decision(node, SkipReason.IN_SUBGRAPH, "inside a subgraph of "
                                                      f"{owner.op_type + ' ' if owner else ''}{_node_label(owner)}",
                                                      graph="subgraph"))
        for fn in model.functions.values():
            for node in ir.traversal.RecursiveGraphIterator(fn):
                if _is_bn(node):
                    self.decisions.append(self._kept_decision(
                        node, SkipReason.IN_SUBGRAPH, f"inside function {fn.domain}::{fn.name}",
                        graph=f"function {fn.name}"))

        subgraph_decisions = self.decisions
        self.decisions = []
        for node in main_nodes:
            if not _is_bn(node):
                continue
            try:
                decision = self._try_fold(node)
                modified = True
            except _Keep as keep:
                decision = self._kept_decision(node, keep.reason, keep.detail)
            except FoldRefused as refused:
                decision = self._kept_decision(node, SkipReason(refused.reason), refused.detail)
            self.decisions.append(decision)
            logger.debug("%s: %s %s", decision.name, decision.status, decision.detail)
        self.decisions.extend(subgraph_decisions)
        self._remove_dead()
        self._restore_names()
        return ir.passes.PassResult(model, modified=modified)

    def _kept_decision(self, node: ir.Node, reason: SkipReason, detail: str, graph: str = "main") -> BNDecision:
        return BNDecision(name=_node_label(node), folded=False, reason=reason, detail=detail, graph=graph)

    # ------------------------------------------------------------------ BN parameters
    def _try_fold(self, bn: ir.Node) -> BNDecision:
        s, t = self._bn_affine(bn)
        x = bn.inputs[0]
        producer = x.producer() if x is not None else None
        if producer is None:
            raise _Keep(SkipReason.NO_PRODUCER, f"input {x.name if x else '?'} is not produced by a node")
        op = producer.op_type if producer.domain in ("", "ai.onnx") else f"{producer.domain}::{producer.op_type}"
        handler = {
            "Conv": self._fold_conv,
            "ConvTranspose": self._fold_conv,
            "Gemm": self._fold_gemm,
            "MatMul": self._fold_matmul,
            "Add": self._fold_matmul_add,
        }.get(op)
        if handler is None:
            raise _Keep(SkipReason.UNSUPPORTED_PRODUCER, f"input comes from {op} {_node_label(producer)}")
        if x.is_graph_output() or len(x.uses()) != 1:
            users = sorted({_node_label(u.node) for u in x.uses() if u.node is not bn})
            where = ("a graph output" if x.is_graph_output() else "") + (
                (" and " if x.is_graph_output() and users else "") + ("also used by " + ", ".join(users[:3]) if users else ""))
            raise _Keep(SkipReason.PRODUCER_OUTPUT_SHARED, f"{producer.op_type} output {x.name} is {where}")
        target, how, new_out = handler(producer, s, t)
        self._bypass(bn, new_out)
        return BNDecision(
            name=_node_label(bn), folded=True, direction="backward", target=_node_label(target),
            target_op=target.op_type, detail=how,
        )

    def _bn_affine(self, bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
        if len(bn.inputs) < 5 or any(v is None for v in bn.inputs[:5]):
            raise _Keep(SkipReason.INVALID_PARAMS, "BatchNormalization needs 5 inputs")
        if self._opset >= 14 and _attr(bn, "training_mode", 0):
            raise _Keep(SkipReason.TRAINING_MODE, "training_mode=1")
        if self._opset < 7 and not _attr(bn, "is_test", 0):
            raise _Keep(SkipReason.TRAINING_MODE, "is_test=0 (opset < 7), so it runs in training mode")
        extra = [o for o in bn.outputs[1:] if o is not None and o.name]
        used = [o for o in extra if o.uses() or o.is_graph_output()]
        if used:
            raise _Keep(SkipReason.STATS_OUTPUTS_USED, "statistics outputs used: " + ", ".join(o.name for o in used))
        if extra and self._opset < 14:
            # ONNX Runtime runs a pre-14 BN that declares statistics outputs in training mode.
            raise _Keep(SkipReason.TRAINING_MODE, f"declares {len(extra)} statistics output(s), so it runs in training mode")
        epsilon = float(_attr(bn, "epsilon", 1e-5))
        names = ("scale", "B", "mean", "var")
        params = []
        for name, value in zip(names, bn.inputs[1:5], strict=True):
            c = self._const(value, what=f"BN {name}", weight=False)
            if c.dtype not in _FLOAT_DTYPES:
                raise _Keep(SkipReason.UNSUPPORTED_DTYPE, f"BN {name} has dtype {c.dtype}")
            params.append(c.load64())
        channels = params[0].shape[0] if params[0].ndim else 1
        # spatial=0 (opset < 9) has per-element parameters; per_channel accepts them only when exact.
        vecs = [numerics.per_channel(p, channels, n) for p, n in zip(params, names, strict=True)]
        return numerics.bn_scale_shift(*vecs, epsilon)

    # ------------------------------------------------------------------ constants
    def _const(self, value: ir.Value | None, *, what: str, weight: bool) -> _Const:
        """Resolve ``value`` to a constant, or raise _Keep with the reason it is not one."""
        non_const = SkipReason.NON_CONSTANT_WEIGHT if weight else SkipReason.NON_CONSTANT_PARAMS
        overridable = SkipReason.OVERRIDABLE_WEIGHT if weight else SkipReason.OVERRIDABLE_PARAMS
        if value is None:
            raise _Keep(non_const, f"{what} is missing")
        seen = 0
        while True:
            seen += 1
            if value.is_graph_input():
                if value.is_initializer() and self._ir_version < 4:
                    pass  # IR < 4: initializers are listed as inputs, and are constants
                elif value.is_initializer():
                    raise _Keep(overridable, f"{what} {value.name} is an initializer that is also a graph input")
                else:
                    raise _Keep(non_const, f"{what} {value.name} is a graph input")
            if value.const_value is not None:
                tensor = value.const_value
                if isinstance(tensor, FoldedTensor):
                    return _Const(tensor.dtype, tuple(tensor.shape.numpy()), tensor.numpy, tensor.compute64)
                return _Const(tensor.dtype, tuple(tensor.shape.numpy()), tensor.numpy,
                              lambda t=tensor: np.asarray(t.numpy(), dtype=np.float64), _releaser(tensor))
            producer = value.producer()
            if producer is None or producer.domain not in ("", "ai.onnx"):
                raise _Keep(non_const, f"{what} {value.name} is not a constant")
            if producer.op_type == "Identity" and seen < 64:
                value = producer.inputs[0]
                continue
            if producer.op_type == "Constant":
                tensor = _constant_tensor(producer)
                if tensor is None:
                    raise _Keep(non_const, f"{what} {value.name} is a Constant this tool cannot read")
                return _Const(tensor.dtype, tuple(tensor.shape.numpy()), tensor.numpy,
                              lambda t=tensor: np.asarray(t.numpy(), dtype=np.float64))
            if producer.op_type == "ConstantOfShape":
                shape_c = self._const(producer.inputs[0], what=f"shape of {what}", weight=weight)
                shape = tuple(int(d) for d in np.asarray(shape_c.load()).reshape(-1))
                fill = _attr(producer, "value", None)
                if fill is None:
                    fill_arr = np.zeros(1, dtype=np.float32)
                    dtype = ir.DataType.FLOAT
                else:
                    fill_arr = np.asarray(fill.numpy()).reshape(-1)
                    dtype = fill.dtype
                if any(d < 0 for d in shape):
                    raise _Keep(SkipReason.INVALID_PARAMS, f"{what}: negative dimension in {list(shape)}")
                return _Const(dtype, shape, lambda f=fill_arr, s=shape: np.full(s, f[0], dtype=f.dtype),
                              lambda f=fill_arr, s=shape: np.full(s, np.float64(f[0])))
            raise _Keep(non_const, f"{what} {value.name} comes from {producer.op_type} {_node_label(producer)}")

    def _weight(self, value: ir.Value | None, what: str) -> _Const:
        c = self._const(value, what=what, weight=True)
        if c.dtype not in _FLOAT_DTYPES:
            raise _Keep(SkipReason.UNSUPPORTED_DTYPE, f"{what} has dtype {c.dtype}")
        return c

    # ------------------------------------------------------------------ targets
    def _fold_conv(self, node: ir.Node, s: np.ndarray, t: np.ndarray) -> tuple[ir.Node, str, ir.Value]:
        is_t = node.op_type == "ConvTranspose"
        w = self._weight(node.inputs[1] if len(node.inputs) > 1 else None, f"{node.op_type} weight")
        if len(w.shape) < 3:
            raise _Keep(SkipReason.SHAPE_MISMATCH, f"{node.op_type} weight has rank {len(w.shape)}")
        group = int(_attr(node, "group", 1))
        if is_t:
            if group < 1 or w.shape[0] % group:
                raise FoldRefused("shape_mismatch", f"weight {list(w.shape)} does not fit group={group}")
            cout = w.shape[1] * group
            axis_desc = f"output channels (axis 1 of [Cin, Cout/g, k...], group={group})"
        else:
            cout = w.shape[0]
            axis_desc = "axis 0"
        if s.shape[0] != cout:
            raise FoldRefused("shape_mismatch", f"BN has {s.shape[0]} channels, {node.op_type} produces {cout}")
        bias_v = node.inputs[2] if len(node.inputs) > 2 else None
        b = self._weight(bias_v, f"{node.op_type} bias") if bias_v is not None else None
        np_dtype = _FLOAT_DTYPES[w.dtype]
        # Exact overflow check before committing: max|W'[o]| = max|W[o]| · |s[o]|.
        if np_dtype != np.float64:
            absmax = self._conv_t_absmax(w, group) if is_t else _scan_channel_absmax(w.load, 0, cout)
            w.release()
            self._check_range(absmax * np.abs(s), np_dtype, f"{node.op_type} weight")
        bias64 = numerics.fold_bias(b.load64() if b is not None else None, s, t)
        bias_dtype = b.dtype if b is not None else w.dtype
        bias_arr = numerics.round_to(bias64, _FLOAT_DTYPES[bias_dtype], f"{node.op_type} bias")
        if is_t:
            folded = self._folded(w, lambda a: numerics.fold_conv_transpose(a, s, group), node.inputs[1])
        else:
            folded = self._folded(w, lambda a: numerics.fold_conv(a, s), node.inputs[1])
        self._set_input(node, 1, folded)
        self._set_input(node, 2, self._eager(bias_arr, bias_dtype, bias64, (bias_v.name if bias_v is not None else None) or f"{node.name or 'conv'}_bias"))
        created = "bias created" if b is None else "bias updated"
        return node, f"weight scaled along {axis_desc}; {created}", node.outputs[0]

    def _conv_t_absmax(self, w: _Const, group: int) -> np.ndarray:
        arr = w.load()
        cin_g, cout_g = arr.shape[0] // group, arr.shape[1]
        out = np.zeros(cout_g * group)
        for gi in range(group):
            out[gi * cout_g : (gi + 1) * cout_g] = _scan_channel_absmax(
                lambda gi=gi: arr[gi * cin_g : (gi + 1) * cin_g], 1, cout_g)
        return out

    def _fold_gemm(self, node: ir.Node, s: np.ndarray, t: np.ndarray) -> tuple[ir.Node, str, ir.Value]:
        if len(node.inputs) < 2:
            raise _Keep(SkipReason.INVALID_PARAMS, "Gemm needs 2 inputs")
        trans_b = bool(_attr(node, "transB", 0))
        alpha = float(_attr(node, "alpha", 1.0))
        beta = float(_attr(node, "beta", 1.0))
        bw = self._weight(node.inputs[1], "Gemm B")
        c_v = node.inputs[2] if len(node.inputs) > 2 else None
        c = self._weight(c_v, "Gemm C") if c_v is not None else None
        if len(bw.shape) != 2:
            raise FoldRefused("shape_mismatch", f"Gemm B has shape {list(bw.shape)}")
        n = bw.shape[0] if trans_b else bw.shape[1]
        if s.shape[0] != n:
            raise FoldRefused("shape_mismatch", f"BN has {s.shape[0]} channels, Gemm produces N={n}")
        np_dtype = _FLOAT_DTYPES[bw.dtype]
        if np_dtype != np.float64:
            absmax = _scan_channel_absmax(bw.load, 0 if trans_b else 1, n)
            bw.release()
            self._check_range(absmax * np.abs(s), np_dtype, "Gemm B")
        c64 = numerics.fold_gemm_c(c.load64() if c else None, s, t, beta=beta)
        c_dtype = c.dtype if c is not None else bw.dtype
        c_arr = numerics.round_to(c64, _FLOAT_DTYPES[c_dtype], "Gemm C")
        self._set_input(node, 1, self._folded(bw, lambda a: numerics.fold_gemm_b(a, s, trans_b=trans_b), node.inputs[1]))
        self._set_input(node, 2, self._eager(c_arr, c_dtype, c64, (c_v.name if c_v is not None else None) or f"{node.name or 'gemm'}_C"))
        how = f"B scaled along N ({'rows, transB=1' if trans_b else 'columns, transB=0'}); "
        how += ("C created" if c is None else "C updated") + (f", beta {beta:g} → 1" if beta != 1.0 and c is not None else "")
        if beta != 1.0:
            node.attributes["beta"] = ir.Attr("beta", ir.AttributeType.FLOAT, 1.0)
        if alpha != 1.0:
            how += f"; alpha {alpha:g} kept"
        return node, how, node.outputs[0]

    def _matmul_weight(self, mm: ir.Node, s: np.ndarray) -> _Const:
        if len(mm.inputs) != 2:
            raise _Keep(SkipReason.INVALID_PARAMS, "MatMul needs 2 inputs")
        a, b = mm.inputs
        try:
            w = self._weight(b, "MatMul weight")
        except _Keep as keep:
            if keep.reason in (SkipReason.NON_CONSTANT_WEIGHT,) and a is not None and _is_constish(a):
                raise _Keep(SkipReason.UNSUPPORTED_LAYOUT, "MatMul's constant is its first input; the BN channel axis is not its output-feature axis") from None
            raise
        if len(w.shape) != 2:
            raise _Keep(SkipReason.UNSUPPORTED_LAYOUT, f"MatMul weight has shape {list(w.shape)}, expected [K, N]")
        rank = _rank(mm.outputs[0]) or (_rank(a) if a is not None else None)
        if rank is None:
            raise _Keep(SkipReason.UNSUPPORTED_LAYOUT, "rank of the MatMul output is unknown; the BN channel axis (1) must be its last axis")
        if rank != 2:
            raise _Keep(SkipReason.UNSUPPORTED_LAYOUT, f"MatMul output has rank {rank}; BN normalises axis 1, the features are on axis {rank - 1}")
        if s.shape[0] != w.shape[1]:
            raise FoldRefused("shape_mismatch", f"BN has {s.shape[0]} channels, MatMul produces N={w.shape[1]}")
        np_dtype = _FLOAT_DTYPES[w.dtype]
        if np_dtype != np.float64:
            absmax = _scan_channel_absmax(w.load, 1, w.shape[1])
            w.release()
            self._check_range(absmax * np.abs(s), np_dtype, "MatMul weight")
        return w

    def _fold_matmul(self, mm: ir.Node, s: np.ndarray, t: np.ndarray) -> tuple[ir.Node, str, ir.Value]:
        w = self._matmul_weight(mm, s)
        t_arr = numerics.round_to(t, _FLOAT_DTYPES[w.dtype], "MatMul bias")
        self._set_input(mm, 1, self._folded(w, lambda a: numerics.fold_matmul(a, s), mm.inputs[1]))
        if not np.any(t_arr):
            return mm, "weight columns scaled; shift is zero, no bias added", mm.outputs[0]
        bias = self._new_initializer(self._eager(t_arr, w.dtype, t, f"{mm.name or 'matmul'}_bias"))
        out = mm.outputs[0]
        add_out = ir.Value(name=self._fresh(f"{out.name or 'matmul'}_biased"), type=out.type, shape=out.shape)
        add = ir.Node("", "Add", inputs=[out, bias], outputs=[add_out], name=self._fresh(f"{mm.name or 'matmul'}_bias_add"))
        # Redirect the MatMul's single user (the BN) to the Add before inserting it.
        for use in out.uses():
            if use.node is not add:
                use.node.replace_input_with(use.idx, add_out)
        mm.graph.insert_after(mm, add)
        return mm, "weight columns scaled; Add of the shift created", add_out

    def _fold_matmul_add(self, add: ir.Node, s: np.ndarray, t: np.ndarray) -> tuple[ir.Node, str, ir.Value]:
        if len(add.inputs) != 2:
            raise _Keep(SkipReason.UNSUPPORTED_PRODUCER, "input comes from Add")
        mm_idx = next((i for i, v in enumerate(add.inputs) if v is not None and v.producer() is not None
                       and v.producer().op_type == "MatMul" and v.producer().domain in ("", "ai.onnx")), None)
        if mm_idx is None:
            raise _Keep(SkipReason.UNSUPPORTED_PRODUCER, f"input comes from Add {_node_label(add)}, not MatMul + Add")
        mm_out = add.inputs[mm_idx]
        mm = mm_out.producer()
        if len(mm_out.uses()) != 1 or mm_out.is_graph_output():
            raise _Keep(SkipReason.PRODUCER_OUTPUT_SHARED, f"MatMul output {mm_out.name} is also used elsewhere")
        bias_v = add.inputs[1 - mm_idx]
        bias = self._weight(bias_v, "Add bias")
        w = self._matmul_weight(mm, s)
        n = w.shape[1]
        if bias.shape not in ((n,), (1, n)):
            raise _Keep(SkipReason.UNSUPPORTED_LAYOUT, f"Add bias has shape {list(bias.shape)}, expected [{n}] or [1, {n}]")
        b64 = numerics.fold_bias(bias.load64(), s, t)
        b_arr = numerics.round_to(b64, _FLOAT_DTYPES[bias.dtype], "Add bias")
        self._set_input(mm, 1, self._folded(w, lambda a: numerics.fold_matmul(a, s), mm.inputs[1]))
        self._set_input(add, 1 - mm_idx, self._eager(b_arr, bias.dtype, b64, bias_v.name or "bias"))
        return mm, "weight columns scaled; following Add bias updated", add.outputs[0]

    # ------------------------------------------------------------------ rewiring helpers
    def _check_range(self, values: np.ndarray, dtype: np.dtype, what: str) -> None:
        limit = float(ml_dtypes.finfo(dtype).max)
        if values.size and float(np.max(values)) > limit:
            raise FoldRefused("overflow", f"folded {what} would reach {float(np.max(values)):.3g}, beyond the {dtype} maximum {limit:.3g}")

    def _folded(self, c: _Const, formula: Callable[[np.ndarray], np.ndarray], old: ir.Value) -> FoldedTensor:
        """A lazy folded weight: ``formula`` applied to the float64 original when it is written."""
        load = _load64_then_release(c)
        return FoldedTensor(lambda: formula(load()), c.dtype, c.shape, self._fresh(old.name or "W"))

    def _eager(self, arr: np.ndarray, dtype: ir.DataType, arr64: np.ndarray, base: str) -> FoldedTensor:
        return FoldedTensor(lambda a=arr64: a, dtype, tuple(arr.shape), self._fresh(base))

    def _new_initializer(self, tensor: ir.TensorProtocol) -> ir.Value:
        """Register ``tensor`` as a new initializer of the main graph (and input, in IR < 4)."""
        value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self._graph.register_initializer(value)
        if self._ir_version < 4:
            self._graph.inputs.append(value)
        return value

    def _set_input(self, node: ir.Node, index: int, tensor: ir.TensorProtocol) -> None:
        """Give ``node`` a new private initializer at ``index``; the old input is freed if unused."""
        value = self._new_initializer(tensor)
        old = node.inputs[index] if index < len(node.inputs) else None
        if index < len(node.inputs):
            node.replace_input_with(index, value)
        else:
            # Extend optional inputs (e.g. create the bias of a Conv that has none).
            node.resize_inputs(index + 1)
            node.replace_input_with(index, value)
        if old is not None:
            self._dead_candidates.append(old)
            self._replaced.append((value, old))

    def _restore_names(self) -> None:
        """A folded weight takes back the name of the tensor it replaced once that one is gone, so
        tools that refer to weights by name (quantization overrides, diffs) still find them.
        Chains (a weight folded twice) go back to the first original."""
        replaced_by = {id(new): old for new, old in self._replaced}
        taken: set[str] = set()
        for new, _ in self._replaced:
            if not new.is_initializer() or new.graph is not self._graph:
                continue  # itself replaced by a later fold
            root = replaced_by[id(new)]
            while id(root) in replaced_by:
                root = replaced_by[id(root)]
            name, producer = root.name, root.producer()
            gone = (not root.uses() and not root.is_initializer() and not root.is_graph_input()
                    and not root.is_graph_output() and (producer is None or producer.graph is None))
            if not name or not gone or name in taken or name in self._graph.initializers:
                continue
            taken.add(name)
            self._graph.initializers.pop(new.name)
            new.name = name
            if new.const_value is not None:
                new.const_value.name = name
            self._graph.initializers[name] = new
        self._replaced = []

    def _bypass(self, bn: ir.Node, producer_out: ir.Value) -> None:
        """Remove ``bn`` and make its consumers (and graph outputs) read ``producer_out``."""
        y = bn.outputs[0]
        if y.is_graph_output():
            # Keep the graph output's name, type and shape: the producer's output takes them over.
            name = y.name
            y.name = self._fresh(f"{name}_bn_removed")
            producer_out.name = name
            producer_out.type = y.type
            producer_out.shape = y.shape
        y.replace_all_uses_with(producer_out, replace_graph_outputs=True)
        params = [v for v in bn.inputs[1:] if v is not None]
        bn.graph.remove(bn, safe=True)
        self._dead_candidates.extend(params)

    def _remove_dead(self) -> None:
        """Remove initializers and constant-producing nodes that the folds left without users."""
        graph = self._graph
        stack = list(self._dead_candidates)
        while stack:
            v = stack.pop()
            if v is None or v.uses() or v.is_graph_output():
                continue
            if v.is_initializer() and v.graph is graph:
                if v.is_graph_input():
                    if self._ir_version >= 4:
                        continue  # part of the caller's contract
                    graph.inputs.remove(v)
                graph.initializers.pop(v.name, None)
                continue
            producer = v.producer()
            if producer is not None and producer.graph is graph and producer.op_type in (
                "Constant", "ConstantOfShape", "Identity") and all(
                    not o.uses() and not o.is_graph_output() for o in producer.outputs):
                inputs = [i for i in producer.inputs if i is not None]
                graph.remove(producer, safe=True)
                stack.extend(inputs)
        self._dead_candidates = []

    def _fresh(self, base: str) -> str:
        name = base
        i = 0
        while name in self._names:
            i += 1
            name = f"{base}_bnfold{'' if i == 1 else i}"
        self._names.add(name)
        return name

    @staticmethod
    def _all_names(model: ir.Model) -> set[str]:
        names: set[str] = set()
        for graph in model.graphs():
            for v in list(graph.inputs) + list(graph.initializers.values()):
                if v.name:
                    names.add(v.name)
            for node in graph:
                if node.name:
                    names.add(node.name)
                for o in node.outputs:
                    if o.name:
                        names.add(o.name)
        return names


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor of a ``Constant`` node, read without modifying the node (unlike
    ``ir.convenience.get_const_tensor``, which renames the tensor: it may belong to the caller)."""
    if len(node.attributes) != 1:
        return None
    attr = next(iter(node.attributes.values()))
    if attr.is_ref():
        return None
    if attr.name == "value":
        return attr.as_tensor()
    if attr.name in ("value_float", "value_floats"):
        return ir.Tensor(np.array(attr.value, dtype=np.float32))
    if attr.name in ("value_int", "value_ints"):
        return ir.Tensor(np.array(attr.value, dtype=np.int64))
    return None


def _is_bn(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _node_label(node: ir.Node | None) -> str:
    if node is None:
        return "?"
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs and node.outputs[0] is not None else None
    return f"<{node.op_type} → {out}>"


def _subgraph_owners(graph: ir.Graph) -> dict[int, ir.Node]:
    """id(subgraph) -> the node whose attribute holds it, for every subgraph under ``graph``."""
    owners: dict[int, ir.Node] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                owners[id(attr.value)] = node
            elif attr.type == ir.AttributeType.GRAPHS:
                owners.update((id(g), node) for g in attr.value)
    return owners


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def _is_constish(value: ir.Value) -> bool:
    if value.const_value is not None:
        return True
    p = value.producer()
    return p is not None and p.op_type in ("Constant", "ConstantOfShape")
