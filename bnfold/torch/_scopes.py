"""``fold_module`` discovery: which parts of a module torch.fx can trace (scopes), the static rank of
a traced value (for Linear → BatchNorm1d), readable node descriptions, and a real run's call counts.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from ._common import (
    _first_line,
    _has_hooks,
    _import_torch,
    _is_bn,
    _is_torch_leaf,
    _join,
    _looks_like_producer,
)

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _tracer_class() -> type:
    torch = _import_torch()

    class _Tracer(torch.fx.Tracer):
        """torch.fx tracer whose leaves are torch.nn layers, BNs, Conv/Linear (and their
        subclasses) and modules with forward hooks."""

        def __init__(self, scope_root: Any, is_site: Any = _is_bn) -> None:
            super().__init__()
            self.scope_root = scope_root
            self.is_site = is_site

        def is_leaf_module(self, m: Any, module_qualified_name: str) -> bool:
            if m is self.scope_root:
                return False
            if _has_hooks(m) or self.is_site(m) or _looks_like_producer(m):
                return True
            return super().is_leaf_module(m, module_qualified_name)

    return _Tracer


# --- the state checks shared by fold_module and export -----------------------------------------------


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


def _discover(root: Any, paths: dict[int, str], is_site: Any = _is_bn) -> list[_Scope]:
    """Trace ``root``; where that fails, its children (recursively). Hooked leaves get own scopes.
    ``is_site(module)``: a BatchNorm-like module (a leaf of every trace)."""
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
            is_site(mod)
            or _looks_like_producer(mod)
            or (mod is not root and _is_torch_leaf(mod) and not _has_hooks(mod))
        ):
            continue
        scope = _Scope(mod, path, opaque_caller=opaque)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scope.graph = tracer_cls(mod, is_site).trace(mod, concrete_args=_none_defaults(mod))
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
                    and not is_site(sub)
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


def _count_layers(module: Any) -> int:
    from torch import nn

    return sum(
        1 for m in module.modules() if not list(m.children()) and not isinstance(m, nn.Identity)
    )


class _Run:
    """Counts the calls of BNs and producers, and records each BN call's input rank, in a real run."""

    def __init__(self, root: Any, is_site: Any = _is_bn) -> None:
        self.calls: dict[int, int] = {}
        self.bn_ranks: dict[int, set[int]] = {}
        self._handles = []
        self._is_site = is_site
        for m in root.modules():
            if is_site(m) or _looks_like_producer(m):
                self._handles.append(m.register_forward_pre_hook(self._hook))

    def _hook(self, m: Any, args: tuple) -> None:
        self.calls[id(m)] = self.calls.get(id(m), 0) + 1
        if self._is_site(m) and args and hasattr(args[0], "dim"):
            self.bn_ranks.setdefault(id(m), set()).add(int(args[0].dim()))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
