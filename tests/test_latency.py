"""Specification of the latency benchmark (bnfold.latency).

The statistics (bootstrap, interleaving) are tested on synthetic data and fake runners, without ONNX
Runtime, so they are deterministic; end-to-end runs use tiny models built in code and few runs, and
check structure and loose, noise-proof properties only.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from helpers import model_from_text, randn

from bnfold import _ort
from bnfold.errors import BnfoldError, InputNotFoundError, UsageError
from bnfold.latency import (
    LEVEL_NOTE,
    BenchResult,
    LatencyStats,
    ModelBench,
    Ratio,
    _bootstrap_ratio,
    _interleave,
    _resampled_medians,
    _RunFailed,
    bench,
    plot,
)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
H = '<ir_version: 8, opset_import: ["" : 17]>'
FAST = {"runs": 12, "warmup": 2, "sessions": 2}


def conv_chain(depth: int, *, channels: int = 8, size: int = 16, input_name: str = "X") -> bytes:
    """``depth`` 3x3 Convs in a row on a ``[N, channels, size, size]`` input with a dynamic batch."""
    lines, prev = [], input_name
    for k in range(depth):
        out = "Y" if k == depth - 1 else f"c{k}"
        lines.append(f"{out} = Conv <pads = [1, 1, 1, 1]> ({prev}, W)")
        prev = out
    shape = f"[N, {channels}, {size}, {size}]"
    model = model_from_text(
        f"{H}\ng (float{shape} {input_name}) => (float{shape} Y) {{ {' '.join(lines)} }}",
        {"W": randn(channels, channels, 3, 3, seed=1) * 0.1},
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def small() -> bytes:
    return conv_chain(1)


# --- statistics ------------------------------------------------------------------------------------


def test_latency_stats_from_samples_are_ordered_and_match_numpy():
    samples = np.random.default_rng(0).lognormal(0.0, 0.3, 501)
    s = LatencyStats.from_samples(samples, session_create_ms=3.0, first_run_ms=2.0, sessions=4)
    assert s.n == 501 and s.sessions == 4
    assert s.min_ms <= s.median_ms <= s.p90_ms <= s.p99_ms <= samples.max()
    assert s.median_ms == pytest.approx(np.median(samples))
    assert s.mean_ms == pytest.approx(samples.mean())
    assert s.std_ms == pytest.approx(samples.std(ddof=1))
    assert s.samples_ms == tuple(samples)
    assert "samples_ms" not in s.to_dict() and len(s.to_dict(samples=True)["samples_ms"]) == 501
    assert LatencyStats.from_samples([1.5]).std_ms == 0.0
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])


def test_bootstrap_same_distribution_covers_one():
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(0.0, 0.2, 300), rng.lognormal(0.0, 0.2, 300)
    ratio, low, high = _bootstrap_ratio(a, b, seed=0)
    assert low <= ratio <= high
    assert low <= 1.0 <= high
    assert _bootstrap_ratio(a, b, seed=0) == (ratio, low, high)  # seeded: reproducible


def test_bootstrap_real_twofold_difference_is_significant():
    rng = np.random.default_rng(2)
    a = rng.lognormal(0.0, 0.2, 200)
    b = 2.0 * rng.lognormal(0.0, 0.2, 200)
    ratio, low, high = _bootstrap_ratio(a, b, seed=0)
    assert 1.8 < low <= ratio <= high < 2.2
    inverse, inv_low, inv_high = _bootstrap_ratio(b, a, seed=0)
    assert inv_high < 0.6 and inverse == pytest.approx(1 / ratio)


def test_bootstrap_grouped_by_session_widens_for_session_differences():
    # Same model, six sessions each, each session a little faster or slower than the others (as
    # memory placement makes them): the pooled runs differ by ~1%, which a flat bootstrap calls
    # significant; resampling the sessions too does not.
    rng = np.random.default_rng(3)
    a_shift = [1.00, 1.02, 0.98, 1.03, 0.99, 1.01]
    b_shift = [0.98, 1.00, 0.97, 1.01, 0.99, 0.995]
    a = [list(s * rng.normal(1.0, 0.002, 40)) for s in a_shift]
    b = [list(s * rng.normal(1.0, 0.002, 40)) for s in b_shift]
    flat_a = [x for g in a for x in g]
    flat_b = [x for g in b for x in g]
    _, flat_low, flat_high = _bootstrap_ratio(flat_a, flat_b, seed=0)
    _, low, high = _bootstrap_ratio(a, b, seed=0)
    assert not flat_low <= 1.0 <= flat_high
    assert low <= 1.0 <= high
    assert high - low > 3 * (flat_high - flat_low)


@pytest.mark.parametrize("sizes", [[101], [50], [20, 21, 20]])
def test_resampled_medians_match_a_plain_loop(sizes):
    # The vectorised two-level bootstrap against its definition, written as a loop: pick a session
    # per slot with replacement, draw that slot's number of runs from it, take the median.
    rng = np.random.default_rng(4)
    groups = [list(rng.lognormal(0.1 * k, 0.3, size)) for k, size in enumerate(sizes)]
    fast = _resampled_medians(groups, 4000, np.random.default_rng(5))
    loop_rng = np.random.default_rng(6)
    slow = []
    for _ in range(4000):
        picks = loop_rng.integers(0, len(groups), len(groups))
        draws = [loop_rng.choice(groups[g], size=len(groups[slot])) for slot, g in enumerate(picks)]
        slow.append(np.median(np.concatenate(draws)))
    quantiles = [5, 25, 50, 75, 95]
    np.testing.assert_allclose(
        np.percentile(fast, quantiles), np.percentile(slow, quantiles), rtol=0.03
    )


def test_ratio_verdict():
    def ratio(r, low, high):
        return Ratio("b", "a", "disable", r, low, high, not low <= 1.0 <= high, 0.9)

    assert ratio(0.9, 0.88, 0.92).verdict == "10.0% faster"
    assert ratio(1.25, 1.2, 1.3).verdict == "25.0% slower"
    assert ratio(0.99, 0.97, 1.01).verdict == "no significant difference"


# --- interleaving (fake runners and clock, no ONNX Runtime) ----------------------------------------


def recorder(order: list[str], name: str):
    return lambda: order.append(name)


def test_two_models_run_in_abba_order():
    order: list[str] = []
    samples = _interleave([recorder(order, "A"), recorder(order, "B")], runs=4)
    assert "".join(order) == "ABBAABBA"
    assert [len(s) for s in samples] == [4, 4]


def test_three_models_run_forward_then_backward():
    order: list[str] = []
    _interleave([recorder(order, m) for m in "ABC"], runs=3)
    assert "".join(order) == "ABCCBAABC"


def test_run_times_come_from_the_clock_around_each_run_only():
    ticks = iter(range(0, 10**9, 250_000))  # every clock call advances 0.25 ms
    samples = _interleave([lambda: None, lambda: None], runs=2, clock=lambda: next(ticks))
    assert samples == [[0.25, 0.25], [0.25, 0.25]]


def test_time_budget_stops_after_whole_half_rounds():
    now = [0]

    def clock() -> int:
        now[0] += 1_000_000  # 1 ms per clock call
        return now[0]

    order: list[str] = []
    halves: list[int] = []
    samples = _interleave(
        [recorder(order, "A"), recorder(order, "B")],
        runs=None,
        seconds=0.02,
        clock=clock,
        on_half_round=lambda half, elapsed: halves.append(half),
    )
    assert len(samples[0]) == len(samples[1]) == halves[-1]
    assert 2 <= halves[-1] <= 6  # each half-round costs 5 clock calls (5 ms): stops once >= 20 ms
    assert "".join(order).startswith("ABBA")


def test_time_budget_still_runs_one_full_round():
    ticks = iter(range(0, 10**12, 10**9))  # 1 s per clock call, far beyond the budget
    samples = _interleave([lambda: None] * 2, runs=None, seconds=0.001, clock=lambda: next(ticks))
    assert [len(s) for s in samples] == [2, 2]


def test_runs_cap_a_time_budget():
    samples = _interleave([lambda: None] * 2, runs=3, seconds=60.0)
    assert [len(s) for s in samples] == [3, 3]


def test_a_failing_runner_is_named_by_index():
    def fail() -> None:
        raise _ort.OrtRunError("boom")

    with pytest.raises(_RunFailed) as info:
        _interleave([lambda: None, fail], runs=2)
    assert info.value.index == 1


# --- end to end --------------------------------------------------------------------------------------


def test_bench_two_copies_of_a_model(small):
    result = bench([small, small], levels=("disable", "all"), runs=60, warmup=3, sessions=2)
    assert isinstance(result, BenchResult)
    assert result.models == ("model 1", "model 2") and result.baseline == "model 1"
    assert [(e.model, e.level) for e in result.entries] == [
        ("model 1", "disable"),
        ("model 2", "disable"),
        ("model 1", "all"),
        ("model 2", "all"),
    ]
    for e in result.entries:
        s = e.stats
        assert s.n == 60 and s.sessions == 2 and len(s.samples_ms) == 60
        assert 0 < s.min_ms <= s.median_ms <= s.p90_ms <= s.p99_ms
        assert s.session_create_ms > 0 and s.first_run_ms > 0
    assert [(r.model, r.baseline, r.level) for r in result.ratios] == [
        ("model 2", "model 1", "disable"),
        ("model 2", "model 1", "all"),
    ]
    for r in result.ratios:
        assert r.ci_low <= r.median_ratio <= r.ci_high
        assert 0.7 < r.median_ratio < 1.4  # loose: the same model, timed interleaved
        assert r.significant == (not r.ci_low <= 1.0 <= r.ci_high)
    assert result.threads == 1 and result.provider == "CPUExecutionProvider"
    assert (
        result.note == LEVEL_NOTE and "basic" in result.note and "session-creation" in result.note
    )
    assert result.input_shapes == {"X": (1, 8, 16, 16)}


def test_bench_sees_a_much_slower_model():
    light, heavy = conv_chain(1, channels=16, size=24), conv_chain(8, channels=16, size=24)
    result = bench([light, heavy], labels=["light", "heavy"], levels="disable", **FAST)
    r = result.ratio("heavy", "disable")
    assert r.significant and r.ci_low > 2.0 and r.verdict.endswith("slower")


def test_levels_are_validated_and_kept_in_order(small):
    result = bench([small], levels=["basic", "extended", "basic"], **FAST)
    assert result.levels == ("basic", "extended")
    assert [e.level for e in result.entries] == ["basic", "extended"]
    assert result.ratios == ()
    with pytest.raises(UsageError, match="unknown optimization level 'fast'"):
        bench([small], levels=["fast"])
    with pytest.raises(UsageError, match="at least one"):
        bench([small], levels=[])


def test_unknown_provider_is_a_usage_error(small):
    with pytest.raises(
        UsageError, match="unknown execution provider 'warp-drive'.*CPUExecutionProvider"
    ):
        bench([small], provider="warp-drive")


def test_unavailable_provider_names_what_is_available(small, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UsageError) as info:
        bench([small], provider="cuda")
    message = str(info.value)
    assert "CUDAExecutionProvider" in message and "not available" in message
    assert "available: CPUExecutionProvider" in message and "onnxruntime-gpu" in message
    with pytest.raises(UsageError, match="TensorrtExecutionProvider"):
        bench([small], provider="tensorrt")


def test_provider_names_resolve_with_cpu_fallback(monkeypatch):
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert _ort.resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert _ort.resolve_providers("CUDA") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _ort.resolve_providers("cudaexecutionprovider")[0] == "CUDAExecutionProvider"
    assert _ort.resolve_providers("tensorrt") == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_bad_arguments_are_usage_errors(small, tmp_path):
    for kwargs, match in [
        ({"runs": 0}, "runs"),
        ({"seconds": -1.0}, "seconds"),
        ({"warmup": -1}, "warmup"),
        ({"intra_op_threads": -2}, "intra_op_threads"),
        ({"batch_size": 0}, "batch_size"),
        ({"labels": ["only one", "x", "y"]}, "labels"),
        ({"input_shapes": ["X=1,8,oops"]}, "malformed input shape"),
    ]:
        with pytest.raises(UsageError, match=match):
            bench([small], **kwargs)
    with pytest.raises(UsageError, match="at least one model"):
        bench([])
    with pytest.raises(InputNotFoundError, match="missing.onnx"):
        bench([tmp_path / "missing.onnx"])


def test_models_must_share_input_names(small):
    other = conv_chain(1, input_name="image")
    with pytest.raises(UsageError, match="same inputs"):
        bench([small, other], **FAST)


def test_batch_size_sets_the_dynamic_first_dimension(small):
    result = bench([small], levels="disable", batch_size=3, **FAST)
    assert result.input_shapes == {"X": (3, 8, 16, 16)}
    shaped = bench([small], levels="disable", input_shapes=["X=2,8,16,16"], **FAST)
    assert shaped.input_shapes == {"X": (2, 8, 16, 16)}
    with pytest.raises(UsageError, match="contradicts"):
        bench([small], batch_size=4, input_shapes={"X": (2, 8, 16, 16)}, **FAST)


def test_batch_size_needs_a_dynamic_first_dimension():
    fixed = model_from_text(f"{H}\ng (float[2, 3] X) => (float[2, 3] Y) {{ Y = Relu (X) }}")
    with pytest.raises(UsageError, match="no input has a dynamic first dimension"):
        bench([fixed.SerializeToString()], batch_size=4, **FAST)


def test_a_model_that_cannot_run_on_the_inputs_is_a_clear_error():
    reshape = model_from_text(
        f"{H}\ng (float[N, 3] X) => (float[2, 3] Y) <int64[2] s = {{2, 3}}> {{ Y = Reshape (X, s) }}"
    )
    with pytest.raises(BnfoldError, match="cannot run model 1.*X=1,3.*input shapes"):
        bench([reshape], **FAST)


def test_time_budget_and_progress(small):
    calls: list[tuple[int, int]] = []
    result = bench(
        [small, small],
        levels=("disable", "all"),
        seconds=0.05,
        warmup=1,
        sessions=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result.runs is None and result.seconds_budget == 0.05
    assert all(e.stats.n >= 4 for e in result.entries)  # at least one ABBA round per session
    assert calls[-1] == (100, 100)  # milliseconds of budget, both levels
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_progress_counts_timed_runs(small):
    calls: list[tuple[int, int]] = []
    bench([small, small], levels="disable", progress=lambda d, t: calls.append((d, t)), **FAST)
    assert calls[-1] == (24, 24)


def test_labels_from_paths(tmp_path, small):
    a = tmp_path / "model.onnx"
    a.write_bytes(small)
    (tmp_path / "sub").mkdir()
    b = tmp_path / "sub" / "model.onnx"
    b.write_bytes(small)
    c = tmp_path / "other.onnx"
    c.write_bytes(small)
    result = bench([a, a, c], levels="disable", **FAST)
    assert result.models == ("model.onnx #1", "model.onnx #2", "other.onnx")
    result = bench([a, b], levels="disable", **FAST)
    assert result.models == (str(a), str(b))


def test_to_dict_is_json_and_to_markdown_has_a_row_per_model_per_level(small):
    result = bench([small, small], labels=["base", "fold|ed"], **FAST)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["levels"] == ["disable", "all"] and data["baseline"] == "base"
    assert len(data["entries"]) == 4 and len(data["ratios"]) == 2
    assert "samples_ms" not in data["entries"][0]["stats"]
    assert {"median_ratio", "ci_low", "ci_high", "significant", "verdict"} <= set(data["ratios"][0])
    with_samples = json.loads(json.dumps(result.to_dict(samples=True)))
    assert len(with_samples["entries"][0]["stats"]["samples_ms"]) == 12

    markdown = result.to_markdown()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "median ms" in header and "vs baseline" in header
    assert len(body) == 4
    assert {tuple(cell.strip() for cell in row.split(" | ")[:2]) for row in body} == {
        ("| disable", "base"),
        ("| disable", "fold\\|ed"),
        ("| all", "base"),
        ("| all", "fold\\|ed"),
    }
    assert "basic" in markdown and "×" in markdown


def test_import_does_not_load_onnxruntime():
    code = (
        "import sys, bnfold, bnfold.latency; "
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- plot ----------------------------------------------------------------------------------------------


def synthetic_result() -> BenchResult:
    rng = np.random.default_rng(0)
    entries = tuple(
        ModelBench(model, level, LatencyStats.from_samples(rng.lognormal(0, 0.1, 50) * scale))
        for level in ("disable", "all")
        for model, scale in (("a", 1.0), ("b", 0.9))
    )
    return BenchResult(
        entries=entries,
        ratios=(),
        levels=("disable", "all"),
        threads=1,
        provider="CPUExecutionProvider",
        models=("a", "b"),
    )


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    with pytest.raises(UsageError, match=r"--plot needs matplotlib: pip install matplotlib"):
        plot(synthetic_result(), tmp_path / "latency.png")
    assert not (tmp_path / "latency.png").exists()


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot(synthetic_result(), tmp_path / "latency.png")
    assert out == tmp_path / "latency.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_needs_samples(tmp_path):
    pytest.importorskip("matplotlib")
    result = synthetic_result()
    bare = BenchResult(
        entries=tuple(
            ModelBench(e.model, e.level, LatencyStats(1, *(1.0,) * 6, math.nan, math.nan))
            for e in result.entries
        ),
        ratios=(),
        levels=result.levels,
        threads=1,
        provider="CPUExecutionProvider",
    )
    with pytest.raises(UsageError, match="no per-run samples"):
        plot(bare, tmp_path / "x.png")
