"""``fold_module``: a BatchNorm after ``torch.cat([conv_0(...), conv_1(...), ...], dim=1)`` (mixnet's
mixed depthwise convolutions): the BN is split by channel slices, slice ``[o_i, o_i + C_i)`` folded
into Conv ``i``. Each Conv must be a foldable producer whose output only the ``cat`` uses, called
once, and the ``cat``'s output only the BN; then the fold is exact, slice by slice, with the same
:mod:`bnfold.numerics` formulas as a single Conv.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bnfold import numerics
from bnfold.reasons import SkipReason

from ._common import _f64, _from_f64, _producer_kind
from ._scopes import _describe_node
from .bn_like import BNLike


@dataclass
class Concat:
    """A BN after a channel concat of Convs: each Conv with its folded (weight, bias), float64."""

    cat: Any  # the cat node
    convs: list[tuple[Any, str, Any, Any, bool]]  # (module, path, weight, bias, bias created)


def is_channel_cat(node: Any) -> bool:
    import torch

    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 1 and isinstance(node.args[0], (list, tuple))


def match_concat(folder: Any, scope: Any, cat: Any, bn: Any, like: BNLike) -> Concat | tuple:
    """The Convs to fold the BN's channel slices into, or why not (reason, detail)."""
    from torch.fx import Node

    from ._folder import _producer_refusal

    if len(cat.users) != 1:
        return SkipReason.PRODUCER_OUTPUT_SHARED, "the concatenation is also used elsewhere"
    if folder.calls.get(id(bn), 0) != 1:
        return SkipReason.MODULE_REUSED, "the BN is called more than once"
    convs, offset = [], 0
    for part in cat.args[0]:
        m = (
            scope.module.get_submodule(part.target)
            if getattr(part, "op", "") == "call_module"
            else None
        )
        pk = _producer_kind(m) if m is not None else None
        if not isinstance(part, Node) or pk is None or pk[0] != "conv":
            what = _describe_node(part, scope, folder.paths)
            return SkipReason.UNSUPPORTED_PRODUCER, f"the concatenation has {what}, not a Conv"
        path = folder.paths.get(id(m), part.target)
        desc = f"{type(m).__name__} {path!r}"
        if len(part.users) != 1 or folder.calls.get(id(m), 0) != 1:
            return SkipReason.PRODUCER_OUTPUT_SHARED, f"{desc} is also used elsewhere"
        if folder.run is not None and folder.run.calls.get(id(m), 0) != 1:
            return SkipReason.MODULE_REUSED, f"{desc} is called more than once at run time"
        if any(id(t) in folder.attr_tensors for t in (m.weight, m.bias) if t is not None):
            return SkipReason.MODULE_REUSED, f"the weight of {desc} is also read directly"
        refused = _producer_refusal(m, desc)
        if refused is not None:
            return refused
        convs.append((m, path, offset))
        offset += int(m.out_channels)
    if offset != like.num_features:
        return SkipReason.SHAPE_MISMATCH, (
            f"the concatenated Convs produce {offset} channels, the BN has {like.num_features}"
        )
    return _compute(folder, cat, convs, like)


def _compute(folder: Any, cat: Any, convs: list, like: BNLike) -> Concat | tuple:
    out = []
    try:
        for m, path, start in convs:
            c = int(m.out_channels)
            s, t = like.scale[start : start + c], like.shift[start : start + c]
            state = folder.f64.get(id(m))
            w = state[0] if state is not None else _f64(m.weight)
            b = state[1] if state is not None else (_f64(m.bias) if m.bias is not None else None)
            w2, b2 = numerics.fold_conv(w, s), numerics.fold_bias(b, s, t)
            _from_f64(w2, m.weight, "weight")
            _from_f64(b2, m.bias if m.bias is not None else m.weight, "bias")
            out.append((m, path, w2, b2, b is None))
    except numerics.Refusal as refused:
        return refused.reason, refused.detail
    return Concat(cat, out)
