"""What ``fold_module`` treats as a BatchNorm, beyond torch's own ``nn.BatchNorm1d/2d/3d``.

Three kinds, each reduced to one per-channel affine ``y = s · x + t`` (float64) plus, for the
first, the modules that run after it:

* **BatchNorm subclasses whose forward is "batch_norm, then other modules"** (timm's
  ``BatchNormAct2d``: ``F.batch_norm`` with the module's own statistics, then ``self.drop`` and
  ``self.act``). Recognised structurally, never by class name: the subclass's forward is traced with
  torch.fx (its children as leaves) and must be exactly one ``F.batch_norm`` of the input with the
  module's ``running_mean``/``running_var``/``weight``/``bias`` in inference mode, followed by a
  chain of its own child modules, each taking the previous value as its only argument; shape checks
  (``x.ndim``, ``torch._assert``) may sit beside it. The fold keeps that chain (the "tail") at the
  call site.
* **Frozen BatchNorms**: a module that is not a ``_BatchNorm`` but has exactly the buffers
  ``weight``, ``bias``, ``running_mean``, ``running_var`` (shape ``[C]``), a float ``eps``, no
  parameters and no children (torchvision's ``FrozenBatchNorm2d``). Recognised when a probe run
  shows that its forward *is* ``x · s + t`` with ``s = weight / sqrt(running_var + eps)``.
* **Classes a user names**: ``register_bn_like(cls, affine_fn)`` (process-wide) or
  ``fold_module(..., bn_like={cls: affine_fn})`` (one call); ``affine_fn(module)`` returns the
  per-channel ``(scale, shift)`` (tensors or arrays of shape ``[C]``) such that the module's
  forward is ``x * scale[c] + shift[c]`` along axis 1. bnfold trusts that claim; the verification
  (with ``example_inputs``) checks it.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold import numerics

from ._common import _first_line, _import_torch, _is_bn, _is_standard_bn

logger = logging.getLogger(__name__)

__all__ = ["register_bn_like", "unregister_bn_like"]

AffineFn = Callable[[Any], tuple[Any, Any]]
_REGISTRY: dict[type, AffineFn] = {}


def register_bn_like(cls: type, affine_fn: AffineFn) -> None:
    """Make ``fold_module`` treat every module of class ``cls`` (and its subclasses) as a
    BatchNorm: ``affine_fn(module)`` returns ``(scale, shift)`` of shape ``[C]`` with
    ``forward(x) == x * scale + shift`` broadcast along axis 1."""
    if not isinstance(cls, type) or not callable(affine_fn):
        raise TypeError("register_bn_like(cls, affine_fn) takes a class and a callable")
    _REGISTRY[cls] = affine_fn


def unregister_bn_like(cls: type) -> None:
    """Forget a class given to :func:`register_bn_like` (nothing happens if it was not)."""
    _REGISTRY.pop(cls, None)


@dataclass
class BNLike:
    """How one module folds: its affine (float64, per channel) and the modules run after it."""

    kind: str  # "batchnorm", "batchnorm+tail", "frozen", "registered"
    scale: np.ndarray
    shift: np.ndarray
    tail: list[tuple[str, Any]]  # (child name, module) run after the affine, in order

    @property
    def num_features(self) -> int:
        return int(self.scale.shape[0])


class Recognizer:
    """Classifies the modules of one ``fold_module`` call (results cached per module)."""

    def __init__(self, extra: Mapping[type, AffineFn] | None = None) -> None:
        self.extra = dict(extra or {})
        self._cache: dict[int, BNLike | str | None] = {}

    def _registered(self, m: Any) -> AffineFn | None:
        for table in (self.extra, _REGISTRY):
            for cls, fn in table.items():
                if isinstance(m, cls):
                    return fn
        return None

    def is_site(self, m: Any) -> bool:
        """A module bnfold reports on: a ``_BatchNorm``, a registered class or a frozen BN."""
        if _is_bn(m) or self._registered(m) is not None:
            return True
        return _frozen_candidate(m)

    def classify(self, m: Any) -> BNLike | str:
        """The module's affine, or a sentence saying why it is not one bnfold can fold."""
        key = id(m)
        if key not in self._cache:
            try:
                self._cache[key] = self._classify(m)
            except numerics.Refusal as refusal:
                self._cache[key] = refusal.detail
            except Exception as exc:  # a user's affine_fn, a probe run...
                self._cache[key] = f"{type(m).__name__}: {_first_line(exc)}"
        return self._cache[key]

    def _classify(self, m: Any) -> BNLike | str:
        fn = self._registered(m)
        if fn is not None:
            scale, shift = fn(m)
            s, t = _as_f64(scale), _as_f64(shift)
            if s.ndim != 1 or s.shape != t.shape:
                return f"the registered affine of {type(m).__name__} is not two [C] vectors"
            return BNLike("registered", s, t, [])
        if _is_bn(m):
            s, t = _bn_affine(m)
            if _is_standard_bn(m):
                return BNLike("batchnorm", s, t, [])
            tail = _batchnorm_then_modules(m)
            if isinstance(tail, str):
                return tail
            return BNLike("batchnorm+tail", s, t, tail)
        if _frozen_candidate(m):
            return _frozen_affine(m)
        return f"{type(m).__name__} is not a BatchNorm"


def _as_f64(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        torch = _import_torch()
        return v.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(v, dtype=np.float64).reshape(-1)


def _bn_affine(m: Any) -> tuple[np.ndarray, np.ndarray]:
    c = int(m.num_features)
    gamma = _as_f64(m.weight) if m.weight is not None else np.ones(c)
    beta = _as_f64(m.bias) if m.bias is not None else np.zeros(c)
    return numerics.bn_scale_shift(
        gamma, beta, _as_f64(m.running_mean), _as_f64(m.running_var), float(m.eps)
    )


# --- BatchNorm subclasses: "batch_norm, then other modules" ------------------------------------------

_SHAPE_ONLY = {getattr, operator.eq, operator.ne, operator.lt, operator.le, operator.gt}


def _batchnorm_then_modules(m: Any) -> list[tuple[str, Any]] | str:
    """The child modules a BN subclass's forward runs after ``F.batch_norm``, or why it is not
    that shape (a sentence)."""
    torch = _import_torch()
    import torch.nn.functional as F

    name = type(m).__name__

    class _Leaves(torch.fx.Tracer):
        def is_leaf_module(self, mod: Any, qualified_name: str) -> bool:
            return mod is not m

    try:
        graph = _Leaves().trace(m)
    except Exception as exc:
        return f"{name} overrides BatchNorm's forward, and torch.fx cannot trace it ({_first_line(exc)})"
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    bns = [n for n in nodes if n.op == "call_function" and n.target is F.batch_norm]
    out = next(n for n in nodes if n.op == "output")
    unlike = f"{name} overrides BatchNorm's forward with something else than batch_norm + modules"
    if len(inputs) != 1 or len(bns) != 1:
        return unlike
    bn = bns[0]
    if not _is_own_batch_norm(bn, m, inputs[0]):
        return unlike
    tail: list[tuple[str, Any]] = []
    value = bn
    while True:
        users = [u for u in value.users if not _shape_only(u)]
        if len(users) != 1:
            return unlike
        user = users[0]
        if user is out:
            break
        if user.op != "call_module" or user.args != (value,) or user.kwargs:
            return unlike
        tail.append((user.target, m.get_submodule(user.target)))
        value = user
    if out.args != (value,):
        return unlike
    return tail


def _is_own_batch_norm(node: Any, m: Any, x: Any) -> bool:
    """``F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
    training=False, momentum, eps=self.eps)``."""
    names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum"]
    args = dict(zip(names, node.args, strict=False))
    args.update(node.kwargs)
    want = {"running_mean": "running_mean", "running_var": "running_var"}
    want.update({k: k for k in ("weight", "bias") if getattr(m, k, None) is not None})
    if args.get("input") is not x or args.get("training", False) is not False:
        return False
    for key, attr in want.items():
        a = args.get(key)
        if getattr(a, "op", None) != "get_attr" or a.target != attr:
            return False
    eps = args.get("eps", 1e-5)
    return isinstance(eps, float) and eps == float(m.eps)


def _shape_only(node: Any) -> bool:
    """A node that reads only a value's metadata (``x.ndim``) or checks it (``torch._assert``)."""
    torch = _import_torch()
    if node.op == "call_function" and node.target in _SHAPE_ONLY | {torch._assert}:
        return all(_shape_only(u) for u in node.users)
    return False


# --- frozen BatchNorms ------------------------------------------------------------------------------

_FROZEN_BUFFERS = {"weight", "bias", "running_mean", "running_var"}


def _frozen_candidate(m: Any) -> bool:
    if _is_bn(m) or list(m.children()) or list(m.parameters(recurse=False)):
        return False
    buffers = dict(m.named_buffers(recurse=False))
    if set(buffers) != _FROZEN_BUFFERS or not isinstance(getattr(m, "eps", None), float):
        return False
    shapes = {tuple(b.shape) for b in buffers.values()}
    return len(shapes) == 1 and len(next(iter(shapes))) == 1


def _frozen_affine(m: Any) -> BNLike | str:
    """The frozen BN's affine, after a probe run shows that its forward is that affine."""
    torch = _import_torch()
    s, t = numerics.bn_scale_shift(
        _as_f64(m.weight),
        _as_f64(m.bias),
        _as_f64(m.running_mean),
        _as_f64(m.running_var),
        float(m.eps),
    )
    c = s.shape[0]
    dtype = m.weight.dtype
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn((2, c, 3, 3), generator=gen, dtype=torch.float64).to(dtype)
    try:
        with torch.no_grad():
            got = m(probe.to(m.weight.device)).detach().to("cpu", torch.float64).numpy()
    except Exception as exc:
        return f"{type(m).__name__} looks like a frozen BatchNorm, but a probe run failed ({_first_line(exc)})"
    x = probe.to(torch.float64).numpy()
    want = x * s[None, :, None, None] + t[None, :, None, None]
    tol = 1e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    if got.shape != want.shape or not np.allclose(got, want, rtol=tol, atol=tol):
        return (
            f"{type(m).__name__} has a frozen BatchNorm's buffers, but its forward is not "
            "x * weight / sqrt(running_var + eps) + shift"
        )
    return BNLike("frozen", s, t, [])
