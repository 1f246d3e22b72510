"""Differential fuzzing of the fold: random small models, folded, checked against a float64 truth.

The generator and the judge live in ``tests/fuzz_models.py`` (shared with the long run,
``benchmarks/fuzz_long.py``). Every generated model must either fold into a model that passes
``onnx.checker`` and computes the same function (within the rounding of its own dtype) under ONNX
Runtime with optimizations disabled, or keep its BatchNorms with a reason. A wrong output or an
exception other than a documented ``BnfoldError`` fails the test. The run is deterministic
(``derandomize=True``), short enough for every CI run; the long run is the script.
"""

from __future__ import annotations

import ast
import random

import fuzz_models as fm
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bnfold import numerics

EXAMPLES = 1200  # 10-60 s on 2 cores (load-dependent); benchmarks/fuzz_long.py runs thousands more


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.randoms(use_true_random=False))
def test_fold_is_equivalent_or_kept_with_a_reason(rng):
    case = fm.generate(rng)
    assume(case is not None)
    outcome = fm.check(case)
    assert not outcome.failed, f"{outcome.status}: {outcome.description}\n{outcome.message}"


# The long run is marked ``slow`` (`-m "not slow"` skips it; CI runs it). The mark is applied here,
# not as a decorator line, because hypothesis derives the derandomized seed from the test's source
# (decorators included): a new line above the test would silently change the cases it draws.
test_fold_is_equivalent_or_kept_with_a_reason = pytest.mark.slow(
    test_fold_is_equivalent_or_kept_with_a_reason
)


def test_generator_is_reproducible_from_its_seed():
    for seed in range(20):
        a, b = fm.generate(random.Random(seed)), fm.generate(random.Random(seed))
        assert (a is None) == (b is None)
        if a is not None:
            assert a.model.SerializeToString() == b.model.SerializeToString()
            assert a.feeds.keys() == b.feeds.keys()


def test_the_generator_covers_what_the_issue_lists():
    """Over a fixed range of seeds every producer, dtype, placement and extreme statistic occurs,
    and both outcomes (folded, kept) happen."""
    seen: dict[str, set] = {
        "op": set(),
        "dtype": set(),
        "placement": set(),
        "stats": set(),
        "status": set(),
    }
    for seed in range(300):
        case = fm.generate(random.Random(seed))
        if case is None:
            continue
        spec = ast.literal_eval(case.description)
        seen["dtype"].add(spec["dtype"])
        seen["placement"].add(spec["placement"])
        seen["op"].add((spec.get("producer") or spec.get("consumer") or {}).get("op"))
        seen["stats"].add(spec["bn"]["stats"])
        if seed < 60:
            seen["status"].add(fm.check(case).status)
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul"} <= seen["op"]
    assert seen["dtype"] == {"float32", "float16", "bfloat16", "float64"}
    assert {p for p, _ in fm.PLACEMENTS} <= seen["placement"]
    assert {
        "tiny_var",
        "huge_var",
        "zero_gamma",
        "negative_gamma",
        "calibrated",
        "extreme",
    } <= seen["stats"]
    assert {"folded", "kept"} <= seen["status"]


@pytest.mark.parametrize("target", ["fold_conv", "fold_bias", "fold_gemm_b", "fold_matmul"])
def test_the_judge_catches_a_wrong_fold(monkeypatch, target):
    """The check is not vacuous: folds 2% off are reported as wrong."""
    real = getattr(numerics, target)
    monkeypatch.setattr(numerics, target, lambda *a, **k: real(*a, **k) * 1.02)
    wrong = 0
    for seed in range(200):
        case = fm.generate(random.Random(seed))
        if case is not None and case.dtype in (fm.F32, fm.F64):
            wrong += fm.check(case).status == "wrong"
        if wrong >= 2:
            break
    assert wrong >= 2


def test_a_crash_in_the_pass_is_reported_as_a_crash(monkeypatch):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(numerics, "bn_scale_shift", boom)
    case = next(c for c in (fm.generate(random.Random(s)) for s in range(50)) if c is not None)
    outcome = fm.check(case)
    assert outcome.status == "crash" and outcome.failed and "ZeroDivisionError" in outcome.message
