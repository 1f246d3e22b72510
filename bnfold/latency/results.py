"""What a benchmark measured: per-model latency statistics, ratios with intervals, settings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold._text import finite_or_none as _finite_or_none

DEFAULT_LEVELS: tuple[str, ...] = ("disable", "all")
#: Timed runs per model per level when neither ``runs`` nor ``seconds`` is given.
DEFAULT_RUNS = 200
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

LEVEL_NOTE = (
    "ONNX Runtime fuses Conv+BatchNormalization by itself at optimization level 'basic' and above, "
    "so the fold's latency gain shows mostly at 'disable'; at 'all' both models run much the same "
    "fused graph, and the fold mainly saves session-creation time (ONNX Runtime no longer has to "
    "fuse at load)."
)

NO_CONV_BN_NOTE = (
    "ONNX Runtime fuses BatchNormalization into a preceding Conv by itself (from level 'basic'); "
    "these models hold no Conv followed by a BatchNormalization (e.g. Gemm+BN, which it does not "
    "fuse), so a difference between them can show at every level."
)
NO_BN_NOTE = (
    "None of these models holds a BatchNormalization: the levels differ only by ONNX Runtime's "
    "other graph optimizations."
)


def level_note(sources: Sequence[str | bytes]) -> str:
    """The note on optimization levels that fits these models: Conv+BN fusion is mentioned only
    when some model has a Conv feeding a BatchNormalization (the one pattern ONNX Runtime fuses
    itself). Models given as bytes, or that do not load, get the general note."""
    from bnfold import io as _io
    from bnfold.errors import BnfoldError

    seen_bn = conv_bn = False
    for source in sources:
        if not isinstance(source, str):
            return LEVEL_NOTE
        try:
            graph = _io.load(source).graph
        except BnfoldError:
            return LEVEL_NOTE
        for node in graph:
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            seen_bn = True
            producer = node.inputs[0].producer() if node.inputs and node.inputs[0] else None
            conv_bn = conv_bn or (producer is not None and producer.op_type == "Conv")
    if conv_bn:
        return LEVEL_NOTE
    return NO_CONV_BN_NOTE if seen_bn else NO_BN_NOTE


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model at one optimization level, in milliseconds.

    ``n`` timed runs give median, p90, p99, min, mean and std (``ddof=1``; 0 for one run).
    The runs were split evenly among ``sessions`` fresh sessions; ``session_create_ms`` and
    ``first_run_ms`` are medians over those sessions (creation, then that session's first
    inference). ``samples_ms`` keeps every timed run in the order it ran, for plots;
    :meth:`to_dict` leaves it out unless asked.
    """

    n: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    session_create_ms: float
    first_run_ms: float
    sessions: int = 1
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_samples(
        cls,
        samples_ms: Sequence[float],
        *,
        session_create_ms: float = math.nan,
        first_run_ms: float = math.nan,
        sessions: int = 1,
    ) -> LatencyStats:
        """Statistics of ``samples_ms`` (at least one run)."""
        values = np.asarray(samples_ms, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError("LatencyStats needs at least one timed run")
        median, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(
            n=int(values.size),
            median_ms=float(median),
            p90_ms=float(p90),
            p99_ms=float(p99),
            min_ms=float(values.min()),
            mean_ms=float(values.mean()),
            std_ms=float(values.std(ddof=1)) if values.size > 1 else 0.0,
            session_create_ms=float(session_create_ms),
            first_run_ms=float(first_run_ms),
            sessions=int(sessions),
            samples_ms=tuple(float(v) for v in values),
        )

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        """JSON-ready dict; ``samples=True`` adds ``samples_ms`` (every timed run, in order)."""
        out: dict[str, Any] = {
            "n": self.n,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "min_ms": self.min_ms,
            "mean_ms": self.mean_ms,
            "std_ms": self.std_ms,
            "session_create_ms": _finite_or_none(self.session_create_ms),
            "first_run_ms": _finite_or_none(self.first_run_ms),
            "sessions": self.sessions,
        }
        if samples:
            out["samples_ms"] = list(self.samples_ms)
        return out


@dataclass(frozen=True)
class ModelBench:
    """One model at one optimization level."""

    model: str
    level: str
    stats: LatencyStats

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        return {
            "model": self.model,
            "level": self.level,
            "stats": self.stats.to_dict(samples=samples),
        }


@dataclass(frozen=True)
class Ratio:
    """``model`` against ``baseline`` at one level; below 1 means ``model`` is faster.

    ``median_ratio`` is median(model) / median(baseline); ``ci_low``/``ci_high`` its bootstrap
    confidence interval (``confidence``, ``resamples``); ``significant`` is False when the interval
    contains 1.0. ``session_create_ratio`` compares the median session-creation times (no interval:
    there are only a few creations).
    """

    model: str
    baseline: str
    level: str
    median_ratio: float
    ci_low: float
    ci_high: float
    significant: bool
    session_create_ratio: float
    confidence: float = CONFIDENCE
    resamples: int = BOOTSTRAP_RESAMPLES

    @property
    def verdict(self) -> str:
        """``"12.3% faster"``, ``"4.0% slower"`` or ``"no significant difference"``."""
        if not self.significant:
            return "no significant difference"
        change = (1.0 - self.median_ratio) * 100.0
        return f"{abs(change):.1f}% {'faster' if change > 0 else 'slower'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "baseline": self.baseline,
            "level": self.level,
            "median_ratio": _finite_or_none(self.median_ratio),
            "ci_low": _finite_or_none(self.ci_low),
            "ci_high": _finite_or_none(self.ci_high),
            "confidence": self.confidence,
            "resamples": self.resamples,
            "significant": self.significant,
            "verdict": self.verdict,
            "session_create_ratio": _finite_or_none(self.session_create_ratio),
        }


@dataclass(frozen=True)
class BenchResult:
    """What :func:`bench` measured: one :class:`ModelBench` per model per level (levels outer, models
    in the order given), one :class:`Ratio` per model after the first per level, and the settings.

    ``threads`` is the ``intra_op_threads`` asked for (0: ONNX Runtime's default). ``provider`` is the
    ONNX Runtime provider that ran the models. ``note`` explains what the levels mean for a fold.
    """

    entries: tuple[ModelBench, ...]
    ratios: tuple[Ratio, ...]
    levels: tuple[str, ...]
    threads: int
    provider: str
    note: str = LEVEL_NOTE
    models: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_shape_origins: Mapping[str, str] = field(default_factory=dict)  # given/fixed/derived
    warmup: int = 0
    runs: int | None = None
    seconds_budget: float | None = None
    seed: int = 0
    onnxruntime_version: str = ""
    elapsed_s: float = 0.0

    @property
    def baseline(self) -> str | None:
        """The first model's label: the one every ratio compares against."""
        return self.models[0] if self.models else None

    def entry(self, model: str, level: str) -> ModelBench:
        for e in self.entries:
            if e.model == model and e.level == level:
                return e
        raise KeyError((model, level))

    def ratio(self, model: str, level: str) -> Ratio:
        for r in self.ratios:
            if r.model == model and r.level == level:
                return r
        raise KeyError((model, level))

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        """JSON-ready dict; ``samples=True`` includes every timed run of every entry."""
        return {
            "models": list(self.models),
            "baseline": self.baseline,
            "levels": list(self.levels),
            "threads": self.threads,
            "provider": self.provider,
            "onnxruntime_version": self.onnxruntime_version,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "input_shape_origins": dict(self.input_shape_origins),
            "warmup": self.warmup,
            "runs": self.runs,
            "seconds_budget": self.seconds_budget,
            "seed": self.seed,
            "elapsed_s": self.elapsed_s,
            "note": self.note,
            "entries": [e.to_dict(samples=samples) for e in self.entries],
            "ratios": [r.to_dict() for r in self.ratios],
        }

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown report (e.g. for ``$GITHUB_STEP_SUMMARY``): settings, one
        table row per model per level, then the note on optimization levels
        (:func:`bnfold.render.markdown.bench_markdown`)."""
        from bnfold.render.markdown import bench_markdown

        return bench_markdown(self)

    def __repr__(self) -> str:
        from bnfold.render import summary

        return summary.one_line("BenchResult", summary.bench(self))

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    @property
    def confidence(self) -> float:
        return self.ratios[0].confidence if self.ratios else CONFIDENCE
