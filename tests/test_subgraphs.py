"""BNs inside If/Loop/Scan bodies and model-local functions fold like those of the main graph.

Values a body reads from an enclosing scope are constants when they are constants there; a BN whose
parameter is a body or function input, or whose producer is in an enclosing graph, is kept
(``in_subgraph``). New constants go into the graph that uses them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from foldchecks import all_nodes, assert_equivalent, assert_folded, count_all, fold_checked
from helpers import assert_kept, bn_params, lit, model_from_text, randn, random_feeds

from bnfold.report import SkipReason

H17 = '<ir_version: 8, opset_import: ["" : 17]>'


def subgraph(model: onnx.ModelProto, node_index: int, attr: str) -> onnx.GraphProto:
    node = model.graph.node[node_index]
    return next(a.g for a in node.attribute if a.name == attr)


IF_MODEL = f"""{H17}
    g (bool cond, float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
        [branch] Y = If (cond) <
            then_branch = then_g () => (float[2,6,5,5] t) {{
                c = Conv <pads = [1, 1, 1, 1]> (X, W)
                [bn_then] t = BatchNormalization (c, scale, B, mean, var)
            }},
            else_branch = else_g () => (float[2,6,5,5] e) {{
                e = Conv <pads = [1, 1, 1, 1]> (X, W2)
            }}
        >
    }}"""


def test_if_branch():
    model = model_from_text(
        IF_MODEL, {"W": randn(6, 4, 3, 3, seed=1), "W2": randn(6, 4, 3, 3, seed=2), **bn_params(6)}
    )

    result = assert_folded(model, "backward")

    (d,) = result.decisions
    assert d.graph == "branch/then_branch" and d.name == "bn_then"
    then_g = subgraph(result.model, 0, "then_branch")
    assert [n.op_type for n in then_g.node] == ["Conv"]
    assert {i.name for i in then_g.initializer} == set(then_g.node[0].input[1:]), (
        "new constants live in the branch"
    )
    assert [i.name for i in result.model.graph.initializer] == ["W2"], (
        "W and the BN parameters are gone"
    )
    for cond in (True, False):
        feeds = {**random_feeds(model), "cond": np.array(cond)}
        assert_equivalent(model, result.model, feeds=feeds)


def test_if_branch_ir3_uses_constant_nodes():
    # In IR < 4 every initializer must be a graph input, which a branch cannot have: Constant nodes.
    text = IF_MODEL.replace(H17, '<ir_version: 3, opset_import: ["" : 7]>')
    model = model_from_text(
        text, {"W": randn(6, 4, 3, 3, seed=1), "W2": randn(6, 4, 3, 3, seed=2), **bn_params(6)}
    )

    result = assert_folded(model, "backward")

    then_g = subgraph(result.model, 0, "then_branch")
    assert [n.op_type for n in then_g.node] == ["Constant", "Constant", "Conv"]
    assert not then_g.initializer


def test_outer_weight_shared_with_the_main_graph_is_not_touched():
    model = model_from_text(
        f"""{H17}
        g (bool cond, float[2,4,5,5] X) => (float[2,6,5,5] Y, float[2,6,5,5] Z) {{
            Z = Conv <pads = [1, 1, 1, 1]> (X, W)
            Y = If (cond) <
                then_branch = then_g () => (float[2,6,5,5] t) {{
                    c = Conv <pads = [1, 1, 1, 1]> (X, W)
                    t = BatchNormalization (c, scale, B, mean, var)
                }},
                else_branch = else_g () => (float[2,6,5,5] e) {{
                    e = Identity (Z)
                }}
            >
        }}""",
        {"W": randn(6, 4, 3, 3, seed=1), **bn_params(6)},
    )
    result = assert_folded(model, "backward")
    assert result.model.graph.node[0].input[1] == "W"
    assert "W" in {i.name for i in result.model.graph.initializer}


LOOP = f"""{H17}
    g (int64 M, bool cond, float[2,4,5,5] S0) => (float[2,4,5,5] S) {{
        [loop] S = Loop (M, cond, S0) <
            body = body_g (int64 i, bool c_in, float[2,4,5,5] s_in) => (bool c_out, float[2,4,5,5] s_out) {{
                c_out = Identity (c_in)
                c = Conv <pads = [1, 1, 1, 1]> (s_in, W)
                [bn_body] b = BatchNormalization (c, scale, B, mean, VAR)
                s_out = Relu (b)
            }}
        >
    }}"""


def test_loop_body():
    model = model_from_text(
        LOOP.replace("VAR", "var"),
        {"W": (randn(4, 4, 3, 3, seed=1) * 0.3).astype(np.float32), **bn_params(4)},
    )
    feeds = {"M": np.array(3, np.int64), "cond": np.array(True), "S0": randn(2, 4, 5, 5, seed=5)}

    result = assert_folded(model, "backward", feeds=feeds)

    assert result.decisions[0].graph == "loop/body"
    assert count_all(result.model, "BatchNormalization") == 0


def test_loop_carried_parameter_kept():
    # The BN's var is a loop-carried value: an input of the body, different in every iteration.
    model = model_from_text(
        f"""{H17}
        g (int64 M, bool cond, float[2,4,5,5] S0, float[4] V0) => (float[2,4,5,5] S, float[4] V) {{
            S, V = Loop (M, cond, S0, V0) <
                body = body_g (int64 i, bool c_in, float[2,4,5,5] s_in, float[4] v_in)
                              => (bool c_out, float[2,4,5,5] s_out, float[4] v_out) {{
                    c_out = Identity (c_in)
                    v_out = Identity (v_in)
                    c = Conv <pads = [1, 1, 1, 1]> (s_in, W)
                    s_out = BatchNormalization (c, scale, B, mean, v_in)
                }}
            >
        }}""",
        {"W": randn(4, 4, 3, 3, seed=1), **{k: v for k, v in bn_params(4).items() if k != "var"}},
    )
    feeds = {
        "M": np.array(2, np.int64),
        "cond": np.array(True),
        "S0": randn(2, 4, 5, 5, seed=5),
        "V0": np.full(4, 0.5, np.float32),
    }
    result = assert_kept(model, SkipReason.IN_SUBGRAPH, run=None)
    assert "v_in" in result.decisions[0].detail and "Loop" in result.decisions[0].detail
    assert_equivalent(model, result.model, feeds=feeds)


def test_scan_body():
    model = model_from_text(
        f"""{H17}
        g (float[2] init, float[3,2,6] xs) => (float[2] last, float[3,2,4] ys) {{
            last, ys = Scan (init, xs) <
                num_scan_inputs = 1,
                body = body_g (float[2] st_in, float[2,6] x) => (float[2] st_out, float[2,4] y) {{
                    st_out = Identity (st_in)
                    h = Gemm <transB = 1> (x, W, b)
                    y = BatchNormalization (h, scale, B, mean, var)
                }}
            >
        }}""",
        {"W": randn(4, 6, seed=1), "b": randn(4, seed=2), **bn_params(4)},
    )
    result = assert_folded(model, "backward")
    assert result.decisions[0].target_op == "Gemm"


def test_nested_if_in_loop_forward_fold():
    model = model_from_text(
        f"""{H17}
        g (int64 M, bool cond, float[2,4,5,5] S0) => (float[2,4,5,5] S) {{
            S = Loop (M, cond, S0) <
                body = body_g (int64 i, bool c_in, float[2,4,5,5] s_in) => (bool c_out, float[2,4,5,5] s_out) {{
                    c_out = Identity (c_in)
                    s_out = If (c_in) <
                        then_branch = then_g () => (float[2,4,5,5] t) {{
                            r = Relu (s_in)
                            n = BatchNormalization (r, scale, B, mean, var)
                            t = Conv <pads = [1, 1, 1, 1]> (n, W)
                        }},
                        else_branch = else_g () => (float[2,4,5,5] e) {{
                            e = Identity (s_in)
                        }}
                    >
                }}
            >
        }}""",
        {"W": (randn(4, 4, 3, 3, seed=1) * 0.3).astype(np.float32), **bn_params(4)},
    )
    feeds = {"M": np.array(2, np.int64), "cond": np.array(True), "S0": randn(2, 4, 5, 5, seed=5)}

    result = assert_folded(model, "forward", feeds=feeds, allow_slower_folds=True)

    assert result.decisions[0].graph.endswith("then_branch")
    assert [n.op_type for n in all_nodes(result.model) if n.op_type in ("Conv", "Add")] == [
        "Conv",
        "Add",
    ]


def test_main_graph_bn_read_inside_a_branch_kept():
    model = model_from_text(
        f"""{H17}
        g (bool cond, float[2,4,5,5] x) => (float[2,6,5,5] Y) {{
            y = BatchNormalization (x, scale, B, mean, var)
            Y = If (cond) <
                then_branch = then_g () => (float[2,6,5,5] t) {{
                    t = Conv (y, W)
                }},
                else_branch = else_g () => (float[2,6,5,5] e) {{
                    e = Conv (y, W)
                }}
            >
        }}""",
        {"W": randn(6, 4, 1, 1, seed=1), **bn_params(4)},
    )
    result = assert_kept(model, SkipReason.NO_PRODUCER)
    assert "subgraph" in result.decisions[0].detail


# ============================================================================================ functions
def function_model(body: str, inits=None) -> onnx.ModelProto:
    p = bn_params(6)
    w = randn(6, 4, 3, 3, seed=1)
    return model_from_text(
        f"""<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            Y = local.Block (X)
        }}
        <domain: "local", opset_import: ["" : 17]>
        Block (x) => (y) {{
            w = Constant <value = {lit(w)}> ()
            s = Constant <value = {lit(p["scale"])}> ()
            b = Constant <value = {lit(p["B"])}> ()
            m = Constant <value = {lit(p["mean"])}> ()
            v = Constant <value = {lit(p["var"])}> ()
            {body}
        }}""",
        inits,
    )


def test_function_backward():
    model = function_model("""c = Conv <pads = [1, 1, 1, 1]> (x, w)
            y = BatchNormalization (c, s, b, m, v)""")

    result = assert_folded(model, "backward")

    (fn,) = result.model.functions
    assert result.decisions[0].graph == "function local::Block"
    assert [n.op_type for n in fn.node] == ["Constant", "Constant", "Conv"], (
        "functions get Constant nodes"
    )
    assert not result.model.graph.initializer


@pytest.mark.parametrize("shift", ["zero", "nonzero"])
def test_function_forward(shift):
    # Inside a function shapes are unknown, so a padded Conv takes a forward fold only when the
    # BN's shift is zero (nothing to compensate at the border).
    b4, m4 = (
        ("0.0, 0.0, 0.0, 0.0",) * 2
        if shift == "zero"
        else ("0.1, -0.2, 0.3, 0.0", "0.5, 0.5, -1.0, 0.0")
    )
    model = function_model(f"""s4 = Constant <value = float[4] {{1.5, 0.5, 1.0, 2.0}}> ()
            b4 = Constant <value = float[4] {{{b4}}}> ()
            m4 = Constant <value = float[4] {{{m4}}}> ()
            v4 = Constant <value = float[4] {{1.0, 2.0, 0.5, 1.5}}> ()
            r = Relu (x)
            n = BatchNormalization (r, s4, b4, m4, v4)
            y = Conv <pads = [1, 1, 1, 1]> (n, w)""")
    if shift == "nonzero":
        result = assert_kept(model, SkipReason.PADDED_CONSUMER)
        assert "not static" in result.decisions[0].detail
        return
    result = assert_folded(model, "forward")
    (fn,) = result.model.functions
    assert "BatchNormalization" not in [n.op_type for n in fn.node]


def test_function_decomposed():
    model = function_model("""axes = Constant <value_ints = [1]> ()
            axes2 = Constant <value_ints = [2]> ()
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            k = Unsqueeze (s, axes)
            k2 = Unsqueeze (k, axes2)
            q = Mul (c, k2)
            y = Add (q, k2)""")
    result = assert_folded(model, "decomposed")
    (fn,) = result.model.functions
    assert [n.op_type for n in fn.node if n.op_type not in ("Constant",)] == ["Conv"]


def test_function_input_parameters_kept():
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2,4,5,5] X) => (float[2,6,5,5] Y) {
            Y = local.ConvBN (X, W, scale, B, mean, var)
        }
        <domain: "local", opset_import: ["" : 17]>
        ConvBN (x, w, s, b, m, v) => (y) {
            c = Conv (x, w)
            y = BatchNormalization (c, s, b, m, v)
        }""",
        {"W": randn(6, 4, 1, 1, seed=1), **bn_params(6)},
    )
    result = fold_checked(model)
    (d,) = result.decisions
    assert d.reason == SkipReason.IN_SUBGRAPH and "function local::ConvBN" in d.detail
