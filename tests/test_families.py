"""Patterns from real model families (timm/torchvision exports, issue 13), built in ONNX text:

- LeViT's ``Linear → flatten(0, 1) → BatchNorm1d → reshape``: the BN folds backward through the
  Reshape/Flatten into the MatMul, whose weight may be a ``Transpose`` of an initializer;
- mixnet's ``Concat`` of Convs → BN: the BN is split by channel slices into the Convs; a Concat of
  shared or non-Conv features (DenseNet, DPN) keeps its BN with the reason that says why;
- torchvision's FrozenBatchNorm2d in a dynamo ``optimize=False`` export: the reshape shapes are
  ``Concat``s of ``Constant``s, evaluated so the decomposed BN is found;
- a BN after a residual ``Add`` whose sum is read elsewhere is kept as ``unsupported_producer``.

Each fold is checked for structure, ORT equivalence at ORT_DISABLE_ALL and ``onnx.checker``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from foldchecks import assert_folded, ops
from helpers import assert_kept, bn_params, const_values, model_from_text, randn

from bnfold.reasons import SkipReason

H20 = '<ir_version: 10, opset_import: ["" : 20]>'
H17 = '<ir_version: 8, opset_import: ["" : 17]>'


def data_ops(model) -> list[str]:
    """The op types of the nodes that compute on data (not the Constant/Concat shape plumbing)."""
    return [op for op in ops(model) if op not in ("Constant", "Concat")]


def _changed(before, after, name: str) -> bool:
    return name not in const_values(after) or not np.array_equal(
        const_values(before)[name], const_values(after)[name]
    )


# ================================================================================== LeViT LinearNorm
def _levit_dynamo(bias: bool = False):
    """timm LinearNorm as dynamo optimize=False exports it: Transpose(W) → MatMul → Reshape(Concat of
    Constants) → BN → Reshape back to [1, T, N]."""
    p = bn_params(6)
    mm = "m = MatMul (X, wt)"
    if bias:
        mm = "m0 = MatMul (X, wt)\n            m = Add (m0, b)"
    return model_from_text(
        f"""{H20}
        g (float[1,4,8] X) => (float[1,4,6] Y) {{
            wt = Transpose <perm = [1, 0]> (W)
            {mm}
            c0 = Constant <value_ints = [4]> ()
            c1 = Constant <value_ints = [6]> ()
            s2 = Concat <axis = 0> (c0, c1)
            f = Reshape <allowzero = 1> (m, s2)
            n = BatchNormalization <epsilon = 1e-5> (f, scale, B, mean, var)
            d0 = Constant <value_ints = [1]> ()
            s3 = Concat <axis = 0> (d0, c0, c1)
            Y = Reshape <allowzero = 1> (n, s3)
        }}""",
        {"W": randn(6, 8, seed=1), **({"b": randn(6, seed=2)} if bias else {}), **p},
    )


def test_levit_linear_flatten_bn_folds_into_the_matmul():
    model = _levit_dynamo()

    result = assert_folded(model, "backward")

    assert result.decisions[0].target_op == "MatMul"
    assert data_ops(result.model) == ["MatMul", "Reshape", "Add", "Reshape"], ops(result.model)
    assert "Transpose" not in ops(result.model), "the Transpose of W is folded with the weight"
    (folded_w,) = [v for v in const_values(result.model).values() if v.shape == (8, 6)]
    assert "W" not in const_values(result.model), "the [6, 8] original is gone"
    p = bn_params(6)
    s = p["scale"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + 1e-5)
    np.testing.assert_allclose(folded_w, randn(6, 8, seed=1).T * s, rtol=1e-6)


def test_levit_with_bias_add_updates_the_bias():
    model = _levit_dynamo(bias=True)

    result = assert_folded(model, "backward")

    assert data_ops(result.model) == ["MatMul", "Add", "Reshape", "Reshape"], ops(result.model)
    assert _changed(model, result.model, "b")


def test_torchscript_flatten_with_shape_reader_folds():
    # TorchScript: MatMul's output is also read by Shape (for reshape_as): a shape-only reader.
    p = bn_params(6, seed=3)
    model = model_from_text(
        f"""{H17}
        g (float[2,4,8] X) => (float[2,4,6] Y) {{
            wt = Transpose <perm = [1, 0]> (W)
            m = MatMul (X, wt)
            f = Flatten <axis = 2> (m)
            n = BatchNormalization (f, scale, B, mean, var)
            sh = Shape (m)
            Y = Reshape (n, sh)
        }}""",
        {"W": randn(6, 8, seed=4), **p},
    )

    result = assert_folded(model, "backward")

    assert "BatchNormalization" not in ops(result.model) and "Shape" in ops(result.model)


def test_reshape_that_moves_the_features_keeps_the_bn():
    # [1, 4, 6] → [6, 4]: BN channel axis 1 is no longer the MatMul's feature axis.
    p = bn_params(4)
    model = model_from_text(
        f"""{H17}
        g (float[1,4,8] X) => (float[6,4] Y) {{
            m = MatMul (X, W)
            f = Reshape (m, shp)
            Y = BatchNormalization (f, scale, B, mean, var)
        }}""",
        {"W": randn(8, 6, seed=1), "shp": np.array([6, 4], np.int64), **p},
    )

    result = assert_kept(model, SkipReason.UNSUPPORTED_LAYOUT)

    assert "[M, 6]" in result.decisions[0].detail


def test_matmul_output_read_elsewhere_keeps_the_bn():
    p = bn_params(6)
    model = model_from_text(
        f"""{H17}
        g (float[1,4,8] X) => (float[4,6] Y, float[1,4,6] Z) {{
            m = MatMul (X, W)
            f = Reshape (m, shp)
            Y = BatchNormalization (f, scale, B, mean, var)
            Z = Relu (m)
        }}""",
        {"W": randn(8, 6, seed=1), "shp": np.array([4, 6], np.int64), **p},
    )

    assert_kept(model, SkipReason.PRODUCER_OUTPUT_SHARED)
    result = assert_folded(model, "backward", duplicate_shared=True)
    assert ops(result.model).count("MatMul") == 2


# ============================================================================= Concat of Convs (mixnet)
def _mixed(shared: bool = False, first: str = "a = Conv <pads = [1, 1, 1, 1]> (X, W1)"):
    p = bn_params(7, seed=5)
    extra = ", float[1,4,6,6] Z" if shared else ""
    relu = "Z = Relu (b)" if shared else ""
    return model_from_text(
        f"""{H17}
        g (float[1,3,6,6] X) => (float[1,7,6,6] Y{extra}) {{
            {first}
            b = Conv <pads = [2, 2, 2, 2]> (X, W2, b2)
            cat = Concat <axis = 1> (a, b)
            Y = BatchNormalization (cat, scale, B, mean, var)
            {relu}
        }}""",
        {"W1": randn(3, 3, 3, 3, seed=6), "W2": randn(4, 3, 5, 5, seed=7), "b2": randn(4), **p},
    )


def test_bn_after_concat_of_convs_is_split_into_them():
    model = _mixed()

    result = assert_folded(model, "backward")

    assert ops(result.model) == ["Conv", "Conv", "Concat"]
    assert _changed(model, result.model, "W1") and _changed(model, result.model, "W2")
    assert _changed(model, result.model, "b2")
    d = result.decisions[0]
    assert d.target_op == "Concat" and "[3]" in d.detail and "[4]" in d.detail


def test_concat_with_depthwise_and_negative_axis():
    p = bn_params(8, seed=9)
    model = model_from_text(
        f"""{H17}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y) {{
            a = Conv <group = 4, pads = [1, 1, 1, 1]> (X, W1)
            b = Conv (X, W2)
            cat = Concat <axis = -3> (a, b)
            Y = BatchNormalization (cat, scale, B, mean, var)
        }}""",
        {"W1": randn(4, 1, 3, 3, seed=1), "W2": randn(4, 4, 1, 1, seed=2), **p},
    )

    assert_folded(model, "backward")


def test_concat_of_a_shared_conv_keeps_the_bn_unless_duplicated():
    model = _mixed(shared=True)

    result = assert_kept(model, SkipReason.PRODUCER_OUTPUT_SHARED)
    assert "input 1" in result.decisions[0].detail

    folded = assert_folded(model, "backward", duplicate_shared=True)
    assert ops(folded.model).count("Conv") == 3


def test_densenet_concat_of_pooled_features_keeps_the_bn():
    model = _mixed(first="a = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X)")

    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)

    assert "MaxPool" in result.decisions[0].detail and "Concat" in result.decisions[0].detail


def test_concat_slice_that_would_overflow_changes_no_conv():
    # Conv b's weight is near the float32 maximum and its BN slice scales by ~2: that slice is
    # refused (overflow), and Conv a, checked first, is left as it was too.
    model = _mixed()
    for init in model.graph.initializer:
        if init.name == "W2":
            w = randn(4, 3, 5, 5, seed=7)
            w[0, 0, 0, 0] = 3e38
            init.CopyFrom(onnx.numpy_helper.from_array(w, "W2"))
        if init.name == "scale":
            s = np.full(7, 2.0, np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(s, "scale"))
        if init.name == "var":
            init.CopyFrom(onnx.numpy_helper.from_array(np.ones(7, np.float32), "var"))

    result = assert_kept(model, SkipReason.OVERFLOW, run=None)

    assert "Conv" in result.decisions[0].detail


# ================================================================================ FrozenBatchNorm2d
def test_dynamo_frozen_bn_with_concat_shapes_is_found_and_folded():
    # torchvision FrozenBatchNorm2d under dynamo optimize=False: every reshape shape is a Concat of
    # Constants; scale = w * rsqrt(rv + eps), shift = b - rm * scale; x * scale + shift.
    p = bn_params(4, seed=11)
    reshapes = []
    for name, src in (("vw", "fw"), ("vb", "fb"), ("vv", "fv"), ("vm", "fm")):
        reshapes.append(
            f"""{name}0 = Constant <value_ints = [1]> ()
            {name}1 = Constant <value_ints = [-1]> ()
            {name}2 = Constant <value_ints = [1]> ()
            {name}3 = Constant <value_ints = [1]> ()
            {name}s = Concat <axis = 0> ({name}0, {name}1, {name}2, {name}3)
            {name} = Reshape <allowzero = 1> ({src}, {name}s)"""
        )
    body = "\n            ".join(reshapes)
    model = model_from_text(
        f"""{H20}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            {body}
            eps = Constant <value = float {{1e-5}}> ()
            ve = Add (vv, eps)
            sq = Sqrt (ve)
            rs = Reciprocal (sq)
            sc = Mul (vw, rs)
            ms = Mul (vm, sc)
            sh = Sub (vb, ms)
            y0 = Mul (c, sc)
            Y = Add (y0, sh)
        }}""",
        {
            "W": randn(4, 3, 3, 3, seed=12),
            "fw": p["scale"],
            "fb": p["B"],
            "fm": p["mean"],
            "fv": p["var"],
        },
    )

    result = assert_folded(model, "decomposed")

    assert ops(result.model) == ["Conv"], "the whole scale/shift chain and its shapes are gone"


def test_constant_concat_and_transpose_feed_a_bn_parameter():
    # BN parameters computed by Concat and Transpose of constants are resolved (constants.py).
    p = bn_params(4, seed=13)
    model = model_from_text(
        f"""{H17}
        g (float[2,3,5,5] X) => (float[2,4,5,5] Y) {{
            c = Conv <pads = [1, 1, 1, 1]> (X, W)
            sc = Concat <axis = 0> (s0, s1)
            mt = Transpose (m2)
            mf = Reshape (mt, flat)
            Y = BatchNormalization (c, sc, B, mf, var)
        }}""",
        {
            "W": randn(4, 3, 3, 3, seed=1),
            "s0": p["scale"][:1],
            "s1": p["scale"][1:],
            "m2": p["mean"].reshape(1, 4),
            "flat": np.array([4], np.int64),
            "B": p["B"],
            "var": p["var"],
        },
    )

    result = assert_folded(model, "backward")

    assert ops(result.model) == ["Conv"]


# =========================================================================== truthful reason labels
@pytest.mark.parametrize("shared", [False, True])
def test_bn_after_residual_add_is_an_unsupported_producer(shared):
    p = bn_params(4, seed=17)
    extra = ", float[1,4,5,5] Z" if shared else ""
    other = "Z = Add (s, X)" if shared else ""
    model = model_from_text(
        f"""{H17}
        g (float[1,4,5,5] X) => (float[1,4,5,5] Y{extra}) {{
            a = Conv <pads = [1, 1, 1, 1]> (X, W)
            s = Add (a, X)
            n = BatchNormalization (s, scale, B, mean, var)
            Y = Relu (n)
            {other}
        }}""",
        {"W": randn(4, 4, 3, 3, seed=18), **p},
    )

    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)

    detail = result.decisions[0].detail
    assert "Add" in detail and "bias of a MatMul" in detail, detail


def test_bn_after_matmul_plus_residual_is_an_unsupported_producer():
    # Add(MatMul(x, W), x): a residual sum, not a MatMul with a constant bias.
    p = bn_params(6, seed=19)
    model = model_from_text(
        f"""{H17}
        g (float[3,6] X) => (float[3,6] Y) {{
            m = MatMul (X, W)
            s = Add (m, X)
            Y = BatchNormalization (s, scale, B, mean, var)
        }}""",
        {"W": randn(6, 6, seed=20), **p},
    )

    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER)

    assert "of MatMul and a graph input" in result.decisions[0].detail


# ================================================================= RepVGG / MobileOne identity branch
def _repvgg(k3: str = "pads = [1, 1, 1, 1]", group: int = 1, shared: bool = False):
    """``relu(conv3x3(x) + conv1x1(x) + BN(x))`` with x = relu(X): RepVGG's training-time block."""
    p = bn_params(4, seed=21)
    extra = ", float[1,4,6,6] Z" if shared else ""
    return model_from_text(
        f"""{H17}
        g (float[1,4,6,6] X) => (float[1,4,6,6] Y{extra}) {{
            x = Relu (X)
            a = Conv <{k3}, group = {group}> (x, W3, b3)
            c = Conv (x, W1)
            s1 = Add (a, c)
            n = BatchNormalization (x, scale, B, mean, var)
            s2 = Add (s1, n)
            Y = Relu (s2)
            {"Z = Neg (a)" if shared else ""}
        }}""",
        {
            "W3": randn(4, 4 // group, 3, 3, seed=22),
            "b3": randn(4, seed=23),
            "W1": randn(4, 4, 1, 1),
            **p,
        },
    )


@pytest.mark.parametrize("group", [1, 4])
def test_identity_branch_bn_folds_into_a_sibling_conv(group):
    model = _repvgg(group=group)

    result = assert_folded(model, "branch")

    assert ops(result.model) == ["Relu", "Conv", "Conv", "Add", "Relu"], ops(result.model)
    d = result.decisions[0]
    assert d.target_op == "Conv"
    w3 = randn(4, 4 // group, 3, 3, seed=22)
    p = bn_params(4, seed=21)
    s = p["scale"] / np.sqrt(p["var"].astype(np.float64) + 1e-5)
    new = [v for v in const_values(result.model).values() if v.shape == w3.shape]
    changed = [v for v in new if not np.array_equal(v, w3)]
    assert len(changed) == 1
    delta = changed[0].astype(np.float64) - w3
    for c in range(4):  # only the centre tap of channel c's own input changed, by s[c]
        np.testing.assert_allclose(delta[c, c % (4 // group), 1, 1], s[c], rtol=1e-6)
        delta[c, c % (4 // group), 1, 1] = 0
    assert np.abs(delta).max() < 1e-6


@pytest.mark.parametrize(
    "k3",
    [
        "pads = [1, 1, 1, 1], strides = [2, 2]",
        "pads = [0, 0, 0, 0]",
    ],
)
def test_identity_branch_without_a_same_size_conv_keeps_the_bn(k3):
    # The 1x1 Conv (pads 0, stride 1) is itself a valid sibling: make it strided out of the way too.
    model = _repvgg(k3=k3)
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] == "W1":
            node.attribute.append(onnx.helper.make_attribute("dilations", [2, 2]))

    result = assert_kept(model, SkipReason.UNSUPPORTED_PRODUCER, run=None, check=False)

    assert "identity branch" in result.decisions[0].detail, result.decisions[0].detail


def test_identity_branch_with_a_shared_sibling_uses_the_other_conv():
    model = _repvgg(shared=True)

    result = assert_folded(model, "branch")

    assert "<Conv → c>" in result.decisions[0].target
