"""TorchScript and ``.pt2`` graphs are code: vet their ops before anything runs them.

Deserialising TorchScript (``torch.jit.load``) or an ExportedProgram runs no Python, but running the
graph does whatever its ops do: ``torch.from_file("/etc/shadow")`` reads any file into a tensor that
ends up in the folded ONNX, ``aten::save`` writes, a custom-namespace op calls into a loaded library,
a Python op calls back into Python. :func:`check_torchscript` and :func:`check_exported_program` walk
every node (every method of every submodule, inlined, every block; every GraphModule of the program)
and refuse, unless the caller trusts the file:

* any op outside the namespaces a model needs (``aten``, ``prim``, ``quantized``; for ExportedPrograms
  also the ``higher_order`` control-flow ops and Python's ``operator`` / ``math`` builtins on sizes);
* the ``aten``/``prim`` ops with file, process or network side effects (:data:`DENIED_OPS`);
* Python ops (``prim::PythonOp``) and, in an ExportedProgram, any callable that is not a torch op.

A refusal is an :class:`~bnfold.errors.UntrustedInputError`, one line, exit 2. torch is imported
lazily, by the caller's objects.
"""

from __future__ import annotations

__all__ = ["DENIED_OPS", "ALLOWED_NAMESPACES", "check_torchscript", "check_exported_program"]

from collections.abc import Iterable, Iterator
from typing import Any

from bnfold.errors import UntrustedInputError

#: op namespaces a model's graph may use
ALLOWED_NAMESPACES = frozenset({"aten", "prim", "quantized"})
#: ops inside those namespaces with effects outside the tensors they compute
DENIED_OPS = frozenset(
    {
        "aten::from_file",
        "aten::save",
        "aten::_save",
        "aten::load",
        "aten::_load",
        "aten::_load_for_mobile",
        "aten::_use_cudnn_rnn_flatten_weight",
        "aten::set_num_threads",
        "aten::set_num_interop_threads",
        "aten::manual_seed",
        "aten::_assert_async",
        "aten::_print",
        "aten::_set_torch_function_state",
        "prim::PythonOp",
        "prim::Print",
        "prim::rpc_async",
        "prim::rpc_sync",
        "prim::rpc_remote",
        "prim::Store",
        "prim::Load",
        "prim::profile",
        "prim::profile_ivalue",
        "prim::CudaFusionGroup",
        "prim::FusionGroup",
    }
)
_HIGHER_ORDER_ALLOWED = frozenset({"cond", "while_loop", "map_impl", "scan", "auto_functionalized"})


def _refuse(where: str, op: str, why: str) -> UntrustedInputError:
    return UntrustedInputError(
        f"{where}: the graph calls {op} ({why}); bnfold does not run graphs with file, process or "
        "network effects. If you trust the file, pass --trust-pickle (Python: trust_pickle=True)"
    )


def _judge(kind: str) -> str | None:
    """Why op ``kind`` (``ns::name``) is refused, or None."""
    if kind in DENIED_OPS:
        return "an op with side effects"
    namespace = kind.split("::", 1)[0] if "::" in kind else ""
    if namespace not in ALLOWED_NAMESPACES:
        return f"namespace {namespace or '<none>'!r} is not one a model needs"
    return None


def _blocks_nodes(nodes: Iterable[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _blocks_nodes(block.nodes())


def _script_graphs(module: Any) -> Iterator[tuple[str, Any]]:
    """(qualified method name, inlined graph) of every method of every submodule."""
    import torch

    seen: set[int] = set()
    mods = module.named_modules() if hasattr(module, "named_modules") else [("", module)]
    for prefix, sub in mods:
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        c = getattr(sub, "_c", None)
        names = c._method_names() if c is not None and hasattr(c, "_method_names") else []
        for name in names:
            method = c._get_method(name)
            graph = method.graph.copy()
            try:
                torch._C._jit_pass_inline(graph)
            except Exception:  # noqa: BLE001 - keep the un-inlined graph; calls are refused below
                pass
            yield f"{prefix + '.' if prefix else ''}{name}", graph
    if hasattr(module, "graph") and not hasattr(module, "_c"):  # a ScriptFunction
        yield getattr(module, "name", "function"), module.inlined_graph


def check_torchscript(module: Any, where: str, *, trust: bool = False) -> int:
    """Refuse a TorchScript module whose code has side effects; returns the number of nodes seen."""
    if trust:
        return 0
    count = 0
    for method, graph in _script_graphs(module):
        for node in _blocks_nodes(graph.nodes()):
            count += 1
            kind = node.kind()
            if kind in ("prim::CallFunction", "prim::CallMethod"):
                why = "a call bnfold could not inline and vet"
            else:
                why = _judge(kind)
            if why is not None:
                raise _refuse(where, f"{kind} in {method}", why)
    return count


def _target_name(target: Any) -> tuple[str, str | None]:
    """(display name, refusal reason or None) of an FX call_function target."""
    import operator

    import torch

    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        ns = getattr(target, "namespace", "") or ""
        name = getattr(target, "_schema", None)
        op = f"{ns}::{name.name.split('::', 1)[-1]}" if name is not None else f"{ns}::{target}"
        return op, _judge(op)
    if isinstance(target, torch._ops.HigherOrderOperator):
        op = f"higher_order::{target.name()}"
        if target.name() in _HIGHER_ORDER_ALLOWED:
            return op, None
        return op, "a higher-order op bnfold does not vet"
    module = getattr(target, "__module__", "") or ""
    qual = f"{module}.{getattr(target, '__name__', repr(target))}"
    if module in ("_operator", "operator", "math") or target in vars(operator).values():
        return qual, None
    if module.startswith("torch") and qual.rsplit(".", 1)[-1].startswith("sym_"):
        return qual, None  # torch.sym_int, sym_max...: arithmetic on sizes
    return qual, "a Python callable, not a torch op"


def check_exported_program(ep: Any, where: str, *, trust: bool = False) -> int:
    """Refuse an ExportedProgram whose graph (or a subgraph) calls ops with side effects."""
    if trust:
        return 0
    import torch

    count = 0
    gm = ep.graph_module
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            count += 1
            if node.op == "call_function":
                op, why = _target_name(node.target)
                if why is not None:
                    raise _refuse(where, op, why)
            elif node.op in ("call_method", "call_module"):
                raise _refuse(where, f"{node.op} {node.target}", "not an op of an exported graph")
    return count
