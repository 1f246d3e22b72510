"""The benchmark: check the arguments, plan the schedule, measure each level, compute the ratios."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bnfold import _ort
from bnfold.compare.inputs import parse_input_shapes
from bnfold.errors import UsageError
from bnfold.render.text import inert

from .results import (
    DEFAULT_LEVELS,
    DEFAULT_RUNS,
    BenchResult,
    LatencyStats,
    ModelBench,
    Ratio,
    level_note,
)
from .schedule import ProgressFn, _Level, _Plan, measure_level
from .sessions import _check_int, _labels, _source, _warm_up_runtime
from .statistics import _bootstrap_ratio, _median

logger = logging.getLogger("bnfold.latency")

ModelSource = str | os.PathLike | bytes


def bench(
    models: Sequence[ModelSource],
    *,
    levels: Sequence[str] | str = DEFAULT_LEVELS,
    runs: int | None = None,
    seconds: float | None = None,
    warmup: int = 10,
    intra_op_threads: int = 1,
    batch_size: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | Sequence[str] | None = None,
    provider: str = "cpu",
    seed: int = 0,
    progress: ProgressFn | None = None,
    labels: Sequence[str] | None = None,
    sessions: int | None = None,
) -> BenchResult:
    """Time ``models`` under ONNX Runtime, interleaved, at each optimization level.

    See the module docstring for the procedure and the statistics.

    Args:
        models: paths (ORT loads external data next to them), bytes of serialized models,
            ``onnx.ModelProto`` or ``onnx_ir.Model``. The first is the baseline of every ratio.
        levels: optimization levels, each of ``"disable"``, ``"basic"``, ``"extended"``, ``"all"``.
        runs: timed runs per model per level (default :data:`DEFAULT_RUNS` unless ``seconds`` is
            given; with ``seconds`` too it caps the runs).
        seconds: time budget of the timed phase per level, for all models together.
        warmup: untimed runs per model per level before the timed ones.
        intra_op_threads: threads per operator; 1 (default) for repeatable numbers, 0 for ORT's
            default.
        batch_size: first dimension of every input whose first dimension is dynamic.
        input_shapes: full shapes of inputs, ``{"x": (1, 3, 224, 224)}`` or ``["x=1,3,224,224"]``;
            other dynamic dimensions are 1.
        provider: ``"cpu"`` (default), ``"cuda"``, ``"tensorrt"`` or any ONNX Runtime provider name.
        seed: seed of the inputs (the same for every model) and of the bootstrap.
        progress: ``progress(done, total)``, called now and then during the timed phase; ``total``
            is timed runs of all models and levels, or, with ``seconds``, milliseconds of budget.
        labels: names of the models in the report (default: file names, or ``"model k"``).
        sessions: fresh sessions per model per level, among which the timed runs are split
            (default: as many as fit in about 1 s of creation per model, an even number <= 6).

    Raises:
        UsageError: bad arguments, an execution provider this onnxruntime lacks, models whose
            inputs differ from the first model's.
        InputNotFoundError: a path that does not exist.
        InvalidModelError: ONNX Runtime cannot load a model.
        BnfoldError: ONNX Runtime cannot run a model on the generated inputs.
    """
    started = time.perf_counter()
    plan = _plan(
        models,
        levels=levels,
        runs=runs,
        seconds=seconds,
        warmup=warmup,
        intra_op_threads=intra_op_threads,
        batch_size=batch_size,
        input_shapes=input_shapes,
        provider=provider,
        seed=seed,
        progress=progress,
        labels=labels,
        sessions=sessions,
    )
    import onnxruntime as ort

    _warm_up_runtime(plan.providers, plan.threads)
    entries: list[ModelBench] = []
    ratios: list[Ratio] = []
    for level_index, level in enumerate(plan.levels):
        measured = measure_level(plan, level, level_index)
        level_entries = _level_entries(plan, measured)
        entries += level_entries
        ratios += _level_ratios(plan, measured, level_entries)
    return BenchResult(
        entries=tuple(entries),
        ratios=tuple(ratios),
        levels=plan.levels,
        threads=plan.threads or 0,
        provider=plan.providers[0],
        note=level_note(plan.sources),
        models=tuple(plan.names),
        input_shapes={k: tuple(int(d) for d in v.shape) for k, v in (plan.feeds or {}).items()},
        input_shape_origins=dict(plan.shape_origins or {}),
        warmup=plan.warmup,
        runs=plan.runs,
        seconds_budget=plan.seconds,
        seed=seed,
        onnxruntime_version=ort.__version__,
        elapsed_s=time.perf_counter() - started,
    )


def _levels(levels: Sequence[str] | str) -> tuple[str, ...]:
    levels = (levels,) if isinstance(levels, str) else tuple(levels)
    levels = tuple(dict.fromkeys(str(level).strip().lower() for level in levels))
    if not levels:
        raise UsageError("give at least one optimization level")
    for level in levels:
        if level not in _ort.OPTIMIZATION_LEVELS:
            raise UsageError(
                f"unknown optimization level {level!r}; choose from "
                f"{', '.join(_ort.OPTIMIZATION_LEVELS)}"
            )
    return levels


def _seconds(seconds: Any) -> float | None:
    if seconds is None:
        return None
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"seconds must be a number > 0, got {seconds!r}")
    return seconds


def _shapes(
    input_shapes: Mapping[str, tuple[int, ...]] | Sequence[str] | None,
) -> dict[str, tuple[int, ...]]:
    if input_shapes is None:
        return {}
    if isinstance(input_shapes, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in input_shapes.items()}
    return parse_input_shapes([input_shapes] if isinstance(input_shapes, str) else input_shapes)


def _plan(
    models: Sequence[ModelSource] | ModelSource,
    *,
    levels: Sequence[str] | str,
    runs: int | None,
    seconds: float | None,
    warmup: int,
    intra_op_threads: int,
    batch_size: int | None,
    input_shapes: Mapping[str, tuple[int, ...]] | Sequence[str] | None,
    provider: str,
    seed: int,
    progress: ProgressFn | None,
    labels: Sequence[str] | None,
    sessions: int | None,
) -> _Plan:
    """Check every argument (a :class:`UsageError` names the bad one) and resolve the models."""
    if isinstance(models, (str, bytes, os.PathLike)):
        models = [models]
    models = list(models)
    if not models:
        raise UsageError("bench needs at least one model")
    level_names = _levels(levels)
    if runs is not None:
        runs = _check_int(runs, "runs", 1)
    budget = _seconds(seconds)
    if runs is None and budget is None:
        runs = DEFAULT_RUNS
    warmup = _check_int(warmup, "warmup", 0)
    threads = _check_int(intra_op_threads, "intra_op_threads", 0)
    if batch_size is not None:
        batch_size = _check_int(batch_size, "batch_size", 1)
    if sessions is not None:
        sessions = _check_int(sessions, "sessions", 1)
    shapes = _shapes(input_shapes)
    providers = _ort.resolve_providers(provider)

    resolved = [_source(m, i) for i, m in enumerate(models)]
    sources = [s for s, _ in resolved]
    names = _labels(sources, labels, [d for _, d in resolved])
    if budget is not None:
        per_level = max(1, int(budget * 1000))
    else:
        assert runs is not None
        per_level = runs * len(sources)
    return _Plan(
        sources=sources,
        names=names,
        levels=level_names,
        providers=providers,
        threads=threads or None,
        runs=runs,
        seconds=budget,
        warmup=warmup,
        sessions=sessions,
        shapes=shapes,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        per_level=per_level,
        total=per_level * len(level_names),
    )


def _level_entries(plan: _Plan, measured: _Level) -> list[ModelBench]:
    """One :class:`ModelBench` per model at this level, each logged."""
    entries = [
        ModelBench(
            plan.names[i],
            measured.level,
            LatencyStats.from_samples(
                [t for group in measured.groups[i] for t in group],
                session_create_ms=_median(measured.creates[i]),
                first_run_ms=_median(measured.firsts[i]),
                sessions=len(measured.creates[i]),
            ),
        )
        for i in range(plan.count)
    ]
    for e in entries:
        st = e.stats
        logger.info(
            "%s at %s: median %.4g ms (p90 %.4g, p99 %.4g, n=%d, %d sessions), "
            "session creation %.4g ms, first run %.4g ms",
            inert(e.model),
            measured.level,
            st.median_ms,
            st.p90_ms,
            st.p99_ms,
            st.n,
            st.sessions,
            st.session_create_ms,
            st.first_run_ms,
        )
    return entries


def _level_ratios(plan: _Plan, measured: _Level, entries: list[ModelBench]) -> list[Ratio]:
    """Every model after the first against the first: ratio of medians and its bootstrap interval."""
    baseline = entries[0].stats
    ratios = []
    for i in range(1, plan.count):
        ratio, low, high = _bootstrap_ratio(measured.groups[0], measured.groups[i], seed=plan.seed)
        create_ratio = (
            entries[i].stats.session_create_ms / baseline.session_create_ms
            if baseline.session_create_ms > 0
            else math.nan
        )
        ratios.append(
            Ratio(
                model=plan.names[i],
                baseline=plan.names[0],
                level=measured.level,
                median_ratio=ratio,
                ci_low=low,
                ci_high=high,
                significant=not (low <= 1.0 <= high),
                session_create_ratio=create_ratio,
            )
        )
        logger.info(
            "%s vs %s at %s: %.4f (%.4f-%.4f), %s",
            inert(plan.names[i]),
            inert(plan.names[0]),
            measured.level,
            ratio,
            low,
            high,
            ratios[-1].verdict,
        )
    return ratios
