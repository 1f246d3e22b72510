"""Folding at the I/O floor: a large weight is read once, when the folded model is written.

``bnfold.fold`` on a path (or a ModelProto) skips the up-front range scan of large weights and checks
the range while it writes each folded weight, a block of rows at a time. A fold found to overflow
there is refused and the model folded again: the decisions, and the written model, are the same as
with the scan up front. (``weights.DEFER_MIN_BYTES`` is lowered so that small test weights count
as large.)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from foldchecks import assert_equivalent
from helpers import bn_params, const_values, model_from_text, randn

import bnfold
from bnfold.dryrun import inspect_model
from bnfold.passes import weights
from bnfold.report import SkipReason

H17 = '<ir_version: 8, opset_import: ["" : 17]>'


def two_convs(dtype: str, w1: np.ndarray, w2: np.ndarray, p1: dict, p2: dict) -> onnx.ModelProto:
    """X → Conv W1 → BN 1 → Relu → Conv W2 (transposed weight layout for the Gemm case) → BN 2."""
    return model_from_text(
        f"""{H17}
        g ({dtype}[2,3,6,6] X) => ({dtype}[2,8,2,2] Y) {{
            c = Conv (X, W1)
            n1 = BatchNormalization (c, s1, b1, m1, v1)
            r = Relu (n1)
            c2 = Conv (r, W2)
            Y = BatchNormalization (c2, s2, b2, m2, v2)
        }}""",
        {
            "W1": w1,
            "W2": w2,
            **{f"{k[0] if k != 'B' else 'b'}1": v for k, v in p1.items()},
            **{f"{k[0] if k != 'B' else 'b'}2": v for k, v in p2.items()},
        },
    )


def params(n: int, dtype=np.float32) -> dict:
    p = bn_params(n, dtype)
    return {"scale": p["scale"], "B": p["B"], "mean": p["mean"], "var": p["var"]}


@pytest.fixture
def defer_all(monkeypatch):
    monkeypatch.setattr(weights, "DEFER_MIN_BYTES", 0)


@pytest.fixture
def no_scan(monkeypatch):
    """Fail if the up-front range scan reads a weight."""

    def scan(*args, **kwargs):
        raise AssertionError("the weight was scanned before it was written")

    monkeypatch.setattr("bnfold.passes.backward.channel_absmax", scan)


def test_a_written_fold_reads_each_weight_once(tmp_path, defer_all, no_scan):
    model = two_convs(
        "float", randn(6, 3, 3, 3, seed=1), randn(8, 6, 3, 3, seed=2), params(6), params(8)
    )
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)

    result = bnfold.fold(src, out)

    assert result and [d.folded for d in result.decisions] == [True, True]
    folded = onnx.load(str(out))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv"]
    assert_equivalent(model, folded)


def test_blocks_of_rows_round_like_the_whole_weight(tmp_path, defer_all, monkeypatch):
    # One row per block: the written weights equal those of the whole-tensor formula, bit for bit.
    model = two_convs(
        "float", randn(6, 3, 3, 3, seed=1), randn(8, 6, 3, 3, seed=2), params(6), params(8)
    )
    whole = bnfold.fold(model, verify=False).model
    monkeypatch.setattr(weights, "_ROW_BLOCK_BYTES", 1)
    blocks = bnfold.fold(model).model
    old, new = const_values(whole), const_values(blocks)
    assert old.keys() == new.keys()
    for name, value in old.items():
        np.testing.assert_array_equal(new[name], value)


def test_an_overflow_found_while_writing_keeps_that_bn_only(
    tmp_path, monkeypatch, defer_all, no_scan
):
    # BN 2 would overflow float16 (s ≈ 9.5e6); BN 1 folds. Found when writing, the first attempt is
    # discarded and the fold runs again with BN 2 kept: the same decisions as a dry run, which
    # checks the range up front.
    p2 = params(8, np.float16)
    p2["scale"][0], p2["var"][0], p2["mean"][0] = 30000.0, 0.0, 0.0
    model = two_convs(
        "float16",
        randn(6, 3, 3, 3, dtype=np.float16, seed=1),
        randn(8, 6, 3, 3, dtype=np.float16, seed=2),
        params(6, np.float16),
        p2,
    )
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)

    result = bnfold.fold(src, out)

    assert [(d.folded, d.reason) for d in result.decisions] == [
        (True, None),
        (False, SkipReason.OVERFLOW),
    ]
    assert "float16" in result.decisions[1].detail
    assert result and result.report.written
    folded = onnx.load(str(out))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "BatchNormalization"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]  # nothing left over
    monkeypatch.undo()  # the dry run scans up front
    dry = inspect_model(src)
    assert [(d.folded, d.reason) for d in dry.decisions] == [
        (d.folded, d.reason) for d in result.decisions
    ]


def test_external_data_is_written_block_by_block(tmp_path, defer_all, monkeypatch):
    # With external data the folded weight goes to the file a block of rows at a time; the bytes
    # are those of the whole-tensor formula.
    model = two_convs(
        "float", randn(6, 3, 3, 3, seed=1), randn(8, 6, 3, 3, seed=2), params(6), params(8)
    )
    whole = const_values(bnfold.fold(model, verify=False).model)
    src = tmp_path / "m.onnx"
    onnx.save(model, src, save_as_external_data=True, size_threshold=0, location="m.data")
    monkeypatch.setattr(weights, "_ROW_BLOCK_BYTES", 1)
    blocks = []
    by_rows = weights._by_rows

    def counting(*args):  # noqa: ANN002
        for block in by_rows(*args):
            blocks.append(block.shape)
            yield block

    monkeypatch.setattr(weights, "_by_rows", counting)

    result = bnfold.fold(src, tmp_path / "o.onnx", external_data=True)

    assert result and (tmp_path / "o.onnx.data").exists()
    assert len(blocks) == 6 + 8  # one row per block: both folded weights streamed
    folded = onnx.load(str(tmp_path / "o.onnx"))
    new = const_values(folded)
    assert new.keys() == whole.keys()
    for name, value in whole.items():
        np.testing.assert_array_equal(new[name], value)
