"""Graph surgery shared by every fold: new constants, bypassing a BN, copies, clean-up, names.

- :func:`const_input`: a new constant goes into the graph that reads it: an initializer of the main
  graph (also a graph input in IR < 4) or of an IR ≥ 4 subgraph; a ``Constant`` node in a function
  or an IR < 4 subgraph (functions have no initializers; IR < 4 initializers must be graph inputs).
- :func:`set_input`, :func:`append_add`: give a node a private new constant; add ``Add(out, c)``.
- :func:`take_over_output`: when a removed value was a graph output, the value that replaces it
  takes over its name, type and shape (the model's interface does not change).
- :func:`bypass`: remove a BN, its readers read the folded producer's output instead.
- :func:`duplicate`: copy a producer for ``duplicate_shared`` (undone if the fold is refused).
- :func:`remove_dead`: initializers and constant-computing nodes left without users go.
- :func:`restore_names`: a folded weight takes back the name of the tensor it replaced.
"""

from __future__ import annotations

import onnx_ir as ir

from .common import CONST_OPS, STD, copy_attr
from .context import FoldContext


def const_input(ctx: FoldContext, tensor: ir.TensorProtocol, user: ir.Node) -> ir.Value:
    """A value holding ``tensor`` that ``user`` can read (see the module docstring)."""
    graph = user.graph
    if graph is ctx.main or (id(graph) not in ctx.function_graphs and ctx.ir_version >= 4):
        value = ir.Value(
            name=tensor.name,
            shape=tensor.shape,
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        graph.register_initializer(value)
        if graph is ctx.main:
            ctx.created.append(value)
            if ctx.ir_version < 4:
                graph.inputs.append(value)
        return value
    value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
    node = ir.Node(
        "",
        "Constant",
        inputs=[],
        attributes=[ir.AttrTensor("value", tensor)],
        outputs=[value],
        name=ctx.fresh(f"{tensor.name}_constant"),
    )
    graph.insert_before(user, node)
    return value


def set_input(ctx: FoldContext, node: ir.Node, index: int, tensor: ir.TensorProtocol) -> None:
    """Give ``node`` a new private constant at ``index``; the old input is freed if unused."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if index >= len(node.inputs):
        # Extend optional inputs (e.g. create the bias of a Conv that has none).
        node.resize_inputs(index + 1)
    value = const_input(ctx, tensor, node)
    node.replace_input_with(index, value)
    if old is not None:
        ctx.dead_candidates.append(old)
        ctx.replaced.append((value, old))


def take_over_output(ctx: FoldContext, old: ir.Value, new: ir.Value, suffix: str) -> None:
    """If ``old`` is a graph output, ``new`` takes over its name, type and shape (``old`` gets a
    fresh ``<name><suffix>``), so the model's interface stays as it was. Rewiring is the caller's."""
    if not old.is_graph_output():
        return
    name = old.name
    old.name = ctx.fresh(f"{name}{suffix}")
    new.name = name
    new.type = old.type
    new.shape = old.shape


def append_add(ctx: FoldContext, node: ir.Node, tensor: ir.TensorProtocol) -> ir.Value:
    """Insert ``Add(out, tensor)`` after ``node`` and make every reader of its output (graph outputs
    included) read the sum instead; return the sum."""
    out = node.outputs[0]
    uses = list(out.uses())
    add_out = ir.Value(
        name=ctx.fresh(f"{out.name or 'out'}_biased"), type=out.type, shape=out.shape
    )
    add = ir.Node(
        "",
        "Add",
        inputs=[out, None],
        outputs=[add_out],
        name=ctx.fresh(f"{node.name or node.op_type}_bias_add"),
    )
    graph = node.graph
    graph.insert_after(node, add)
    add.replace_input_with(1, const_input(ctx, tensor, add))
    for use in uses:
        use.node.replace_input_with(use.idx, add_out)
    if out.is_graph_output():
        take_over_output(ctx, out, add_out, "_unbiased")
        for i, o in enumerate(graph.outputs):
            if o is out:
                graph.outputs[i] = add_out
    return add_out


def bypass(ctx: FoldContext, bn: ir.Node, producer_out: ir.Value) -> None:
    """Remove ``bn`` and make its consumers (and graph outputs) read ``producer_out``."""
    y = bn.outputs[0]
    take_over_output(ctx, y, producer_out, "_bn_removed")
    y.replace_all_uses_with(producer_out, replace_graph_outputs=True)
    remove_nodes(ctx, [bn], keep=bn.inputs[0])


def remove_nodes(ctx: FoldContext, nodes: list[ir.Node], keep: ir.Value | None) -> None:
    """Remove ``nodes`` (nothing reads them any more) from their graph; every input of theirs but
    ``keep`` (the data that now flows past them) may be left dead."""
    freed = [v for n in nodes for v in n.inputs if v is not None and v is not keep]
    nodes[0].graph.remove(nodes, safe=True)
    ctx.dead_candidates.extend(freed)


def duplicate(ctx: FoldContext, node: ir.Node, user: ir.Node, index: int) -> ir.Node:
    """A copy of ``node`` that only ``user`` (at input ``index``) reads; undone if the fold fails."""
    old = user.inputs[index]
    outputs = [
        ir.Value(name=ctx.fresh(f"{o.name or 'out'}_copy"), type=o.type, shape=o.shape)
        for o in node.outputs
    ]
    copy = ir.Node(
        node.domain,
        node.op_type,
        inputs=list(node.inputs),
        attributes=[copy_attr(a) for a in node.attributes.values()],
        outputs=outputs,
        name=ctx.fresh(f"{node.name or node.op_type}_copy"),
    )
    graph = node.graph
    graph.insert_after(node, copy)
    user.replace_input_with(index, outputs[list(node.outputs).index(old)])

    def undo() -> None:
        user.replace_input_with(index, old)
        graph.remove(copy, safe=True)

    ctx.undo.append(undo)
    return copy


def remove_dead(ctx: FoldContext) -> None:
    """Remove initializers and constant-computing nodes that the folds left without users."""
    stack = list(ctx.dead_candidates)
    while stack:
        v = stack.pop()
        if v is None or v.uses() or v.is_graph_output():
            continue
        graph = v.graph
        if v.is_initializer() and graph is not None:
            if v.is_graph_input():
                if ctx.ir_version >= 4 or graph is not ctx.main:
                    continue  # part of the caller's contract
                graph.inputs.remove(v)
            graph.initializers.pop(v.name, None)
            continue
        producer = v.producer()
        if (
            producer is not None
            and producer.graph is not None
            and producer.domain in STD
            and producer.op_type in CONST_OPS
            and all(not o.uses() and not o.is_graph_output() for o in producer.outputs)
        ):
            inputs = [i for i in producer.inputs if i is not None]
            producer.graph.remove(producer, safe=True)
            stack.extend(inputs)
    ctx.dead_candidates.clear()


def restore_names(ctx: FoldContext) -> None:
    """A folded weight takes back the name of the tensor it replaced once that one is gone, so
    tools that refer to weights by name (quantization overrides, diffs) still find them.
    Chains (a weight folded twice) go back to the first original."""
    replaced_by = {id(new): old for new, old in ctx.replaced}
    taken: set[str] = set()
    for new, _ in ctx.replaced:
        producer = new.producer()
        if producer is not None:  # a Constant node's output
            if producer.graph is None or not new.uses():
                continue
            graph = producer.graph
        elif new.is_initializer() and new.graph is not None:
            graph = new.graph
        else:
            continue  # itself replaced by a later fold
        root = replaced_by[id(new)]
        while id(root) in replaced_by:
            root = replaced_by[id(root)]
        name = root.name
        if not name or not _gone(root) or name in taken or name in graph.initializers:
            continue
        taken.add(name)
        if producer is None:
            graph.initializers.pop(new.name)
            new.name = name
            graph.initializers[name] = new
            if new.const_value is not None:
                new.const_value.name = name
        else:
            new.name = name
    ctx.replaced.clear()


def _gone(value: ir.Value) -> bool:
    """Whether ``value`` left the model (so its name is free)."""
    producer = value.producer()
    return (
        not value.uses()
        and not value.is_initializer()
        and not value.is_graph_input()
        and not value.is_graph_output()
        and (producer is None or producer.graph is None)
    )
