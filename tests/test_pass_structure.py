"""The fold pass as a reusable onnx_ir pass, and refusals that always carry a SkipReason."""

from __future__ import annotations

import ast
import gc
import pathlib
import weakref

import numpy as np
import onnx_ir as ir
import pytest
from helpers import bn_params, model_from_text

import bnfold
import bnfold.report
from bnfold import numerics
from bnfold.passes import BatchNormFoldPass, FoldPassResult
from bnfold.passes.forward_targets import NoTarget
from bnfold.reasons import Refusal, SkipReason
from bnfold.report import BNDecision

BNFOLD = pathlib.Path(bnfold.__file__).parent
H17 = '<ir_version: 8, opset_import: ["" : 17]>'


def relu_bn_model() -> ir.Model:
    """A BN after a Relu: kept; lowering needs the untyped Relu output's rank and dtype, which only
    shape inference knows (so the run fills its inference cache)."""
    proto = model_from_text(
        f"""{H17}
        g (float[1,4,5,5] x) => (float[1,4,5,5] y) {{
            r = Relu(x)
            y = BatchNormalization(r, scale, B, mean, var)
        }}""",
        bn_params(4),
    )
    return ir.serde.deserialize_model(proto)


def conv_bn_model() -> ir.Model:
    rng = np.random.default_rng(1)
    proto = model_from_text(
        f"""{H17}
        g (float[1,3,5,5] x) => (float[1,4,5,5] y) {{
            c = Conv <pads = [1, 1, 1, 1]> (x, W)
            y = BatchNormalization(c, scale, B, mean, var)
        }}""",
        {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), **bn_params(4)},
    )
    return ir.serde.deserialize_model(proto)


def test_a_reused_pass_holds_no_per_run_state():
    fold_pass = BatchNormFoldPass(lower_remaining=True)
    first_model = relu_bn_model()
    relu_out = weakref.ref(first_model.graph.node(0).outputs[0])
    first = fold_pass(first_model)
    assert [d.direction for d in first.decisions] == ["lowered"]  # inference did run
    del first, first_model
    gc.collect()
    assert relu_out() is None, "the pass keeps the previous model alive"

    second_model = conv_bn_model()
    second = fold_pass(second_model)
    assert isinstance(second, FoldPassResult) and isinstance(second, ir.passes.PassResult)
    assert second.model is second_model and second.modified
    assert [(d.folded, d.direction, d.target_op) for d in second.decisions] == [
        (True, "backward", "Conv")
    ]
    # Options, and the last run's decisions (plain data) for compatibility; nothing else.
    assert set(vars(fold_pass)) == {
        "lower_remaining",
        "duplicate_shared",
        "allow_slower_folds",
        "defer_range_check",
        "known_overflow",
        "decisions",
    }
    assert fold_pass.lower_remaining is True and fold_pass.duplicate_shared is False
    assert fold_pass.decisions == second.decisions
    assert fold_pass.decisions is not second.decisions
    assert all(type(d) is BNDecision for d in fold_pass.decisions)


def test_the_result_carries_the_decisions_of_its_own_run():
    fold_pass = BatchNormFoldPass()
    kept = fold_pass(relu_bn_model())
    folded = fold_pass(conv_bn_model())
    assert [d.reason for d in kept.decisions] == [SkipReason.UNSUPPORTED_PRODUCER]
    assert not kept.modified
    assert [d.folded for d in folded.decisions] == [True]


def test_the_pass_composes_with_other_onnx_ir_passes():
    model = conv_bn_model()
    pipeline = ir.passes.Sequential(BatchNormFoldPass(), BatchNormFoldPass())
    result = pipeline(model)
    assert result.modified and [n.op_type for n in model.graph] == ["Conv"]


def test_a_refusal_needs_a_skip_reason():
    with pytest.raises(TypeError, match="SkipReason"):
        Refusal("shape_mismatch", "a string is not a reason")  # type: ignore[arg-type]
    refusal = Refusal(SkipReason.OVERFLOW, "too large")
    assert refusal.reason is SkipReason.OVERFLOW and str(refusal) == refusal.detail == "too large"
    assert NoTarget("nothing reads it").reason is SkipReason.UNSUPPORTED_PRODUCER
    assert numerics.FoldRefused is Refusal
    assert bnfold.report.SkipReason is SkipReason and bnfold.SkipReason is SkipReason


def test_numerics_refuses_with_the_enum():
    with pytest.raises(Refusal) as info:
        numerics.round_to(np.array([1e6]), np.dtype(np.float16), "W")
    assert info.value.reason is SkipReason.OVERFLOW


def _refusal_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in ("Refusal", "FoldRefused"):
                yield node


def test_every_refusal_in_the_source_names_a_skip_reason_member():
    """Statically: each ``Refusal(...)`` in bnfold passes ``SkipReason.<MEMBER>`` (or a variable that
    holds one, checked at run time by the constructor), never a string literal."""
    calls = members = 0
    for path in sorted(BNFOLD.rglob("*.py")):
        for call in _refusal_calls(ast.parse(path.read_text(encoding="utf-8"))):
            calls += 1
            first = call.args[0] if call.args else None
            where = f"{path.relative_to(BNFOLD)}:{call.lineno}"
            assert first is not None, where
            assert not isinstance(first, ast.Constant), f"{where}: a literal reason"
            assert not isinstance(first, ast.JoinedStr | ast.BinOp), f"{where}: a built reason"
            if (
                isinstance(first, ast.Attribute)
                and isinstance(first.value, ast.Name)
                and first.value.id == "SkipReason"
            ):
                assert first.attr in SkipReason.__members__, f"{where}: SkipReason.{first.attr}"
                members += 1
    assert calls > 50 and members > 50  # the pass and numerics really were scanned


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_the_pass_package_stays_in_small_rooms():
    """No module of the pass over 450 lines and no function over 80 (issue 11)."""
    package = BNFOLD / "passes"
    assert (package / "__init__.py").is_file() and not (BNFOLD / "passes.py").exists()
    for path in sorted(package.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert text.count("\n") <= 450, f"{path.name} has {text.count(chr(10))} lines"
        for fn in _functions(ast.parse(text)):
            length = fn.end_lineno - fn.lineno + 1
            assert length <= 80, f"{path.name}: {fn.name} has {length} lines"


def test_a_graph_attribute_reference_in_a_function_is_walked_past():
    """A function body may hold a reference attribute of graph type (no graph of its own);
    onnx_ir's own subgraph traversal raises on it, the pass skips it."""
    model = conv_bn_model()
    cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    branch = ir.RefAttr("then_branch", "body", ir.AttributeType.GRAPH)
    other = ir.RefAttr("else_branch", "body", ir.AttributeType.GRAPH)
    node = ir.Node("", "If", inputs=[cond], attributes=[branch, other], num_outputs=1, name="if")
    body = ir.Graph([cond], node.outputs, nodes=[node], opset_imports={"": 17}, name="f")
    fn = ir.Function(
        "local", "F", "", graph=body, attributes=[ir.Attr("body", ir.AttributeType.GRAPH, None)]
    )
    model.functions[fn.identifier()] = fn
    with pytest.raises(TypeError):
        list(body.subgraphs())
    result = BatchNormFoldPass()(model)
    assert [d.folded for d in result.decisions] == [True]
