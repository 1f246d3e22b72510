"""``fold_module``'s decisions, one BatchNorm call site at a time, and their application: in place
(new Parameters on the producer, the BN replaced by Identity) or at the call site (the root's fx
graph rewritten to use a folded private copy of the producer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold import numerics
from bnfold.report import BNDecision, SkipReason

from ._common import (
    _FLOAT_NP,
    _f64,
    _from_f64,
    _has_hooks,
    _join,
    _looks_like_producer,
    _producer_kind,
)
from ._concat import Concat, is_channel_cat, match_concat
from ._forward import Forward, match_forward
from ._scopes import _describe_node, _Run, _Scope, _static_rank
from .bn_like import BNLike, Recognizer


@dataclass
class _Folded:
    weight: np.ndarray  # float64
    bias: np.ndarray  # float64
    created_bias: bool


def _compute_fold(
    prod: Any, kind: str, like: BNLike, start: tuple[np.ndarray, np.ndarray | None] | None
) -> _Folded:
    """Folded (weight, bias) in float64; ``start`` is the float64 state of an earlier fold."""
    s, t = like.scale, like.shift
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


def _fold_scopes(
    root: Any,
    scopes: list[_Scope],
    paths: dict[int, str],
    run: _Run | None,
    *,
    rewrite: bool,
    recognizer: Recognizer,
) -> tuple[list[BNDecision], Any]:
    """Decide and apply every fold; return the decisions (in module order) and the new root."""
    folder = _Folder(root, scopes, paths, run, rewrite=rewrite, recognizer=recognizer)
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
    like: BNLike
    out: Any = None  # the node whose value replaces the BN's (the flatten after a Linear)

    @property
    def value(self) -> Any:
        return self.out if self.out is not None else self.src


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
        recognizer: Recognizer,
    ) -> None:
        self.rec = recognizer
        self.decided: set[int] = set()  # ids of the BNs with a decision per call site
        self.replacement: dict[int, Any] = {}  # BN id -> what replaces it once folded
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
                    if self.rec.is_site(m):
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
        self.decided.add(id(bn))
        k = self.site_index[id(bn)] = self.site_index.get(id(bn), 0) + 1
        n = self.site_total[id(bn)]
        bn_path = self.paths.get(id(bn), _join(scope.path, nb.target))
        name = bn_path if n == 1 else f"{bn_path} (call {k} of {n})"
        key = (self.order.get(id(bn), 1 << 30), k)
        pair = self._match(scope, nb, bn, bn_path)
        if not isinstance(pair, _Pair):
            reason, detail = pair
            src = nb.args[0] if nb.args else None
            if reason is SkipReason.UNSUPPORTED_PRODUCER and is_channel_cat(src):
                like = self.rec.classify(bn)
                cat = match_concat(self, scope, src, bn, like)
                if isinstance(cat, Concat):
                    self._fold_concat(scope, nb, bn, cat, like)
                    self.decisions.append((key, _concat_decision(name, bn, cat, like)))
                    return
                reason, detail = cat
            if reason in _TRY_FORWARD:
                fwd = match_forward(self, scope, nb, bn, self.rec.classify(bn))
                if isinstance(fwd, Forward):
                    self._fold_forward(scope, nb, bn, fwd)
                    self.decisions.append((key, _forward_decision(name, fwd)))
                    return
                reason, detail = _kept_why(reason, detail, fwd)
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

        opaque = scope.opaque_caller
        if opaque is not None and self.run is None:
            return SkipReason.NOT_TRACEABLE, (
                f"{type(scope.module).__name__} {scope.path!r} is called by {type(opaque.module).__name__} "
                f"{opaque.path or '<root>'!r}, whose forward torch.fx cannot trace ({opaque.error}); that "
                "code might call these layers directly: pass example_inputs so bnfold counts the real calls"
            )
        like = self.rec.classify(bn)
        if isinstance(like, str):
            return SkipReason.CUSTOM_FORWARD, like
        if _has_hooks(bn):
            return SkipReason.HAS_HOOKS, f"{type(bn).__name__} {bn_path!r} has forward hooks"
        src = nb.args[0] if nb.args else nb.kwargs.get("input")
        if not isinstance(src, Node) or src.op in ("placeholder", "get_attr"):
            return SkipReason.NO_PRODUCER, f"its input is {_describe_node(src, scope, self.paths)}"
        flat = src if _is_flatten_01(src) and len(src.users) == 1 else None
        if flat is not None and isinstance(flat.args[0], Node):
            src = flat.args[0]  # LeViT: Linear [B, T, C] -> flatten(0, 1) -> BatchNorm1d
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
        value_users = [u for u in src.users if not _reads_shape_only(u, src)]
        if len(value_users) != 1:
            others = [
                _describe_node(u, scope, self.paths) if u.op != "output" else "the forward's output"
                for u in value_users
                if u is not nb and u is not flat
            ]
            return (
                SkipReason.PRODUCER_OUTPUT_SHARED,
                f"the output of {desc} is also used by {', '.join(others)}",
            )
        refused = _producer_refusal(prod, desc)
        if refused is not None:
            return refused
        c_out = _out_features(prod, kind)
        if c_out != like.num_features:
            return (
                SkipReason.SHAPE_MISMATCH,
                f"{type(bn).__name__} has {like.num_features} channels but {desc} produces {c_out}",
            )
        layout = (
            self._flatten_refusal(bn, kind, desc)
            if flat is not None
            else self._layout_refusal(scope, src, bn, kind, dims, desc)
        )
        if layout is not None:
            return layout
        try:
            folded = _compute_fold(prod, kind, like, self.f64.get(id(prod)))
            # Round now, so that an overflow is refused before anything changes.
            _from_f64(folded.weight, prod.weight, "weight")
            _from_f64(folded.bias, prod.bias if prod.bias is not None else prod.weight, "bias")
        except numerics.FoldRefused as refused:
            return SkipReason(refused.reason), refused.detail
        return _Pair(src, prod, kind, prod_path, desc, folded, like, flat)

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

    def _flatten_refusal(self, bn: Any, kind: str, desc: str) -> tuple[SkipReason, str] | None:
        """Linear -> flatten(0, 1) -> BN: folds when the Linear's output is [B, T, C] (so the BN
        sees [B·T, C] and normalises the Linear's features), which the BN's input rank 2 shows."""
        ranks = self.run.bn_ranks.get(id(bn)) if self.run is not None else None
        if kind != "linear":
            return SkipReason.UNSUPPORTED_LAYOUT, f"flatten(0, 1) after {desc} mixes its axes"
        if not ranks:
            return SkipReason.UNKNOWN_LAYOUT, (
                f"cannot tell whether flatten(0, 1) of the output of {desc} leaves its features on "
                "axis 1; pass example_inputs"
            )
        if ranks != {2}:
            return SkipReason.UNSUPPORTED_LAYOUT, (
                f"{type(bn).__name__} sees a rank-{max(ranks)} tensor after flatten(0, 1): it "
                f"normalises another axis than {desc}'s features"
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
        detail += _like_note(bn, pair.like)
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
        self.replacement[id(bn)] = _tail_module(pair.like)
        if not pair.like.tail:
            nb.replace_all_uses_with(pair.value)
            scope.graph.erase_node(nb)
        self.in_place_bns.append(bn)

    def _fold_concat(self, scope: _Scope, nb: Any, bn: Any, cat: Concat, like: BNLike) -> None:
        for m, _path, w, b, created in cat.convs:
            _apply(m, _Folded(w, b, created))
            self.f64[id(m)] = (w, b)
        self.replacement[id(bn)] = _tail_module(like)
        if not like.tail:
            nb.replace_all_uses_with(cat.cat)
            scope.graph.erase_node(nb)
        self.in_place_bns.append(bn)

    def _fold_forward(self, scope: _Scope, nb: Any, bn: Any, fwd: Forward) -> None:
        _apply(fwd.consumer, _Folded(fwd.weight, fwd.bias, fwd.created_bias))
        self.f64[id(fwd.consumer)] = (fwd.weight, fwd.bias)
        self.replacement[id(bn)] = _tail_module(self.rec.classify(bn))
        nb.replace_all_uses_with(nb.args[0])
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
        if pair.like.tail:  # this call now runs the kept tail, a private module
            tail_name = f"{new_name}_tail"
            scope.copies[tail_name] = _tail_module(pair.like)
            nb.target = tail_name
        else:
            nb.replace_all_uses_with(pair.value)
            scope.graph.erase_node(nb)
        self.replacement.setdefault(id(bn), _tail_module(pair.like))
        scope.rewritten = True
        self.rewritten_bns[id(bn)] = bn
        return self.paths[id(private)]

    # --- BNs no traced graph calls, and the result -------------------------------------------------

    def decide_unreached(self) -> None:
        decided = self.decided
        owner: dict[int, _Scope] = {}  # child id -> the untraceable scope that calls it directly
        for s in self.scopes:
            if s.graph is None:
                for child in s.module.children():
                    owner.setdefault(id(child), s)
        for path, m in self.root.named_modules():
            if not self.rec.is_site(m) or id(m) in decided:
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
            _replace_everywhere(new_root, bn, self.replacement.get(id(bn)) or nn.Identity())
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


def _tail_module(like: BNLike) -> Any:
    """What runs in place of a folded BN: nothing (Identity), its one tail module, or a Sequential."""
    from torch import nn

    kept = [m for _, m in like.tail if type(m) is not nn.Identity]
    if not kept:
        return nn.Identity()
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)


def _like_note(bn: Any, like: BNLike) -> str:
    """What the decision adds for a BN that is not torch's own BatchNorm."""
    name = type(bn).__name__
    if like.kind == "batchnorm+tail":
        kept = ", ".join(f"{n} ({type(m).__name__})" for n, m in like.tail)
        return f"; {name}'s batch_norm folded, the modules it runs after it kept: {kept}"
    if like.kind == "frozen":
        return f"; {name} is a frozen BatchNorm (fixed affine from its buffers)"
    if like.kind == "registered":
        return f"; {name} folded with its registered affine (register_bn_like / bn_like)"
    return ""


# A BN without a foldable producer may still fold into what consumes its output.
_TRY_FORWARD = (
    SkipReason.NO_PRODUCER,
    SkipReason.UNSUPPORTED_PRODUCER,
    SkipReason.PRODUCER_OUTPUT_SHARED,
)
# Forward refusals that say more than "the producer is not foldable".
_FORWARD_REASONS = (
    SkipReason.PADDED_CONSUMER,
    SkipReason.NON_POSITIVE_SCALE,
    SkipReason.UNKNOWN_LAYOUT,
    SkipReason.UNSUPPORTED_LAYOUT,
    SkipReason.MODULE_REUSED,
)


def _kept_why(
    reason: SkipReason, detail: str, fwd: tuple[SkipReason, str]
) -> tuple[SkipReason, str]:
    f_reason, f_detail = fwd
    if f_reason in _FORWARD_REASONS:
        return f_reason, f"forward: {f_detail}; backward: {detail}"
    return reason, f"{detail}; forward: {f_detail}"


def _forward_decision(name: str, fwd: Forward) -> BNDecision:
    axis = "features" if fwd.kind == "linear" else "channels"
    via = f" (through {', '.join(fwd.through)})" if fwd.through else ""
    what_bias = "bias created" if fwd.created_bias else "bias updated"
    return BNDecision(
        name=name,
        folded=True,
        direction="forward",
        target=fwd.path,
        target_op=type(fwd.consumer).__name__,
        detail=f"folded into the layer after it{via}: weight scaled along its input {axis}; "
        f"{what_bias}",
    )


def _producer_refusal(prod: Any, desc: str) -> tuple[SkipReason, str] | None:
    """Hooks, a parametrized weight or a non-float dtype on the producer."""
    from torch.nn.utils import parametrize

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
    return None


def _is_flatten_01(node: Any) -> bool:
    """``x.flatten(0, 1)`` / ``torch.flatten(x, 0, 1)``."""
    if node.op not in ("call_method", "call_function"):
        return False
    if getattr(node.target, "__name__", node.target) != "flatten":
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 0 and end == 1


_SHAPE_METHODS = {"reshape_as", "view_as", "expand_as"}


def _reads_shape_only(user: Any, value: Any) -> bool:
    """``y.reshape_as(value)`` (value as the template), ``value.size()``, ``value.shape``, ``.ndim``."""
    if user.op == "call_method" and user.target in _SHAPE_METHODS:
        return len(user.args) > 1 and user.args[1] is value and user.args[0] is not value
    if user.op == "call_method" and user.target in ("size", "dim"):
        return True
    return (
        user.op == "call_function"
        and getattr(user.target, "__name__", "") == "getattr"
        and len(user.args) > 1
        and user.args[1] in ("shape", "ndim", "dtype", "device")
    )


def _concat_decision(name: str, bn: Any, cat: Concat, like: BNLike) -> BNDecision:
    slices = ", ".join(f"{path!r}" for _, path, *_ in cat.convs)
    return BNDecision(
        name=name,
        folded=True,
        direction="backward",
        target=", ".join(path for _, path, *_ in cat.convs),
        target_op=type(cat.convs[0][0]).__name__,
        detail=f"split by channel slices over the concatenated Convs {slices}: each weight "
        f"scaled along its output channels, bias updated{_like_note(bn, like)}",
    )
