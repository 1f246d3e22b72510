"""``fold_module``'s forward folds: a BatchNorm with no foldable producer folded into the Conv or
Linear that consumes its output (the Keras order ``Conv → ReLU → BN → MaxPool → Conv``, ``Linear →
ReLU → BN1d → Linear``, ``BN1d → Dropout → Linear`` and ``mean → BN1d → Linear`` heads).

The exactness rules are the ONNX pass's: between the BN and its consumer only eval-mode Dropout,
Identity and MaxPool (which commutes with the BN only where its scale is > 0); a Conv consumer
must not pad (its zero padding would not be shifted) unless the BN's shift is zero; a Linear
consumer needs the BN's input to be ``[N, C]``. The formulas are :mod:`bnfold.numerics`
(``fold_conv_input``/``conv_input_shift``, ``fold_gemm_input``/``gemm_input_shift``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold import numerics
from bnfold.reasons import SkipReason

from ._common import _FLOAT_NP, _f64, _has_hooks, _producer_kind
from ._scopes import _describe_node, _static_rank
from .bn_like import BNLike

_PASSTHROUGH_FUNCS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout"}


@dataclass
class Forward:
    """A forward fold found: the consumer, its new (weight, bias) in float64, what it went through."""

    consumer: Any
    node: Any  # the consumer's fx node
    kind: str
    path: str
    weight: np.ndarray
    bias: np.ndarray
    created_bias: bool
    through: list[str]


def _walk(folder: Any, scope: Any, nb: Any, like: BNLike) -> tuple[Any, list[str]] | tuple:
    """Follow the BN's output through pass-through layers to the one node that consumes it."""
    from torch import nn

    value, through = nb, []
    for _ in range(16):
        users = list(value.users)
        if len(users) != 1:
            what = ", ".join(
                "the forward's output"
                if u.op == "output"
                else _describe_node(u, scope, folder.paths)
                for u in users
            )
            return SkipReason.PRODUCER_OUTPUT_SHARED, f"its output feeds {what or 'nothing'}"
        u = users[0]
        if u.op == "output" or not u.args or u.args[0] is not value:
            return SkipReason.UNSUPPORTED_PRODUCER, (
                f"its output feeds {_describe_node(u, scope, folder.paths)}"
            )
        if u.op == "call_module":
            m = scope.module.get_submodule(u.target)
            if _has_hooks(m):
                return SkipReason.HAS_HOOKS, f"{_describe_node(u, scope, folder.paths)} has hooks"
            if _producer_kind(m) is not None and len(u.args) == 1 and not u.kwargs:
                return u, through
            if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)):
                through.append(type(m).__name__)
            elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                through.append("Flatten")
            elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
                if m.return_indices:
                    return SkipReason.UNSUPPORTED_PRODUCER, "it feeds a MaxPool returning indices"
                if not np.all(like.scale > 0):
                    return SkipReason.NON_POSITIVE_SCALE, (
                        f"its output goes through {type(m).__name__}, which commutes with the BN "
                        f"only where its scale is > 0 ({int(np.sum(like.scale <= 0))} channels "
                        "are not)"
                    )
                through.append(type(m).__name__)
            else:
                return SkipReason.UNSUPPORTED_PRODUCER, (
                    f"its output feeds {_describe_node(u, scope, folder.paths)}"
                )
        elif _is_flatten_1(u):
            through.append("flatten")
        elif (
            u.op == "call_function"
            and getattr(u.target, "__name__", "") in _PASSTHROUGH_FUNCS
            and u.kwargs.get("training", False) is False
            and not (len(u.args) > 2 and u.args[2] is not False)
        ):
            through.append(u.target.__name__)
        else:
            return SkipReason.UNSUPPORTED_PRODUCER, (
                f"its output feeds {_describe_node(u, scope, folder.paths)}"
            )
        value = u
    return SkipReason.UNSUPPORTED_PRODUCER, "too long a chain of layers after it"


def _is_flatten_1(u: Any) -> bool:
    """``torch.flatten(x, 1)`` / ``x.flatten(1)``: [N, C, ...] to [N, C · ...], channel-major."""
    if u.op not in ("call_function", "call_method"):
        return False
    if getattr(u.target, "__name__", u.target) != "flatten":
        return False
    start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
    end = u.args[2] if len(u.args) > 2 else u.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _bn_rank(folder: Any, scope: Any, nb: Any, bn: Any, like: BNLike) -> int | None:
    from torch import nn

    ranks = folder.run.bn_ranks.get(id(bn)) if folder.run is not None else None
    if ranks and len(ranks) == 1:
        return next(iter(ranks))
    if isinstance(bn, nn.BatchNorm2d) or like.kind == "frozen":
        return 4
    if isinstance(bn, nn.BatchNorm3d):
        return 5
    src = nb.args[0] if nb.args else None
    return _static_rank(src, scope.module) if src is not None else None


def match_forward(
    folder: Any, scope: Any, nb: Any, bn: Any, like: BNLike
) -> Forward | tuple[SkipReason, str]:
    """The consumer to fold ``bn`` into, with the fold computed, or why there is none."""
    from torch.fx import Node
    from torch.nn.utils import parametrize

    if like.tail:
        return SkipReason.UNSUPPORTED_PRODUCER, "modules run after its batch_norm"
    walked = _walk(folder, scope, nb, like)
    if not isinstance(walked[0], Node):
        return walked
    node, through = walked
    consumer = scope.module.get_submodule(node.target)
    kind, dims = _producer_kind(consumer)
    path = folder.paths.get(id(consumer), node.target)
    desc = f"{type(consumer).__name__} {path!r}"
    if kind == "conv_transpose":
        return SkipReason.UNSUPPORTED_PRODUCER, f"its output feeds {desc} (a ConvTranspose)"
    if folder.calls.get(id(consumer), 0) != 1 or folder.calls.get(id(bn), 0) != 1:
        return SkipReason.MODULE_REUSED, f"{desc} or the BN is called more than once"
    if folder.run is not None and folder.run.calls.get(id(consumer), 0) != 1:
        return SkipReason.MODULE_REUSED, f"{desc} is called more than once at run time"
    if any(id(t) in folder.attr_tensors for t in (consumer.weight, consumer.bias) if t is not None):
        return SkipReason.MODULE_REUSED, f"the weight of {desc} is also read directly"
    if parametrize.is_parametrized(consumer):
        return SkipReason.UNSUPPORTED_PRODUCER, f"{desc} has a parametrized weight"
    if any(
        t is not None and str(t.dtype) not in _FLOAT_NP for t in (consumer.weight, consumer.bias)
    ):
        return SkipReason.UNSUPPORTED_DTYPE, f"{desc} has a non-float weight or bias"
    c = like.num_features
    rank = _bn_rank(folder, scope, nb, bn, like)
    want = 2 if kind == "linear" else dims + 2
    flattened = any(step in ("Flatten", "flatten") for step in through)
    if flattened:
        if kind != "linear" or rank is None or rank < 2:
            return SkipReason.UNKNOWN_LAYOUT, f"cannot tell what {desc} reads after the flatten"
        reads = int(consumer.in_features)
        if reads % c:
            return (
                SkipReason.SHAPE_MISMATCH,
                f"{desc} reads {reads} features, not a multiple of {c}",
            )
        block = reads // c  # flatten(1) is channel-major: feature c · block + position
        like = BNLike(
            like.kind,
            numerics.repeat_blocks(like.scale, block),
            numerics.repeat_blocks(like.shift, block),
            [],
        )
        return _compute(folder, consumer, node, kind, path, like, through)
    if rank is None:
        return SkipReason.UNKNOWN_LAYOUT, (
            f"cannot tell the rank of the BN's input (pass example_inputs); {desc} needs rank {want}"
        )
    if rank != want:
        return SkipReason.UNSUPPORTED_LAYOUT, (
            f"the BN normalises axis 1 of a rank-{rank} tensor, which is not the input "
            f"{'features' if kind == 'linear' else 'channels'} of {desc}"
        )
    reads = int(consumer.in_features if kind == "linear" else consumer.in_channels)
    if reads != c:
        return SkipReason.SHAPE_MISMATCH, f"the BN has {c} channels but {desc} reads {reads}"
    if kind == "conv" and _pads(consumer) and np.any(like.shift != 0):
        return SkipReason.PADDED_CONSUMER, (
            f"{desc} pads its input ({consumer.padding_mode} padding {consumer.padding}): the BN's "
            "shift would not reach the padded border"
        )
    return _compute(folder, consumer, node, kind, path, like, through)


def _pads(conv: Any) -> bool:
    p = conv.padding
    if isinstance(p, str):
        return p != "valid"
    return any(int(v) != 0 for v in p)


def _compute(
    folder: Any, consumer: Any, node: Any, kind: str, path: str, like: BNLike, through: list[str]
) -> Forward | tuple[SkipReason, str]:
    from ._common import _from_f64

    start = folder.f64.get(id(consumer))
    w = start[0] if start is not None else _f64(consumer.weight)
    b = (
        start[1]
        if start is not None
        else (_f64(consumer.bias) if consumer.bias is not None else None)
    )
    s, t = like.scale, like.shift
    try:
        if kind == "linear":
            w2 = numerics.fold_gemm_input(w, s, trans_b=True)
            delta = numerics.gemm_input_shift(w, t, trans_b=True)
        else:
            groups = int(consumer.groups)
            w2 = numerics.fold_conv_input(w, s, groups)
            delta = numerics.conv_input_shift(w, t, groups)
        b2 = delta if b is None else b + delta
        _from_f64(w2, consumer.weight, "weight")
        _from_f64(b2, consumer.bias if consumer.bias is not None else consumer.weight, "bias")
    except numerics.Refusal as refused:
        return refused.reason, refused.detail
    return Forward(consumer, node, kind, path, w2, b2, b is None, through)
