"""What the PyTorch front end's three features share: the lazy torch import, module classification,
the state checks (training mode, running statistics, lazy parameters) and tensor/argument helpers.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from bnfold import numerics
from bnfold.errors import (
    NoRunningStatsError,
    TorchUnavailableError,
    TrainingModeError,
    UsageError,
)

logger = logging.getLogger("bnfold.torch")


def warnings_to_log(func):  # noqa: ANN001, ANN201 - a decorator
    """Run ``func`` with Python warnings (torch's TracerWarning, "no signature found ...",
    deprecations) captured and logged at debug level instead of printed: they are about torch's
    internals, not the user's model, and ``-q`` must mean quiet. ``-v``/logging shows them."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return func(*args, **kwargs)
            finally:
                for w in caught:
                    logger.debug(
                        "%s: %s (%s:%s)", w.category.__name__, w.message, w.filename, w.lineno
                    )

    return wrapper


def _import_torch():  # noqa: ANN202 - returns the torch module
    try:
        import torch
    except ImportError:
        raise TorchUnavailableError(
            "PyTorch is not installed; for the CPU build: pip install torch==2.13.0 "
            "--index-url https://download.pytorch.org/whl/cpu (or pip install '.[torch]' in a "
            "bnfold checkout)"
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


def _shapes_text(args: Sequence[Any]) -> str:
    parts = []
    for a in args:
        parts.append(
            f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}"
            if hasattr(a, "shape")
            else type(a).__name__
        )
    return ", ".join(parts) or "no inputs"


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
