"""PyTorch front end: fold BatchNorm in an ``nn.Module``, or export it to ONNX, fold and verify.

``torch`` is an optional extra (``pip install 'bnfold[torch]'``) and is imported only inside the
functions of this module, so ``import bnfold`` (and even ``import bnfold.torch``) never imports it.

Three entry points, each returning the same :class:`~bnfold.report.FoldReport` as the ONNX path::

    result = bnfold.torch.fold_module(model, (x,))        # ModuleFoldResult: .module, .report
    result = bnfold.torch.export(model, (x,), "m.onnx")   # FoldResult: folded, verified ONNX file
    result = bnfold.torch.fold_file("m.pt2", "m.onnx")    # the CLI's path: .pt2 / TorchScript / pickle

How ``fold_module`` finds "a BatchNorm that follows a Conv"
------------------------------------------------------------
By dataflow, not by module order. The forward of the (deep-copied) module is traced with torch.fx;
in the graph, a ``call_module`` of a BatchNorm whose only input is the output of a ``call_module``
of a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear, with that output used by nothing else, is a
fold candidate. torch.nn layers (and subclasses of BatchNorm/Conv/Linear) are leaves of the trace,
and so is any module with forward hooks, which is then traced on its own so that its hooks keep
seeing what they saw. Forward arguments that default to None are traced as None: the trace follows
the path ``model(x)`` takes.

When the whole forward cannot be traced (data-dependent control flow, ...), its children are
traced one by one, recursively. A BatchNorm called directly by the untraceable code is kept with
``not_traceable``. The untraceable code may also call layers inside the traced children directly,
so their BNs are folded only when ``example_inputs`` are given and the real call counts match the
traced ones (otherwise: ``not_traceable``, or ``module_reused`` when the counts differ). A
BatchNorm module that no traced graph calls is kept with ``not_called``.

How a fold is applied
---------------------
* **In place** (the module keeps its class and its state_dict keys, minus the BN's): when the
  producer and the BN are each called exactly once in all traced graphs (and, with
  ``example_inputs``, as often at run time) and no traced code reads the producer's weight or
  bias directly. The producer gets *new* Parameters (a weight shared with another module is never
  changed in place: the other module keeps the original), and the BN is replaced by
  ``nn.Identity`` wherever it appears in the module tree.
* **At the call site** (``rewrite=True``, the default): otherwise (a Conv called twice, once
  followed by the BN and once not; a BN shared by two Convs; a weight also read functionally),
  when the root's forward is traceable, its graph is rewritten so that this one call uses a
  folded private copy of the producer, and the result is that ``torch.fx.GraphModule`` (with the
  root's children, parameters and attributes). The other calls are untouched. With
  ``rewrite=False``, inside an untraceable root, or with hooks on the root, such BNs are kept with
  ``module_reused``.

The formulas are :mod:`bnfold.numerics` (float64 inside, one rounding to the parameter's dtype:
float16, bfloat16, float32, float64). A Linear weight is ``[out, in]``: its rows scale. A
Linear → BatchNorm1d pair folds only when the Linear's output is known to be 2-D ``[N, C]``
(from ``example_inputs``, or from the graph: a ``flatten``/``view`` to 2-D before it); on a
``[N, L, C]`` output BatchNorm1d normalises ``L``, not the Linear's features (``unknown_layout``
/ ``unsupported_layout``).

Limits: torch.fx sees one path through ``forward``: branches on Python values are taken as they
are when tracing. A Conv used without its BN only on a path the trace did not take is not seen.
Pass ``example_inputs``: bnfold then also counts the real calls and compares the folded module's
outputs with the original's (``report.verification``).
"""

from __future__ import annotations

__all__ = [
    "ModuleFoldResult",
    "NoRunningStatsError",
    "TorchSource",
    "TorchUnavailableError",
    "TrainingModeError",
    "UnfoldableModuleError",
    "export",
    "fold_file",
    "fold_module",
    "is_torch_file",
    "load_torch_file",
]

import copy
import functools
import inspect
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from . import numerics
from .errors import BnfoldError, InputNotFoundError, InvalidModelError, UsageError
from .report import BNDecision, FoldReport, SkipReason

if TYPE_CHECKING:  # pragma: no cover
    from .api import FoldResult
    from .compare import VerificationResult

logger = logging.getLogger(__name__)


# --- errors ----------------------------------------------------------------------------------------


class TorchUnavailableError(UsageError):
    """PyTorch is not installed (it is the optional ``torch`` extra)."""


class UnfoldableModuleError(BnfoldError):
    """The module as a whole cannot be folded (exit code 2, like every BnfoldError)."""


class TrainingModeError(UnfoldableModuleError):
    """The module, or one of its BatchNorms, is in training mode."""


class NoRunningStatsError(UnfoldableModuleError):
    """A BatchNorm has no running statistics (``track_running_stats=False``)."""


def _import_torch():  # noqa: ANN202 - returns the torch module
    try:
        import torch
    except ImportError:
        raise TorchUnavailableError(
            "PyTorch is not installed; install the extra: pip install 'bnfold[torch]'"
        ) from None
    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).strip()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- module classification -------------------------------------------------------------------------


def _is_bn(m: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm)


def _is_standard_bn(m: Any) -> bool:
    """A BatchNorm whose forward is torch's own (subclasses that only add attributes count)."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    return _is_bn(m) and type(m).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)


# (class, kind, spatial dims); subclasses count when they keep the forward and _conv_forward.
def _producer_table() -> list[tuple[type, str, int]]:
    from torch import nn

    return [
        (nn.Conv1d, "conv", 1),
        (nn.Conv2d, "conv", 2),
        (nn.Conv3d, "conv", 3),
        (nn.ConvTranspose1d, "conv_transpose", 1),
        (nn.ConvTranspose2d, "conv_transpose", 2),
        (nn.ConvTranspose3d, "conv_transpose", 3),
        (nn.Linear, "linear", 0),
    ]


def _producer_kind(m: Any) -> tuple[str, int] | None:
    """``(kind, spatial dims)`` for a module bnfold can fold into, else None."""
    for cls, kind, dims in _producer_table():
        if isinstance(m, cls):
            t = type(m)
            if t.forward is not cls.forward:
                return None
            if kind == "conv" and t._conv_forward is not cls._conv_forward:
                return None
            return kind, dims
    return None


def _looks_like_producer(m: Any) -> bool:
    return any(isinstance(m, cls) for cls, _, _ in _producer_table())


def _has_hooks(m: Any) -> bool:
    return bool(getattr(m, "_forward_hooks", None) or getattr(m, "_forward_pre_hooks", None))


def _is_torch_leaf(m: Any) -> bool:
    """What torch.fx treats as a leaf by default: torch.nn modules other than Sequential."""
    from torch import nn

    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        m, nn.Sequential
    )


@functools.lru_cache(maxsize=1)
def _tracer_class() -> type:
    torch = _import_torch()

    class _Tracer(torch.fx.Tracer):
        """torch.fx tracer whose leaves are torch.nn layers, BNs, Conv/Linear (and their
        subclasses) and modules with forward hooks."""

        def __init__(self, scope_root: Any) -> None:
            super().__init__()
            self.scope_root = scope_root

        def is_leaf_module(self, m: Any, module_qualified_name: str) -> bool:
            if m is self.scope_root:
                return False
            if _has_hooks(m) or _is_bn(m) or _looks_like_producer(m):
                return True
            return super().is_leaf_module(m, module_qualified_name)

    return _Tracer


# --- the state checks shared by fold_module and export -----------------------------------------------


def _exported_module_class() -> type | None:
    try:
        from torch.export._unlift import _StatefulGraphModule
    except ImportError:  # pragma: no cover - a torch without it
        return None
    return _StatefulGraphModule


def _is_exported(module: Any) -> bool:
    """An ``ExportedProgram`` or its ``.module()`` (whose ``training`` flag means nothing)."""
    torch = _import_torch()
    cls = _exported_module_class()
    return isinstance(module, torch.export.ExportedProgram) or (
        cls is not None and isinstance(module, cls)
    )


def _graph_runs_bn_in_training(graph: Any) -> bool:
    """Whether an aten-level graph (torch.export) normalises with batch statistics."""
    for node in graph.nodes:
        target = str(node.target)
        if node.op != "call_function" or "batch_norm" not in target:
            continue
        if "legit_functional" in target or target.endswith("_native_batch_norm_legit.default"):
            return True
        if "no_training" not in target and len(node.args) > 5 and node.args[5] is True:
            return True
    return False


def _check_module_state(module: Any) -> None:
    """Refuse a module in training mode, BNs without running statistics, and lazy parameters."""
    torch = _import_torch()
    if _is_exported(module):
        if _graph_runs_bn_in_training(module.graph):
            raise TrainingModeError(
                "the exported program runs BatchNorm in training mode (batch statistics), so there "
                "is nothing fixed to fold; export the model after model.eval()"
            )
        return
    named = list(module.named_modules())
    in_training = [name or "<root>" for name, m in named if m.training and (_is_bn(m) or not name)]
    if not in_training:  # a scripted module: no BN classes to recognise, check every submodule
        if isinstance(module, torch.jit.ScriptModule):
            in_training = [name or "<root>" for name, m in named if m.training]
    if in_training:
        which = ", ".join(repr(n) for n in in_training[:5]) + (
            " ..." if len(in_training) > 5 else ""
        )
        raise TrainingModeError(
            f"the module is in training mode ({which}): its BatchNorms normalise with batch "
            "statistics there, so there is nothing fixed to fold; call model.eval() first"
        )
    no_stats = [
        name
        for name, m in named
        if _is_bn(m)
        and (not m.track_running_stats or m.running_mean is None or m.running_var is None)
    ]
    if no_stats:
        raise NoRunningStatsError(
            f"BatchNorm {', '.join(repr(n) for n in no_stats)} has no running statistics "
            "(track_running_stats=False): it normalises every batch with that batch's own "
            "statistics, even in eval mode, so it cannot be folded"
        )
    from torch.nn.parameter import is_lazy

    lazy = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if is_lazy(t)]
    if lazy:
        raise UsageError(
            f"the module has uninitialized lazy parameters ({', '.join(lazy[:3])}); run it once on "
            "an input before folding"
        )


# --- tensors <-> numpy ---------------------------------------------------------------------------------

_FLOAT_NP = {
    "torch.float16": np.dtype(np.float16),
    "torch.bfloat16": np.dtype(ml_dtypes.bfloat16),
    "torch.float32": np.dtype(np.float32),
    "torch.float64": np.dtype(np.float64),
}


def _to_numpy(t: Any) -> np.ndarray:
    """A CPU copy of a tensor as numpy; bfloat16 becomes an ml_dtypes.bfloat16 array."""
    torch = _import_torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _f64(t: Any) -> np.ndarray:
    torch = _import_torch()
    return t.detach().to("cpu", torch.float64).numpy()


def _from_f64(values: np.ndarray, like: Any, what: str) -> Any:
    """Round float64 ``values`` once to ``like``'s dtype (FoldRefused on overflow); same device."""
    torch = _import_torch()
    np_dtype = _FLOAT_NP[str(like.dtype)]
    rounded = numerics.round_to(values, np_dtype, what)
    if like.dtype == torch.bfloat16:
        # every bfloat16 value is exactly representable in float32: this conversion is exact
        out = torch.from_numpy(np.asarray(rounded, dtype=np.float32)).to(torch.bfloat16)
    else:
        out = torch.from_numpy(np.ascontiguousarray(rounded))
    return out.to(like.device)


def _flatten_outputs(value: Any, name: str = "output") -> list[tuple[str, Any]]:
    """Tensors of a forward's result (tensor, tuple/list, dict, nested), with readable names."""
    torch = _import_torch()
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            out += _flatten_outputs(v, f"{name}[{k!r}]")
        return out
    if isinstance(value, (tuple, list)):
        out = []
        for i, v in enumerate(value):
            out += _flatten_outputs(v, f"{name}[{i}]")
        return out
    return []


def _as_args(example_inputs: Any) -> tuple:
    torch = _import_torch()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise UsageError(
        f"example_inputs must be a tensor or a tuple of the forward's positional arguments, got "
        f"{type(example_inputs).__name__}"
    )


def _seeded_like(args: tuple, seed: int, batch: int | None = None) -> tuple:
    """``args`` with every floating tensor replaced by seeded standard-normal values of its shape
    (dimension 0 set to ``batch`` when given), dtype and device; other values are kept as given
    (integer tensors such as token ids keep their values, repeated along dimension 0 if resized)."""
    torch = _import_torch()
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            shape = list(a.shape)
            if batch is not None and shape:
                shape[0] = batch
            if a.is_floating_point():
                v = torch.randn(shape, generator=gen, dtype=torch.float64)
                out.append(v.to(dtype=a.dtype, device=a.device))
            elif batch is not None and a.dim() and a.shape[0] != batch:
                reps = math.ceil(batch / max(int(a.shape[0]), 1))
                out.append(a.repeat(reps, *([1] * (a.dim() - 1)))[:batch])
            else:
                out.append(a)
        else:
            out.append(a)
    return tuple(out)


# --- results ---------------------------------------------------------------------------------------


@dataclass
class ModuleFoldResult:
    """What :func:`fold_module` returns: the folded module (a new object; the input is untouched)
    and the report. Truthy when it passed (verification, if run, passed; under ``strict`` nothing
    was kept)."""

    module: Any
    report: FoldReport

    @property
    def decisions(self) -> list[BNDecision]:
        return self.report.decisions

    @property
    def verification(self) -> VerificationResult | None:
        return self.report.verification

    @property
    def passed(self) -> bool:
        return self.report.passed

    def __bool__(self) -> bool:
        return self.report.passed


# --- fold_module: discovery -----------------------------------------------------------------------


@dataclass
class _Scope:
    """A module traced on its own: its graph, or why it could not be traced."""

    module: Any
    path: str
    graph: Any = None  # torch.fx.Graph
    error: str | None = None
    rewritten: bool = False
    copies: dict[str, Any] = field(default_factory=dict)  # new submodule name -> folded copy
    opaque_caller: _Scope | None = None  # the nearest untraceable ancestor scope, if any


def _discover(root: Any, paths: dict[int, str]) -> list[_Scope]:
    """Trace ``root``; where that fails, its children (recursively). Hooked leaves get own scopes."""
    tracer_cls = _tracer_class()
    scopes: list[_Scope] = []
    queue: list[tuple[str, Any, _Scope | None]] = [("", root, None)]
    seen: set[int] = set()
    while queue:
        path, mod, opaque = queue.pop(0)
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if (
            _is_bn(mod)
            or _looks_like_producer(mod)
            or (mod is not root and _is_torch_leaf(mod) and not _has_hooks(mod))
        ):
            continue
        scope = _Scope(mod, path, opaque_caller=opaque)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scope.graph = tracer_cls(mod).trace(mod, concrete_args=_none_defaults(mod))
        except (
            Exception
        ) as exc:  # torch.fx raises many types: TraceError, TypeError, NotImplementedError...
            scope.error = f"{type(exc).__name__}: {_first_line(exc)}"
            logger.debug("cannot trace %s: %s", path or "<root>", scope.error)
        scopes.append(scope)
        if scope.graph is None:
            queue += [(_join(path, n), c, scope) for n, c in mod.named_children()]
            continue
        for node in scope.graph.nodes:
            if node.op == "call_module":
                sub = mod.get_submodule(node.target)
                if (
                    sub is not mod
                    and _has_hooks(sub)
                    and not _is_bn(sub)
                    and not _looks_like_producer(sub)
                ):
                    queue.append((paths.get(id(sub), _join(path, node.target)), sub, opaque))
    return scopes


def _none_defaults(module: Any) -> dict[str, None] | None:
    """Arguments of ``forward`` that default to None: traced as None (the path ``model(x)`` takes;
    a graph built from the trace asserts they are None), not as tensors, which would make
    ``if mask is not None`` take the branch that a plain call does not."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return {p.name: None for p in params if p.default is None} or None


# --- fold_module: static rank of a value (for Linear -> BatchNorm1d) ------------------------------------

_SAME_RANK_FUNCS = {
    "relu",
    "relu6",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "leaky_relu",
    "elu",
    "dropout",
    "hardswish",
    "hardsigmoid",
    "mish",
    "softplus",
    "contiguous",
    "clone",
    "float",
    "half",
    "to",
    "neg",
    "abs",
}


def _static_rank(node: Any, scope_module: Any, depth: int = 0) -> int | None:
    """The rank of ``node``'s value when the graph alone proves it (flatten/view to 2-D ...)."""
    from torch import nn
    from torch.fx import Node

    if depth > 64 or not isinstance(node, Node):
        return None
    if node.op == "call_module":
        m = scope_module.get_submodule(node.target)
        if isinstance(m, nn.Flatten):
            return 2 if m.start_dim == 1 and m.end_dim == -1 else None
        same = (
            nn.Linear,
            nn.BatchNorm1d,
            nn.ReLU,
            nn.ReLU6,
            nn.LeakyReLU,
            nn.GELU,
            nn.SiLU,
            nn.ELU,
            nn.Sigmoid,
            nn.Tanh,
            nn.Dropout,
            nn.Identity,
            nn.Hardswish,
            nn.Mish,
            nn.Softplus,
            nn.PReLU,
        )
        if isinstance(m, same) and node.args:
            return _static_rank(node.args[0], scope_module, depth + 1)
        return None
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return 2 if start == 1 and end == -1 else None
        if node.op == "call_method" and name in ("view", "reshape"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                return len(sizes[0])
            return len(sizes) if sizes else None
        if name in _SAME_RANK_FUNCS and node.args:
            return _static_rank(node.args[0], scope_module, depth + 1)
    return None


def _describe_node(node: Any, scope: _Scope, paths: dict[int, str]) -> str:
    from torch.fx import Node

    if not isinstance(node, Node):
        return f"the constant {node!r}"
    if node.op == "placeholder":
        return f"the forward argument {node.target!r}"
    if node.op == "get_attr":
        return f"the attribute {_join(scope.path, node.target)!r}"
    if node.op == "call_module":
        m = scope.module.get_submodule(node.target)
        return f"{type(m).__name__} {paths.get(id(m), _join(scope.path, node.target))!r}"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    return f"{getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}".lstrip(
        "."
    )


# --- fold_module: the fold itself ---------------------------------------------------------------------


@dataclass
class _Folded:
    weight: np.ndarray  # float64
    bias: np.ndarray  # float64
    created_bias: bool


def _compute_fold(
    prod: Any, kind: str, bn: Any, start: tuple[np.ndarray, np.ndarray | None] | None
) -> _Folded:
    """Folded (weight, bias) in float64; ``start`` is the float64 state of an earlier fold."""
    c = bn.num_features
    gamma = _f64(bn.weight) if bn.weight is not None else np.ones(c)
    beta = _f64(bn.bias) if bn.bias is not None else np.zeros(c)
    s, t = numerics.bn_scale_shift(
        gamma, beta, _f64(bn.running_mean), _f64(bn.running_var), float(bn.eps)
    )
    if start is not None:
        w, b = start
    else:
        w = _f64(prod.weight)
        b = _f64(prod.bias) if prod.bias is not None else None
    if kind == "conv":
        w2 = numerics.fold_conv(w, s)
    elif kind == "conv_transpose":
        w2 = numerics.fold_conv_transpose(w, s, int(prod.groups))
    else:
        w2 = numerics.fold_gemm_b(w, s, trans_b=True)  # Linear weight is [out, in]: rows scale
    return _Folded(w2, numerics.fold_bias(b, s, t), created_bias=b is None)


def _out_features(prod: Any, kind: str) -> int:
    return int(prod.out_features if kind == "linear" else prod.out_channels)


def _apply(prod: Any, folded: _Folded) -> None:
    """Give ``prod`` new Parameters (never writes into a tensor another module may share)."""
    from torch import nn

    w_old = prod.weight
    bias_like = prod.bias if prod.bias is not None else w_old
    new_w = _from_f64(folded.weight, w_old, "weight")
    new_b = _from_f64(folded.bias, bias_like, "bias")
    prod.weight = nn.Parameter(new_w, requires_grad=w_old.requires_grad)
    prod.bias = nn.Parameter(new_b, requires_grad=bias_like.requires_grad)


def _replace_everywhere(root: Any, old: Any, new: Any) -> None:
    for parent in root.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = new


def _count_layers(module: Any) -> int:
    from torch import nn

    return sum(
        1 for m in module.modules() if not list(m.children()) and not isinstance(m, nn.Identity)
    )


class _Run:
    """Counts the calls of BNs and producers, and records each BN call's input rank, in a real run."""

    def __init__(self, root: Any) -> None:
        self.calls: dict[int, int] = {}
        self.bn_ranks: dict[int, set[int]] = {}
        self._handles = []
        for m in root.modules():
            if _is_bn(m) or _looks_like_producer(m):
                self._handles.append(m.register_forward_pre_hook(self._hook))

    def _hook(self, m: Any, args: tuple) -> None:
        self.calls[id(m)] = self.calls.get(id(m), 0) + 1
        if _is_bn(m) and args and hasattr(args[0], "dim"):
            self.bn_ranks.setdefault(id(m), set()).add(int(args[0].dim()))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def fold_module(
    module: Any,
    example_inputs: Any = None,
    *,
    rewrite: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    strict: bool = False,
) -> ModuleFoldResult:
    """Fold every eval-mode BatchNorm that follows a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear.

    Args:
        module: an eval-mode ``torch.nn.Module``. It is deep-copied first and never modified.
        example_inputs: optional positional arguments of ``forward`` (a tensor or a tuple). When
            given, the original and the folded module run on seeded inputs of the same shapes and
            dtypes (floating tensors are replaced by seeded normal values; other arguments are
            used as given) and every output is compared (``report.verification``); the run also
            tells bnfold how often each layer is really called and the rank of each BN's input
            (needed to fold Linear → BatchNorm1d when the graph does not show it).
        rewrite: fold a BN whose producer is also used elsewhere (a Conv called twice...) into a
            private copy used at that call site only; the result is then the root's rewritten
            ``torch.fx.GraphModule`` (only a root whose forward torch.fx can trace is rewritten).
            When False such BNs are kept (``module_reused``) and the module keeps its class.
        atol, rtol: override the per-dtype tolerances of the verification.
        seed: seed of the verification inputs.
        strict: the result fails when any BatchNorm is kept.

    Returns:
        A :class:`ModuleFoldResult` (``.module``, ``.report``, ``.decisions``); one decision per
        BatchNorm call site (per module when it is not called in any traced graph).

    Raises:
        TrainingModeError: the module (or a BatchNorm in it) is in training mode.
        NoRunningStatsError: a BatchNorm was built with ``track_running_stats=False``.
        UsageError: not an eager ``nn.Module``, bad ``example_inputs``, or the module fails to run.
    """
    torch = _import_torch()
    from torch import nn

    if isinstance(module, torch.jit.ScriptModule):
        raise UsageError(
            "fold_module needs an eager nn.Module, not TorchScript; use bnfold.torch.export (or "
            "`bnfold fold model.pt`) to fold it through ONNX"
        )
    if _is_exported(module):
        raise UsageError(
            "an ExportedProgram holds no BatchNorm modules (they are aten ops now); fold it through "
            "ONNX: bnfold.torch.export(program, example_inputs, 'folded.onnx') or `bnfold fold model.pt2`"
        )
    if not isinstance(module, nn.Module):
        raise UsageError(f"fold_module takes a torch.nn.Module, got {type(module).__name__}")
    _check_module_state(module)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        work = copy.deepcopy(module)
    except Exception as exc:
        raise UsageError(
            f"cannot copy the module ({_first_line(exc)}); bnfold never modifies the original"
        ) from None
    nodes_before = _count_layers(work)

    args = _as_args(example_inputs) if example_inputs is not None else None
    run: _Run | None = None
    reference: list[tuple[str, Any]] | None = None
    feeds = None
    if args is not None:
        feeds = _seeded_like(args, seed)
        run = _Run(work)
        try:
            with torch.no_grad():
                reference = _flatten_outputs(work(*feeds))
        except Exception as exc:
            raise UsageError(
                f"the module failed to run on inputs shaped like example_inputs ({_shapes_text(feeds)}): "
                f"{_first_line(exc)}"
            ) from None
        finally:
            run.remove()
    timings["run"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    paths = {id(m): name for name, m in work.named_modules()}
    scopes = _discover(work, paths)
    timings["trace"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    decisions, result_module = _fold_scopes(work, scopes, paths, run, rewrite=rewrite)
    timings["fold"] = time.perf_counter() - t2

    report = FoldReport(
        decisions=decisions,
        input=f"{type(module).__name__} (torch.nn.Module)",
        strict=strict,
        nodes_before=nodes_before,
        nodes_after=_count_layers(result_module),
    )
    if args is not None:
        t3 = time.perf_counter()
        report.verification = _verify_module(
            result_module, feeds, reference, seed=seed, atol=atol, rtol=rtol
        )
        timings["verify"] = time.perf_counter() - t3
    report.timings = timings
    return ModuleFoldResult(module=result_module, report=report)


def _shapes_text(args: Sequence[Any]) -> str:
    parts = []
    for a in args:
        parts.append(
            f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}"
            if hasattr(a, "shape")
            else type(a).__name__
        )
    return ", ".join(parts) or "no inputs"


def _fold_scopes(
    root: Any, scopes: list[_Scope], paths: dict[int, str], run: _Run | None, *, rewrite: bool
) -> tuple[list[BNDecision], Any]:
    """Decide and apply every fold; return the decisions (in module order) and the new root."""
    folder = _Folder(root, scopes, paths, run, rewrite=rewrite)
    for scope, node in folder.bn_sites:
        folder.decide(scope, node)
    folder.decide_unreached()
    return folder.finish()


@dataclass
class _Pair:
    """A BN call whose input is a foldable producer call, with the fold computed (float64)."""

    src: Any  # the producer's fx Node
    prod: Any
    kind: str
    path: str
    desc: str
    folded: _Folded


class _Folder:
    """The decisions of :func:`fold_module`, one BN call site at a time, and their application."""

    def __init__(
        self,
        root: Any,
        scopes: list[_Scope],
        paths: dict[int, str],
        run: _Run | None,
        *,
        rewrite: bool,
    ) -> None:
        self.root, self.scopes, self.paths, self.run, self.rewrite = (
            root,
            scopes,
            paths,
            run,
            rewrite,
        )
        self.calls: dict[
            int, int
        ] = {}  # module id -> call sites in all traced graphs (kept current)
        self.attr_tensors: dict[int, str] = {}  # id of a tensor traced code reads directly -> where
        self.bn_sites: list[tuple[_Scope, Any]] = []
        for scope in scopes:
            for node in scope.graph.nodes if scope.graph is not None else ():
                if node.op == "call_module":
                    m = scope.module.get_submodule(node.target)
                    self.calls[id(m)] = self.calls.get(id(m), 0) + 1
                    if _is_bn(m):
                        self.bn_sites.append((scope, node))
                elif node.op == "get_attr":
                    try:
                        self.attr_tensors[id(_resolve_attr(scope.module, node.target))] = _join(
                            scope.path, node.target
                        )
                    except AttributeError:
                        pass
        self.traced_calls = dict(self.calls)  # before call-site folds move calls to private copies
        self.site_total: dict[int, int] = {}
        for scope, node in self.bn_sites:
            bn = scope.module.get_submodule(node.target)
            self.site_total[id(bn)] = self.site_total.get(id(bn), 0) + 1
        self.site_index: dict[int, int] = {}
        self.order = {id(m): i for i, (_, m) in enumerate(root.named_modules())}
        self.decisions: list[tuple[tuple[int, int], BNDecision]] = []
        self.f64: dict[
            int, tuple[np.ndarray, np.ndarray]
        ] = {}  # producer id -> folded (w, b) in float64
        self.in_place_bns: list[Any] = []
        self.rewritten_bns: dict[int, Any] = {}
        self.copy_counter = 0

    # --- one BN call site ----------------------------------------------------------------------

    def decide(self, scope: _Scope, nb: Any) -> None:
        bn = scope.module.get_submodule(nb.target)
        k = self.site_index[id(bn)] = self.site_index.get(id(bn), 0) + 1
        n = self.site_total[id(bn)]
        bn_path = self.paths.get(id(bn), _join(scope.path, nb.target))
        name = bn_path if n == 1 else f"{bn_path} (call {k} of {n})"
        key = (self.order.get(id(bn), 1 << 30), k)
        pair = self._match(scope, nb, bn, bn_path)
        if not isinstance(pair, _Pair):
            reason, detail = pair
            self.decisions.append(
                (key, BNDecision(name=name, folded=False, reason=reason, detail=detail))
            )
            return
        detail = self._detail(pair, bn)
        uses = self._other_uses(pair, bn, f"{type(bn).__name__} {bn_path!r}")
        if not uses:
            self._fold_in_place(scope, nb, bn, pair)
        else:
            why = "; ".join(uses)
            blocker = self._rewrite_blocker(scope)
            if blocker:
                self.decisions.append(
                    (
                        key,
                        BNDecision(
                            name=name,
                            folded=False,
                            reason=SkipReason.MODULE_REUSED,
                            detail=f"{why}: folding in place would change those uses too, and the call site "
                            f"is not rewritten ({blocker})",
                        ),
                    )
                )
                return
            where = self._fold_at_call_site(scope, nb, bn, pair)
            detail += f"; folded into a private copy {where!r} used by this call only ({why})"
        self.decisions.append(
            (
                key,
                BNDecision(
                    name=name,
                    folded=True,
                    detail=detail,
                    direction="backward",
                    target=pair.path,
                    target_op=type(pair.prod).__name__,
                ),
            )
        )

    def _match(
        self, scope: _Scope, nb: Any, bn: Any, bn_path: str
    ) -> _Pair | tuple[SkipReason, str]:
        """The producer to fold into, or why there is none. Early returns, one per case."""
        from torch.fx import Node
        from torch.nn.utils import parametrize

        opaque = scope.opaque_caller
        if opaque is not None and self.run is None:
            return SkipReason.NOT_TRACEABLE, (
                f"{type(scope.module).__name__} {scope.path!r} is called by {type(opaque.module).__name__} "
                f"{opaque.path or '<root>'!r}, whose forward torch.fx cannot trace ({opaque.error}); that "
                "code might call these layers directly: pass example_inputs so bnfold counts the real calls"
            )
        if not _is_standard_bn(bn):
            return (
                SkipReason.UNSUPPORTED_PRODUCER,
                f"{type(bn).__name__} overrides BatchNorm's forward",
            )
        if _has_hooks(bn):
            return SkipReason.HAS_HOOKS, f"{type(bn).__name__} {bn_path!r} has forward hooks"
        src = nb.args[0] if nb.args else nb.kwargs.get("input")
        if not isinstance(src, Node) or src.op in ("placeholder", "get_attr"):
            return SkipReason.NO_PRODUCER, f"its input is {_describe_node(src, scope, self.paths)}"
        prod = scope.module.get_submodule(src.target) if src.op == "call_module" else None
        pk = _producer_kind(prod) if prod is not None else None
        if pk is None:
            what = _describe_node(src, scope, self.paths)
            if prod is not None and _looks_like_producer(prod):
                what += f" (a {type(prod).__name__} subclass with its own forward)"
            return (
                SkipReason.UNSUPPORTED_PRODUCER,
                f"its input comes from {what}, not a Conv/ConvTranspose/Linear",
            )
        kind, dims = pk
        prod_path = self.paths.get(id(prod), _join(scope.path, src.target))
        desc = f"{type(prod).__name__} {prod_path!r}"
        if len(src.users) != 1:
            others = [
                _describe_node(u, scope, self.paths) if u.op != "output" else "the forward's output"
                for u in src.users
                if u is not nb
            ]
            return (
                SkipReason.PRODUCER_OUTPUT_SHARED,
                f"the output of {desc} is also used by {', '.join(others)}",
            )
        if _has_hooks(prod):
            return SkipReason.HAS_HOOKS, f"{desc} has forward hooks"
        if parametrize.is_parametrized(prod):
            return (
                SkipReason.UNSUPPORTED_PRODUCER,
                f"{desc} has a parametrized weight (torch.nn.utils.parametrize)",
            )
        bad = [
            f"its {what} is {str(t.dtype).removeprefix('torch.')}"
            for what, t in (("weight", prod.weight), ("bias", prod.bias))
            if t is not None and str(t.dtype) not in _FLOAT_NP
        ]
        if bad:
            return SkipReason.UNSUPPORTED_DTYPE, f"{desc}: {', '.join(bad)}"
        c_out = _out_features(prod, kind)
        if c_out != bn.num_features:
            return (
                SkipReason.SHAPE_MISMATCH,
                f"{type(bn).__name__} has {bn.num_features} channels but {desc} produces {c_out}",
            )
        layout = self._layout_refusal(scope, src, bn, kind, dims, desc)
        if layout is not None:
            return layout
        try:
            folded = _compute_fold(prod, kind, bn, self.f64.get(id(prod)))
            # Round now, so that an overflow is refused before anything changes.
            _from_f64(folded.weight, prod.weight, "weight")
            _from_f64(folded.bias, prod.bias if prod.bias is not None else prod.weight, "bias")
        except numerics.FoldRefused as refused:
            return SkipReason(refused.reason), refused.detail
        return _Pair(src, prod, kind, prod_path, desc, folded)

    def _layout_refusal(
        self, scope: _Scope, src: Any, bn: Any, kind: str, dims: int, desc: str
    ) -> tuple[SkipReason, str] | None:
        """BatchNorm normalises axis 1: is that the producer's output-channel axis?"""
        ranks = self.run.bn_ranks.get(id(bn)) if self.run is not None else None
        rank = next(iter(ranks)) if ranks and len(ranks) == 1 else None
        bn_type = type(bn).__name__
        if kind == "linear":
            rank = rank if rank is not None else _static_rank(src, scope.module)
            if rank is None:
                return SkipReason.UNKNOWN_LAYOUT, (
                    f"cannot tell whether {desc} outputs [N, C] (foldable) or [N, L, C] (then {bn_type} "
                    "normalises L, not the Linear's features); pass example_inputs"
                )
            if rank != 2:
                return SkipReason.UNSUPPORTED_LAYOUT, (
                    f"{desc} outputs a rank-{rank} tensor: {bn_type} normalises its axis 1, not the "
                    "Linear's output features"
                )
        elif rank is not None and rank != dims + 2:
            return SkipReason.UNSUPPORTED_LAYOUT, (
                f"{desc} runs on unbatched input (rank {rank}): {bn_type} normalises another axis "
                "than its output channels"
            )
        return None

    def _other_uses(self, pair: _Pair, bn: Any, bn_desc: str) -> list[str]:
        """Why folding into the producer itself would change something else."""
        uses = []
        prod = pair.prod
        if self.calls.get(id(prod), 0) != 1:
            uses.append(
                f"{pair.desc} is called {self.calls.get(id(prod), 0)} times in the traced forward"
            )
        for pname in ("weight", "bias"):
            t = getattr(prod, pname)
            if t is not None and id(t) in self.attr_tensors:
                uses.append(f"its {pname} is also read directly as {self.attr_tensors[id(t)]!r}")
        if self.calls.get(id(bn), 0) != 1:
            uses.append(f"{bn_desc} is called {self.calls.get(id(bn), 0)} times")
        if self.run is not None:
            for m, label in ((prod, pair.desc), (bn, bn_desc)):
                traced = self.traced_calls.get(id(m))
                if traced is not None and self.run.calls.get(id(m), 0) != traced:
                    uses.append(
                        f"{label} is called {self.run.calls.get(id(m), 0)} times at run time but "
                        f"{traced} times in the traced graphs"
                    )
        return uses

    def _detail(self, pair: _Pair, bn: Any) -> str:
        what_bias = "bias created" if pair.folded.created_bias else "bias updated"
        axis = "features" if pair.kind == "linear" else "channels"
        detail = f"weight scaled along its output {axis}; {what_bias}"
        mine = {
            id(t): pname
            for pname in ("weight", "bias")
            if (t := getattr(pair.prod, pname)) is not None
        }
        shared = sorted(
            {
                (mine[id(t)], _join(self.paths.get(id(other), "?"), pn))
                for other in self.root.modules()
                if other is not pair.prod and other is not bn
                for pn, t in other._parameters.items()
                if t is not None and id(t) in mine
            }
        )
        if shared:
            detail += "; " + ", ".join(f"its {mp} was shared with {other}" for mp, other in shared)
            detail += ": the fold uses new tensors, the others keep the original"
        return detail

    def _rewrite_blocker(self, scope: _Scope) -> str | None:
        # Only the root is rewritten: a submodule turned into a GraphModule would lose its class
        # (its methods, indexing...), which code outside its trace may rely on.
        if not self.rewrite:
            return "rewrite=False"
        if scope.module is not self.root:
            why = (
                "used by code torch.fx cannot trace"
                if scope.opaque_caller is not None
                else "traced on its own because it has forward hooks"
            )
            return f"only the root module is rewritten, and {type(scope.module).__name__} {scope.path!r} is {why}"
        if _has_hooks(scope.module):
            return "the root module has forward hooks, which a rewritten module would lose"
        return None

    def _fold_in_place(self, scope: _Scope, nb: Any, bn: Any, pair: _Pair) -> None:
        _apply(pair.prod, pair.folded)
        self.f64[id(pair.prod)] = (pair.folded.weight, pair.folded.bias)
        nb.replace_all_uses_with(pair.src)
        scope.graph.erase_node(nb)
        self.in_place_bns.append(bn)

    def _fold_at_call_site(self, scope: _Scope, nb: Any, bn: Any, pair: _Pair) -> str:
        """Point this call at a folded private copy of the producer; returns the copy's path."""
        private = copy.deepcopy(pair.prod)
        _apply(private, pair.folded)
        base = pair.src.target.replace(".", "_")
        while True:
            self.copy_counter += 1
            new_name = f"{base}_bnfold{self.copy_counter}"
            if not hasattr(scope.module, new_name) and new_name not in scope.copies:
                break
        scope.copies[new_name] = private
        self.paths[id(private)] = _join(scope.path, new_name)
        self.calls[id(private)] = 1
        self.f64[id(private)] = (pair.folded.weight, pair.folded.bias)
        self.calls[id(pair.prod)] -= 1
        self.calls[id(bn)] -= 1
        pair.src.target = new_name
        nb.replace_all_uses_with(pair.src)
        scope.graph.erase_node(nb)
        scope.rewritten = True
        self.rewritten_bns[id(bn)] = bn
        return self.paths[id(private)]

    # --- BNs no traced graph calls, and the result -------------------------------------------------

    def decide_unreached(self) -> None:
        decided = {id(scope.module.get_submodule(nb.target)) for scope, nb in self.bn_sites}
        owner: dict[int, _Scope] = {}  # child id -> the untraceable scope that calls it directly
        for s in self.scopes:
            if s.graph is None:
                for child in s.module.children():
                    owner.setdefault(id(child), s)
        for path, m in self.root.named_modules():
            if not _is_bn(m) or id(m) in decided:
                continue
            key = (self.order.get(id(m), 1 << 30), 0)
            s = owner.get(id(m))
            if s is not None:
                reason, detail = (
                    SkipReason.NOT_TRACEABLE,
                    (
                        f"called by {type(s.module).__name__} {s.path or '<root>'!r}, whose forward torch.fx "
                        f"cannot trace ({s.error})"
                    ),
                )
            else:
                reason, detail = (
                    SkipReason.NOT_CALLED,
                    (
                        "no traced forward calls this module: it is unused, or called only on a path the "
                        "trace did not take (forward arguments that default to None are traced as None)"
                    ),
                )
            self.decisions.append(
                (key, BNDecision(name=path, folded=False, reason=reason, detail=detail))
            )

    def finish(self) -> tuple[list[BNDecision], Any]:
        """Rewritten scopes become GraphModules; BNs nothing calls any more become Identity."""
        from torch import nn

        new_root = self.root
        for scope in self.scopes:
            if scope.rewritten:  # only ever the root (see _rewrite_blocker)
                scope.graph.lint()
                new_root = _graph_module(scope.module, scope.graph, scope.copies)
        run = self.run
        done = list(self.in_place_bns) + [
            bn
            for bn in self.rewritten_bns.values()
            if self.calls.get(id(bn), 0) == 0
            and (run is None or run.calls.get(id(bn), 0) == self.traced_calls.get(id(bn), 0))
        ]
        for bn in done:
            _replace_everywhere(new_root, bn, nn.Identity())
        self.decisions.sort(key=lambda kd: kd[0])
        return [d for _, d in self.decisions], new_root


def _graph_module(module: Any, graph: Any, copies: dict[str, Any]) -> Any:
    """A GraphModule running ``graph`` that keeps everything ``module`` had: the same child module
    objects (not the partial copies torch.fx makes for nested targets), parameters, buffers and
    public attributes, so code outside the graph that reaches into it still works; plus the
    private folded copies."""
    from torch import fx

    for name, private in copies.items():
        module.add_module(name, private)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name, child in module.named_children():
        gm._modules[name] = child
    for name, p in module._parameters.items():
        if name not in gm._parameters and not hasattr(gm, name):
            gm.register_parameter(name, p)
    for name, b in module._buffers.items():
        if name not in gm._buffers and not hasattr(gm, name):
            gm.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    for name, value in vars(module).items():
        if not name.startswith("_") and not hasattr(gm, name):
            setattr(gm, name, value)
    gm.train(module.training)
    return gm


def _resolve_attr(module: Any, target: str) -> Any:
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _verify_module(
    module: Any,
    feeds: tuple,
    reference: list[tuple[str, Any]],
    *,
    seed: int,
    atol: float | None,
    rtol: float | None,
) -> VerificationResult:
    """Run the folded module on ``feeds`` and compare with the original's outputs."""
    torch = _import_torch()
    from .compare import VerificationResult, compare_outputs

    started = time.perf_counter()
    shapes = {
        f"input_{i}": [int(d) for d in a.shape] for i, a in enumerate(feeds) if hasattr(a, "shape")
    }
    try:
        with torch.no_grad():
            produced = _flatten_outputs(module(*feeds))
    except Exception as exc:
        return VerificationResult(
            passed=False,
            seed=seed,
            input_shapes=shapes,
            seconds=time.perf_counter() - started,
            message=f"the folded module fails to run: {_first_line(exc)}",
        )
    if not reference:
        return VerificationResult(
            passed=False,
            seed=seed,
            input_shapes=shapes,
            seconds=time.perf_counter() - started,
            skipped_reason="the forward returns no tensors to compare",
        )
    if [n for n, _ in produced] != [n for n, _ in reference]:
        return VerificationResult(
            passed=False,
            seed=seed,
            input_shapes=shapes,
            seconds=time.perf_counter() - started,
            message="the folded module's outputs differ in structure from the original's",
        )
    outputs = tuple(
        compare_outputs(name, _to_numpy(ref), _to_numpy(got), atol=atol, rtol=rtol)
        for (name, ref), (_, got) in zip(reference, produced, strict=True)
    )
    return VerificationResult(
        passed=all(o.passed for o in outputs),
        outputs=outputs,
        seed=seed,
        input_shapes=shapes,
        seconds=time.perf_counter() - started,
    )


# --- export ------------------------------------------------------------------------------------------


def _forward_arg_names(module: Any, n: int) -> list[str]:
    torch = _import_torch()
    names: list[str] = []
    try:
        if isinstance(module, torch.jit.ScriptModule):
            names = [a.name for a in module.forward.schema.arguments[1:]]
        else:
            params = inspect.signature(module.forward).parameters.values()
            names = [
                p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
    except (TypeError, ValueError, AttributeError, RuntimeError):
        names = []
    names = names[:n]
    if len(names) < n or len(set(names)) < n:
        names = [f"input_{i}" for i in range(n)] if n > 1 else ["input"]
    return names


def export(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    strict: bool = False,
    external_data: bool | None = None,
) -> FoldResult:
    """Export ``module`` to ONNX, fold it, verify it against the module itself, write it to ``path``.

    The module is exported with the TorchScript exporter (``torch.onnx.export(dynamo=False,
    do_constant_folding=False)``: it keeps every BatchNormalization, so the report lists each), the
    ONNX fold pass runs on the export, and the folded ONNX model runs under ONNX Runtime (CPU,
    optimizations disabled) on seeded inputs shaped like ``example_inputs`` (floating tensors random
    normal; with ``dynamic_batch`` a second batch of size N+1 checks the dynamic axis). Its outputs
    are compared with the PyTorch module's own outputs on the same inputs. ``path`` is written
    (atomically) only when that verification passes or could not run (ONNX Runtime lacks a kernel,
    e.g. bfloat16 Conv: ``verification.skipped_reason`` says so).

    Args:
        module: an eval-mode ``nn.Module``, a TorchScript module, or a ``torch.export``
            ``ExportedProgram`` (or its ``.module()``), whose BatchNorm mode is read from its graph.
        example_inputs: a tensor or a tuple of tensors, the forward's positional arguments.
        path: the ONNX file to write.
        input_names, output_names: ONNX names (default: the forward's argument names; ``output``
            or ``output_0``, ``output_1``...).
        dynamic_batch: make dimension 0 of every input and output dynamic (``batch``).
        opset: ONNX opset of the export.
        verify, atol, rtol, seed, strict, external_data: as for :func:`bnfold.fold`.

    Returns:
        The :class:`bnfold.api.FoldResult` of the fold (``.model`` is ``path``), with the
        verification against PyTorch in ``report.verification``.
    """
    torch = _import_torch()
    _check_module_state(module)
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    return _export(
        module,
        example_inputs,
        path,
        input_names=input_names,
        output_names=output_names,
        dynamic_batch=dynamic_batch,
        opset=opset,
        verify=verify,
        atol=atol,
        rtol=rtol,
        seed=seed,
        strict=strict,
        external_data=external_data,
    )


def _export(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_batch: bool,
    opset: int,
    verify: bool,
    atol: float | None,
    rtol: float | None,
    seed: int,
    strict: bool,
    external_data: bool | None,
) -> FoldResult:
    """:func:`export` after the module's state was checked."""
    torch = _import_torch()
    from . import io as _io
    from .api import FoldResult, fold

    args = _as_args(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise UsageError(
            "export needs example_inputs made of tensors (the forward's positional arguments)"
        )
    out_path = _io.check_output_path(path, input_path=None)
    timings: dict[str, float] = {}

    # The module's own outputs, on the verification inputs (this also checks the inputs fit).
    t0 = time.perf_counter()
    samples = [_seeded_like(args, seed)]
    if dynamic_batch and all(a.dim() >= 1 for a in args):
        samples.append(_seeded_like(args, seed + 1, batch=int(args[0].shape[0]) + 1))
    references: list[list[tuple[str, Any]]] = []
    for k, feeds in enumerate(samples):
        try:
            with torch.no_grad():
                references.append(_flatten_outputs(module(*feeds)))
        except Exception as exc:
            if k == 0:
                raise UsageError(
                    f"the module failed to run on inputs {_shapes_text(feeds)}: {_first_line(exc)}"
                ) from None
            logger.warning(
                "the module does not run at batch size %d (%s); verifying at the "
                "example batch size only",
                int(feeds[0].shape[0]),
                _first_line(exc),
            )
            samples = samples[:1]
            break
    outputs = references[0]
    if not outputs:
        raise UsageError("the module's forward returns no tensors; nothing to export")
    names_in = (
        list(input_names) if input_names is not None else _forward_arg_names(module, len(args))
    )
    if len(names_in) != len(args):
        raise UsageError(f"input_names has {len(names_in)} names for {len(args)} inputs")
    names_out = (
        list(output_names)
        if output_names is not None
        else (["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    )
    if len(names_out) != len(outputs):
        raise UsageError(f"output_names has {len(names_out)} names for {len(outputs)} outputs")
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {
            n: {0: "batch"} for n, a in zip(names_in, args, strict=True) if a.dim() >= 1
        }
        dynamic_axes.update(
            {n: {0: "batch"} for n, (_, t) in zip(names_out, outputs, strict=True) if t.dim() >= 1}
        )
    timings["run"] = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix="bnfold-torch-"))
    try:
        exported = work / "exported.onnx"
        t1 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                torch.onnx.export(
                    module,
                    tuple(args),
                    str(exported),
                    dynamo=False,  # the TorchScript exporter; the dynamo one needs onnxscript
                    do_constant_folding=False,  # constant folding would fuse Conv+BN itself, unreported
                    opset_version=opset,
                    input_names=names_in,
                    output_names=names_out,
                    dynamic_axes=dynamic_axes,
                    export_params=True,
                    keep_initializers_as_inputs=False,
                    training=torch.onnx.TrainingMode.PRESERVE,  # checked above: eval
                )
        except Exception as exc:
            raise InvalidModelError(f"torch.onnx.export failed: {_first_line(exc)}") from None
        timings["export"] = time.perf_counter() - t1

        folded = fold(exported, verify=False)
        report = folded.report
        ir_model = folded.model
        timings.update(report.timings)
        report.input = f"{type(module).__name__} (torch.onnx.export)"
        report.output = str(out_path)
        report.strict = strict
        use_external = _io.needs_external_data(ir_model) if external_data is None else external_data

        t2 = time.perf_counter()
        staged = _io.StagedOutput(out_path)
        try:
            staged.write(ir_model, external=use_external)
            timings["save"] = time.perf_counter() - t2
            if verify:
                t3 = time.perf_counter()
                report.verification = _verify_onnx(
                    staged.path,
                    exported,
                    names_in,
                    samples,
                    references,
                    seed=seed,
                    atol=atol,
                    rtol=rtol,
                )
                timings["verify"] = time.perf_counter() - t3
            if not report.verification_failed:
                staged.commit()
                report.written = True
        finally:
            if not staged.committed:
                staged.discard()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.timings = timings
    return FoldResult(model=out_path, report=report)


def _verify_onnx(
    candidate: Path,
    exported: Path,
    input_names: list[str],
    samples: list[tuple],
    references: list[list[tuple[str, Any]]],
    *,
    seed: int,
    atol: float | None,
    rtol: float | None,
) -> VerificationResult:
    """Run the folded ONNX model under ORT on each sample and compare with PyTorch's outputs."""
    from . import _ort
    from .compare import VerificationResult, _Accumulator, default_tolerances

    started = time.perf_counter()

    def result(**kw: Any) -> VerificationResult:
        kw.setdefault("passed", False)
        return VerificationResult(
            seed=seed, samples=len(samples), seconds=time.perf_counter() - started, **kw
        )

    try:
        session = _ort.make_session(str(candidate), level="disable")
    except InvalidModelError as error:
        try:  # does ONNX Runtime run the unfolded export? If not, it lacks a kernel: unverified
            _ort.make_session(str(exported), level="disable")
        except InvalidModelError as unfolded_error:
            return result(
                skipped_reason="ONNX Runtime cannot run the exported model either: "
                f"{_ort_reason(unfolded_error).replace(str(exported), 'exported.onnx')}"
            )
        return result(message=f"ONNX Runtime cannot run the folded model: {_ort_reason(error)}")
    wanted = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    shapes = {
        n: [int(d) for d in a.shape]
        for n, a in zip(input_names, samples[0], strict=True)
        if n in wanted
    }
    missing = [n for n in wanted if n not in input_names]
    if missing:
        return result(
            input_shapes=shapes,
            message=(
                f"the exported model has inputs {', '.join(map(repr, missing))} that are not the module's "
                f"arguments ({', '.join(map(repr, input_names))})"
            ),
        )
    if len(out_names) != len(references[0]):
        return result(
            input_shapes=shapes,
            message=(
                f"the exported model has {len(out_names)} outputs for the module's {len(references[0])}"
            ),
        )
    accumulators = []
    for name, (_, t) in zip(out_names, references[0], strict=True):
        d_atol, d_rtol = default_tolerances(_to_numpy(t.reshape(-1)[:1]).dtype)
        accumulators.append(
            _Accumulator(name, d_atol if atol is None else atol, d_rtol if rtol is None else rtol)
        )
    for k, (feeds, ref) in enumerate(zip(samples, references, strict=True)):
        arrays = {n: _to_numpy(a) for n, a in zip(input_names, feeds, strict=True) if n in wanted}
        try:
            produced = _ort.run(session, arrays)
        except _ort.OrtRunError as error:
            return result(
                input_shapes=shapes,
                message=f"ONNX Runtime cannot run the folded model: {_ort_reason(error)}",
            )
        for acc, (_, want), got in zip(accumulators, ref, produced, strict=True):
            acc.add(_to_numpy(want), np.asarray(got), sample=k)
    comparisons = tuple(a.finish() for a in accumulators)
    return result(
        passed=all(c.passed for c in comparisons), outputs=comparisons, input_shapes=shapes
    )


def _ort_reason(error: Exception) -> str:
    text = str(error)
    for prefix in (
        "ONNX Runtime cannot load the model: ",
        "ONNX Runtime failed to run the model: ",
    ):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


# --- files: .pt2, TorchScript, pickled modules ------------------------------------------------------


@dataclass
class TorchSource:
    """A model loaded from a PyTorch file, ready for :func:`export`.

    ``kind`` is ``"exported_program"`` (``torch.export.save``), ``"torchscript"``
    (``torch.jit.save``) or ``"pickled_module"`` (``torch.save(model)``). ``example_inputs`` are
    seeded tensors of the shapes and dtypes the model takes, named ``input_names``.
    ``dynamic_batch`` is False for an exported program whose batch dimension is static.
    """

    module: Any
    example_inputs: tuple
    input_names: list[str]
    kind: str
    path: Path
    dynamic_batch: bool = True


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def is_torch_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PyTorch file (a zip archive or a legacy pickle), by its first bytes.

    ONNX files are protobuf and never start like these. Needs no torch.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)


def _archive_is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4).startswith(_ZIP_MAGIC)


def _archive_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        return "pickle"
    if not head.startswith(_ZIP_MAGIC):
        raise InvalidModelError(
            f"{path}: not a PyTorch file (expected a torch.export .pt2, a TorchScript archive or a "
            "torch.save file)"
        )
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile as exc:
        raise InvalidModelError(f"{path}: damaged archive ({_first_line(exc)})") from None
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if (
        "archive_format" in tails
        or any(t.startswith("models/") for t in tails)
        or any(t.endswith("serialized_exported_program.json") for t in tails)
    ):
        return "exported_program"
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "pickle"
    raise InvalidModelError(f"{path}: a zip archive, but not one PyTorch wrote")


def _state_dict_error(path: Path, what: str) -> InvalidModelError:
    return InvalidModelError(
        f"{path} holds {what}, not a model: it has no architecture, so bnfold cannot rebuild the "
        "network from it. Build the model in Python, load_state_dict() it, call model.eval(), then "
        "use bnfold.torch.fold_module(model) or bnfold.torch.export(model, example_inputs, "
        "'folded.onnx')"
    )


def _describe_loaded(obj: Any) -> str:
    torch = _import_torch()
    if isinstance(obj, Mapping):
        values = list(obj.values())
        if values and all(isinstance(v, torch.Tensor) for v in values):
            return f"a state_dict ({len(values)} tensors)"
        return f"a dict (keys {', '.join(map(repr, list(obj)[:4]))}{' ...' if len(obj) > 4 else ''}; a checkpoint or state_dict)"
    if isinstance(obj, torch.Tensor):
        return "a single tensor"
    return f"a {type(obj).__name__}"


def load_torch_file(
    path: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    trust_pickle: bool = False,
) -> TorchSource:
    """Load a PyTorch model file and build example inputs for it.

    * ``.pt2`` from ``torch.export.save``: loaded with ``torch.export.load``; input names and
      (unless given) shapes come from the exported program.
    * TorchScript (``torch.jit.save``): ``torch.jit.load``; names from ``forward``'s schema, shapes
      must be given.
    * ``torch.save(model)``: read with ``torch.load(weights_only=True)`` first; a pickled module
      needs ``trust_pickle=True`` (``torch.load(weights_only=False)``: unpickling runs code from the
      file) and its class importable; shapes must be given. A state_dict (or checkpoint dict) is
      refused with an error that explains why and points to the Python API.

    Args:
        path: the file.
        input_shapes: ``{input name: shape}``; required for inputs whose shape the file does not
            record. Names must be the model's input names.
        trust_pickle: allow unpickling a whole ``nn.Module``.

    Raises:
        InputNotFoundError, InvalidModelError, UsageError (missing or inconsistent shapes, a
        pickle without ``trust_pickle``), TrainingModeError, TorchUnavailableError.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such file")
    kind = _archive_kind(path)
    from . import archive, torch_safety  # issue 15: vet the archive before torch reads it

    if kind == "exported_program":
        archive.check_pt2(path, trust_pickle=trust_pickle)  # torch-free: refuse before importing
    elif _archive_is_zip(path):
        archive.check_torch_zip(path)
    torch = _import_torch()
    given = {str(k): tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}

    if kind == "exported_program":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise InvalidModelError(
                f"{path}: torch.export.load failed: {_first_line(exc)}"
            ) from None
        torch_safety.check_exported_program(ep, str(path), trust=trust_pickle)
        return _from_exported_program(ep, path, given)

    if kind == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise InvalidModelError(f"{path}: torch.jit.load failed: {_first_line(exc)}") from None
        torch_safety.check_torchscript(module, str(path), trust=trust_pickle)
        names = _forward_arg_names(module, len(module.forward.schema.arguments) - 1)
        dtype = _module_float_dtype(module)
        args = _inputs_from_shapes(
            path, "a TorchScript archive", names, given, {}, {n: dtype for n in names}
        )
        return TorchSource(module, args, names, "torchscript", path)

    # torch.save: a pickle (zip or legacy)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any class it does not know
        if not _refused_by_weights_only(exc):
            raise InvalidModelError(f"{path}: torch.load failed: {_first_line(exc)}") from None
        if not trust_pickle:
            raise UsageError(
                f"{path} is a pickled Python object (torch.save of a whole model). Loading it runs "
                "code from the file; if you trust it, pass --trust-pickle (Python: trust_pickle=True). "
                "Safer: save the model with torch.export.save (.pt2) or as TorchScript"
            ) from None
        logger.debug("weights_only load refused: %s", _first_line(exc))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError, ImportError) as exc2:
            raise InvalidModelError(
                f"{path}: cannot unpickle the model, its class is not importable here "
                f"({_first_line(exc2)}); run bnfold where the model's code is importable"
            ) from None
        except Exception as exc2:
            raise InvalidModelError(f"{path}: torch.load failed: {_first_line(exc2)}") from None
    if not isinstance(obj, torch.nn.Module):
        raise _state_dict_error(path, _describe_loaded(obj))
    names = _forward_arg_names(obj, _n_required_args(obj))
    dtype = _module_float_dtype(obj)
    args = _inputs_from_shapes(
        path, "a pickled module", names, given, {}, {n: dtype for n in names}
    )
    return TorchSource(obj, args, names, "pickled_module", path)


def _refused_by_weights_only(exc: BaseException) -> bool:
    """torch.load(weights_only=True) met a class it may not import (a pickled module), as opposed
    to a damaged file (torch wraps both in the same UnpicklingError)."""
    text = str(exc)
    return "Unsupported global" in text or "Unsupported class" in text


def _n_required_args(module: Any) -> int:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return (
        sum(
            1
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is inspect.Parameter.empty
        )
        or 1
    )


def _module_float_dtype(module: Any) -> Any:
    torch = _import_torch()
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _inputs_from_shapes(
    path: Path,
    what: str,
    names: list[str],
    given: dict[str, tuple[int, ...]],
    defaults: dict[str, tuple[Any, ...]],
    dtypes: dict[str, Any],
) -> tuple:
    """Seeded example tensors; ``defaults`` holds shapes the file records (ints or None if dynamic)."""
    torch = _import_torch()
    unknown = [n for n in given if n not in names]
    if unknown:
        raise UsageError(
            f"--input-shape given for {', '.join(map(repr, unknown))}, which is not an input of "
            f"{path.name}; its inputs are: {', '.join(map(repr, names))}"
        )
    gen = torch.Generator().manual_seed(0)
    args = []
    for name in names:
        recorded = defaults.get(name)
        shape = given.get(name)
        if shape is None:
            if recorded is None or any(d is None for d in recorded):
                example = (
                    "1,3,224,224"
                    if recorded is None
                    else ",".join("1" if d is None else str(d) for d in recorded)
                )
                raise UsageError(
                    f"{path.name}: give the shape of input {name!r} with --input-shape {name}={example} "
                    f"({what} does not record {'its input shapes' if recorded is None else 'every dimension'}; "
                    f"inputs needed: {', '.join(map(repr, names))})"
                )
            shape = tuple(int(d) for d in recorded)
        elif recorded is not None:
            want = "[" + ", ".join("?" if d is None else str(d) for d in recorded) + "]"
            if len(shape) != len(recorded):
                raise UsageError(
                    f"input shape for {name!r} has rank {len(shape)} but {path.name} expects {want}"
                )
            for i, (d, r) in enumerate(zip(shape, recorded, strict=True)):
                if r is not None and int(r) != d:
                    raise UsageError(
                        f"input shape for {name!r} has {d} in dimension {i} but {path.name} expects {want}"
                    )
        dtype = dtypes.get(name, torch.float32)
        if dtype.is_floating_point:
            args.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        elif dtype == torch.bool:
            args.append(torch.zeros(shape, dtype=torch.bool))
        else:
            args.append(torch.zeros(shape, dtype=dtype))
    return tuple(args)


def _from_exported_program(ep: Any, path: Path, given: dict[str, tuple[int, ...]]) -> TorchSource:
    torch = _import_torch()
    if _graph_runs_bn_in_training(ep.graph):
        raise TrainingModeError(
            f"{path.name}: the exported program runs BatchNorm in training mode (batch statistics), "
            "so there is nothing fixed to fold; export the model after model.eval()"
        )
    user_inputs = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    recorded: dict[str, tuple[Any, ...]] = {}
    dtypes: dict[str, Any] = {}
    batch_static = True
    for name in user_inputs:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(val, torch.Tensor):
            raise UsageError(
                f"{path.name}: input {name!r} is not a tensor; bnfold exports tensor inputs only"
            )
        dims = tuple(int(d) if isinstance(d, int) else None for d in val.shape)
        recorded[name] = dims
        dtypes[name] = val.dtype
        if dims and dims[0] is None:
            batch_static = False
    # The example inputs saved with the program fill in dynamic dimensions when none are given.
    saved = getattr(ep, "example_inputs", None)
    if saved and isinstance(saved, tuple) and len(saved) == 2 and not saved[1]:
        saved_args = saved[0]
        if len(saved_args) == len(user_inputs):
            for name, a in zip(user_inputs, saved_args, strict=True):
                if (
                    name not in given
                    and isinstance(a, torch.Tensor)
                    and any(d is None for d in recorded[name])
                ):
                    given[name] = tuple(int(d) for d in a.shape)
    args = _inputs_from_shapes(path, "the exported program", user_inputs, given, recorded, dtypes)
    module = ep.module()
    return TorchSource(
        module, args, user_inputs, "exported_program", path, dynamic_batch=not batch_static
    )


def fold_file(
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    trust_pickle: bool = False,
    opset: int = 17,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    strict: bool = False,
    external_data: bool | None = None,
) -> FoldResult:
    """``bnfold fold model.pt2 -o folded.onnx``: :func:`load_torch_file`, then :func:`export`.

    The report's ``input`` is ``path``. See those two functions for the arguments and errors.
    """
    src = load_torch_file(path, input_shapes=input_shapes, trust_pickle=trust_pickle)
    result = export(
        src.module,
        src.example_inputs,
        output,
        input_names=src.input_names,
        dynamic_batch=src.dynamic_batch,
        opset=opset,
        verify=verify,
        atol=atol,
        rtol=rtol,
        seed=seed,
        strict=strict,
        external_data=external_data,
    )
    result.report.input = str(path)
    return result
