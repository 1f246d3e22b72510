"""A fast subset of ``benchmarks/mutations.py`` against the wired product path, ``bnfold.verify``
with its default (calibrated) verdict: a few models x every mutation kind (one site each).

Correct folds must pass (no false refusal); every mutant whose effect exceeds K x the model's own
float rounding error against a float64 evaluation must fail (see the benchmark's docstring)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold

ROOT = Path(__file__).resolve().parent.parent
KINDS = {
    "wrong_eps",
    "bias_missing",
    "bias_shift",
    "channel_scale",
    "swap_channels",
    "transposed",
    "wrong_axis",
}


def _benchmark():
    spec = importlib.util.spec_from_file_location("mutations", ROOT / "benchmarks" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutations"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutations = _benchmark()


def _subject(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    if name == "deconv_square":
        from deep_models import convtranspose_square

        model = convtranspose_square()
    else:
        model = onnx.load(str(ROOT / "sample_models" / f"{name}.onnx"))
    return model, mutations._feeds(model)


def _one_per_kind(original, folded, decisions):
    seen: dict[str, onnx.ModelProto] = {}
    for label, mutant in mutations.mutants(original, folded, decisions):
        seen.setdefault(label.split("@")[0], mutant)
    return seen


SUBJECTS = ("cnn2d", "decoder_convtranspose", "deconv_square")


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict[str, tuple[bool, bool]]]:
    """Per model, per mutation kind (plus "correct"): (above noise, passed bnfold.verify)."""
    from fuzz_models import run_truth

    results: dict[str, dict[str, tuple[bool, bool]]] = {}
    for name in SUBJECTS:
        original, feeds = _subject(name)
        fold = bnfold.fold(original, verify=False)
        orig = mutations._ort(original, feeds)
        truth = run_truth(original, feeds)
        noise = [
            max(mutations._maxdiff(o, t), mutations._unit(o.dtype) * mutations._absmax(t))
            for o, t in zip(orig, truth, strict=True)
        ]

        def verdict(candidate, original=original, feeds=feeds) -> bool:
            return bool(bnfold.verify(original, candidate, data=[feeds]))

        row = {"correct": (False, verdict(fold.model))}
        for kind, mutant in _one_per_kind(original, fold.model, fold.decisions).items():
            effect = [
                mutations._maxdiff(m, o)
                for m, o in zip(mutations._ort(mutant, feeds), orig, strict=True)
            ]
            above = any(e > 10 * n for e, n in zip(effect, noise, strict=True))
            row[kind] = (above, verdict(mutant) if above else True)
        results[name] = row
    return results


def test_every_mutation_kind_is_exercised(outcomes):
    kinds = {kind for row in outcomes.values() for kind in row} - {"correct"}
    assert kinds == KINDS


def test_correct_folds_are_never_refused(outcomes):
    refused = [name for name, row in outcomes.items() if not row["correct"][1]]
    assert refused == []


def test_every_mutant_above_float_noise_is_caught(outcomes):
    above = [(n, k) for n, row in outcomes.items() for k, (a, _) in row.items() if a]
    missed = [(n, k) for n, row in outcomes.items() for k, (a, p) in row.items() if a and p]
    assert len(above) >= 10 and missed == []


def test_a_deep_nets_correct_fold_is_not_refused_where_fixed_tolerances_refuse_it():
    """Issue 12's false refusal: 50 layers, random weights, logits ~1e5. float32 re-rounding moves
    a near-zero logit by ~0.1; the fixed element-wise default refuses that, the calibrated verdict
    sees it is within the model's own noise."""
    from deep_models import deep_resnet

    model = deep_resnet(50, size=32, gain=1.4, seed=0)
    feeds = mutations._feeds(model)
    folded = bnfold.fold(model, verify=False).model
    result = bnfold.verify(model, folded, data=[feeds])
    (out,) = result.outputs
    assert result.status == "passed" and out.mode == "calibrated"
    assert 1 <= out.margin and out.noise > 1e-3  # the noise is real, and the error within it
    fixed = bnfold.verify(model, folded, data=[feeds], output_tolerances={out.name: (1e-4, 1e-4)})
    assert fixed.status == "failed"
