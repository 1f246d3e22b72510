"""Latency of ONNX models under ONNX Runtime, and whether one is really faster than another.

How a benchmark runs
--------------------
Before anything is timed, a tiny Conv+BatchNormalization model is loaded and run once with the same
provider and threads, so ONNX Runtime's one-time process set-up (and a GPU's context) is not billed
to the first model. Then each optimization level (default ``"disable"`` and ``"all"``) is measured
on its own, in blocks:

1. **Sessions.** Each block creates a fresh session of every model (A, B in even blocks, B, A in
   odd ones) and times its creation and its first inference. A model keeps one session at a time.
2. **Warm-up:** ``warmup`` untimed runs per model, interleaved like the timed runs.
3. **Timed runs, interleaved.** Each round runs the models forward then backward (A, B, B, A for two
   models; A, B, C, C, B, A for three), so slow drift of the machine (clock frequency, heat, other
   processes) and cache warmth hit every model alike. Python's garbage collector is paused.

The timed runs (``runs`` per model, or ``seconds`` for all models together, with at least one full
round per block) are split evenly among the blocks. There are as many blocks as fit in about 1 s
of session creation per model, an even number up to 6 (so both creation orders occur equally), or
1 for a model that takes longer, or ``sessions``. Why several: two sessions of the *same* model
can differ by 1-2% in speed (where their buffers landed in memory), measured on cnn2d with
ordinary run-to-run noise 10 times smaller, so a comparison that used one session per model would
call such a difference significant. ``session_create_ms`` and ``first_run_ms`` are the medians
over the blocks.

One run is the wall time of one ``session.run`` on the same seeded inputs (built once from the first
model's inputs with :func:`bnfold.compare.make_inputs`), measured with ``time.perf_counter_ns``. For
GPU providers that includes copying inputs and outputs between host and device: it is what a caller
of ``session.run`` waits for. Statistics per model and level, over all its timed runs: median, p90,
p99 (numpy's linear interpolation), min, mean and std (``ddof=1``), in milliseconds.

Is a difference real?
---------------------
Every model after the first (the baseline) gets, per level, ``median_ratio = median(model) /
median(baseline)``: below 1 it is faster. Its 95% confidence interval is a seeded percentile
bootstrap with 2000 resamples of each model's runs, independently per model: a resample picks the
model's sessions with replacement and, for each pick, that many runs with replacement from the
picked session (with one session, simply the runs with replacement), so session-to-session
differences widen the interval as they should. The 2.5th and 97.5th percentiles of the resampled
ratios of medians bound it. When it contains 1.0 the report says "no significant difference". The
interval covers noise within this process on this machine; another machine, build or thread count
can rank the models differently, and with one session per model (big models) a difference of 1-2%
may be the sessions', not the models'.

Why one thread by default
-------------------------
``intra_op_threads=1`` makes runs repeatable: no thread-pool wake-ups or spinning, no dependence on
the number of cores, little interference from other processes, so the interval is narrow and a small
gain is detectable. The work the fold removes (a BatchNormalization pass over each activation) is
per-element work that shrinks alike with more threads, so the ratio at one thread is a fair reading
of the ratio at many. Absolute times at one thread are not deployment times: pass ``0`` for ONNX
Runtime's default (one thread per physical core).

Optimization levels
-------------------
ONNX Runtime fuses Conv+BatchNormalization itself from level ``"basic"`` up (see :data:`LEVEL_NOTE`).
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold import _ort
from bnfold.compare import make_inputs, parse_input_shapes
from bnfold.errors import BnfoldError, InputNotFoundError, InvalidModelError, UsageError

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_RUNS",
    "LEVEL_NOTE",
    "BenchResult",
    "LatencyStats",
    "ModelBench",
    "Ratio",
    "bench",
    "plot",
]

logger = logging.getLogger(__name__)

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

_CREATE_BUDGET_S = 1.0  # session creations + first runs per model and level stay within about this
_MAX_SESSIONS = 6
_MIN_HALF_ROUNDS = 2  # with a time budget, at least one full ABBA round
_PROGRESS_EVERY_NS = 50_000_000  # call the progress callback at most every 50 ms
_BOOTSTRAP_CHUNK = 2_000_000  # resampled run indices held in memory at once
_BOOTSTRAP_MAX_RUNS = 10_000  # more runs per model are thinned for the interval (about 1 s)

ModelSource = str | os.PathLike | bytes
ProgressFn = Callable[[int, int], None]


# --- results ---------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


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
        table row per model per level, then the note on optimization levels."""
        threads = (
            "ONNX Runtime's default threads"
            if self.threads == 0
            else (f"{self.threads} intra-op thread{'s' if self.threads != 1 else ''}")
        )
        shapes = ", ".join(
            f"`{name}` [{', '.join(map(str, shape))}]" for name, shape in self.input_shapes.items()
        )
        timed = (
            f"{self.runs} timed runs"
            if self.seconds_budget is None
            else f"{self.seconds_budget:g} s of timed runs per level"
            + (f" (at most {self.runs} per model)" if self.runs is not None else "")
        )
        counts = sorted({e.stats.sessions for e in self.entries}) or [1]
        sessions = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        lines = [
            "### bnfold bench",
            "",
            f"onnxruntime {self.onnxruntime_version or '?'}, {self.provider}, {threads}; "
            f"inputs {shapes or 'none'}; {self.warmup} warm-up runs and {timed} per model per "
            f"level, interleaved (ABBA), spread over {sessions} fresh session(s) per model "
            "(session creation and first run: medians over them). Ratios are median / baseline "
            f"median with a {_percent(self.confidence)} bootstrap interval; below 1 is faster.",
            "",
            "| level | model | runs | median ms | p90 ms | p99 ms | min ms | mean ± std ms "
            "| session creation ms | first run ms | vs baseline | session creation vs baseline |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
        ]
        ratios = {(r.model, r.level): r for r in self.ratios}
        for e in self.entries:
            s = e.stats
            r = ratios.get((e.model, e.level))
            if r is None:
                vs, create_vs = ("baseline", "") if e.model == self.baseline else ("", "")
            else:
                vs = f"{r.median_ratio:.3f}× ({r.ci_low:.3f}–{r.ci_high:.3f}) " + (
                    f"**{r.verdict}**" if r.significant else r.verdict
                )
                create_vs = (
                    f"{r.session_create_ratio:.2f}×"
                    if math.isfinite(r.session_create_ratio)
                    else "–"
                )
            lines.append(
                "| "
                + " | ".join(
                    [
                        e.level,
                        _cell(e.model),
                        str(s.n),
                        _ms(s.median_ms),
                        _ms(s.p90_ms),
                        _ms(s.p99_ms),
                        _ms(s.min_ms),
                        f"{_ms(s.mean_ms)} ± {_ms(s.std_ms)}",
                        _ms(s.session_create_ms),
                        _ms(s.first_run_ms),
                        vs,
                        create_vs,
                    ]
                )
                + " |"
            )
        lines += ["", f"> {self.note}", ""]
        return "\n".join(lines)

    @property
    def confidence(self) -> float:
        return self.ratios[0].confidence if self.ratios else CONFIDENCE


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _ms(value: float) -> str:
    """Three significant digits, no exponent: 0.0961, 1.23, 12.3, 1234."""
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    decimals = min(4, max(0, 2 - math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


# --- statistics --------------------------------------------------------------------------------------


def _resampled_medians(
    groups: Sequence[Sequence[float]], resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Medians of ``resamples`` two-level bootstrap resamples of runs grouped by session.

    Each resample picks as many sessions as there are, with replacement, and for each pick draws
    that slot's number of runs, with replacement, from the picked session; with one session this
    is the plain bootstrap of the runs. Beyond ``_BOOTSTRAP_MAX_RUNS`` runs, every k-th run of each
    session is used (the cost grows with the runs; fewer runs can only widen the interval).
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not arrays:
        raise ValueError("cannot bootstrap an empty sample")
    step = math.ceil(sum(a.size for a in arrays) / _BOOTSTRAP_MAX_RUNS)
    if step > 1:
        arrays = [a[::step] for a in arrays]
    flat = np.concatenate(arrays)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = flat.size
    low, high = (n - 1) // 2, n // 2  # the median is the mean of these order statistics
    chunk = max(1, min(resamples, _BOOTSTRAP_CHUNK // n))
    medians = np.empty(resamples)
    for first in range(0, resamples, chunk):
        count = min(chunk, resamples - first)
        picked = rng.integers(0, sizes.size, size=(count, sizes.size))  # a session per slot
        draws = np.empty((count, n))
        column = 0
        for slot, size in enumerate(sizes):
            session = picked[:, slot, None]
            within = (rng.random((count, size)) * sizes[session]).astype(np.int64)
            draws[:, column : column + size] = flat[offsets[session] + within]
            column += size
        ordered = np.partition(draws, (low, high), axis=1)
        medians[first : first + count] = (ordered[:, low] + ordered[:, high]) / 2.0
    return medians


def _groups(samples: Sequence[float] | Sequence[Sequence[float]]) -> list[Sequence[float]]:
    """``samples`` as a list of per-session groups (a flat sequence is one group)."""
    items = list(samples)
    if items and all(np.ndim(item) == 0 for item in items):
        return [items]
    return items


def _bootstrap_ratio(
    baseline: Sequence[float] | Sequence[Sequence[float]],
    candidate: Sequence[float] | Sequence[Sequence[float]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(median(candidate) / median(baseline), ci_low, ci_high)`` by a seeded percentile bootstrap.

    Each argument is the run times of one model, flat or grouped by session (a list of lists);
    each model is resampled independently, by :func:`_resampled_medians`.
    """
    base, cand = _groups(baseline), _groups(candidate)
    rng = np.random.default_rng(seed)
    ratio = float(np.median(np.concatenate(cand)) / np.median(np.concatenate(base)))
    ratios = _resampled_medians(cand, resamples, rng) / _resampled_medians(base, resamples, rng)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return ratio, float(low), float(high)


# --- the interleaved loop ---------------------------------------------------------------------------


class _RunFailed(Exception):
    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


def _interleave(
    runners: Sequence[Callable[[], object]],
    *,
    runs: int | None,
    seconds: float | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
    on_half_round: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """Time ``runners`` in ABBA order; return each runner's run times in milliseconds.

    Half-round ``h`` calls every runner once, forward for even ``h`` and backward for odd ``h``, so
    each runner gets one run per half-round. Stops after ``runs`` half-rounds, or once ``seconds``
    have passed since the start (checked after each half-round, at least ``_MIN_HALF_ROUNDS``),
    whichever comes first. ``clock`` returns nanoseconds; ``on_half_round(done, elapsed_ns)`` is
    called after each half-round. An exception from runner ``i`` comes out as ``_RunFailed(i)``.
    """
    if runs is None and seconds is None:
        raise ValueError("give runs or seconds")
    budget_ns = None if seconds is None else int(seconds * 1e9)
    samples: list[list[float]] = [[] for _ in runners]
    forward = list(range(len(runners)))
    orders = (forward, forward[::-1])
    start = clock()
    half = 0
    i = 0
    try:
        while runs is None or half < runs:
            for i in orders[half % 2]:
                run = runners[i]
                t0 = clock()
                run()
                t1 = clock()
                samples[i].append((t1 - t0) / 1e6)
            half += 1
            elapsed = clock() - start
            if on_half_round is not None:
                on_half_round(half, elapsed)
            if budget_ns is not None and half >= _MIN_HALF_ROUNDS and elapsed >= budget_ns:
                break
    except Exception as exc:
        raise _RunFailed(i, exc) from exc
    return samples


# --- sessions and inputs ---------------------------------------------------------------------------


def _source(model: Any, index: int) -> tuple[str | bytes, str]:
    """ORT source (path or bytes) and a default label for one model argument."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), f"model {index + 1}"
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise InputNotFoundError(f"model not found: {path}")
        return path, path
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        return model.SerializeToString(), f"model {index + 1}"
    try:
        import onnx_ir as ir
    except ImportError:  # pragma: no cover - onnx_ir is a dependency
        ir = None
    if ir is not None and isinstance(model, ir.Model):
        return ir.to_proto(model).SerializeToString(), f"model {index + 1}"
    raise TypeError(
        f"a model must be a path, bytes, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}"
    )


def _labels(
    sources: Sequence[str | bytes], given: Sequence[str] | None, defaults: Sequence[str]
) -> list[str]:
    if given is not None:
        labels = [str(label) for label in given]
        if len(labels) != len(sources):
            raise UsageError(f"{len(labels)} labels given for {len(sources)} models")
        if len(set(labels)) != len(labels):
            raise UsageError("model labels must be unique")
        return labels
    # File names where they are unique; the path where two different files share a name; "#k"
    # after the name for the same file given twice.
    names = [
        os.path.basename(d) if isinstance(src, str) else d
        for src, d in zip(sources, defaults, strict=True)
    ]
    labels = []
    for name, default in zip(names, defaults, strict=True):
        same_name = {d for n, d in zip(names, defaults, strict=True) if n == name}
        labels.append(name if len(same_name) == 1 else default)
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


@functools.lru_cache(maxsize=1)
def _warm_up_model() -> bytes:
    """A tiny Conv+BatchNormalization+Relu model (built with onnx_ir: this module must not import onnx)."""
    import onnx_ir as ir

    text = """<ir_version: 8, opset_import: ["" : 17]>
    warmup (float[1, 1, 2, 2] x) => (float[1, 1, 2, 2] y)
    <float[1, 1, 1, 1] w = {1.0}, float[1] s = {1.0}, float[1] b = {0.0}, float[1] m = {0.0},
     float[1] v = {1.0}>
    { c = Conv(x, w)  n = BatchNormalization(c, s, b, m, v)  y = Relu(n) }"""
    return ir.to_proto(ir.from_onnx_text(text)).SerializeToString()


def _warm_up_runtime(providers: list[str], threads: int | None) -> None:
    """Pay ONNX Runtime's one-time set-up (and a GPU's context) before anything is timed."""
    try:
        session = _ort.make_session(
            _warm_up_model(), level="disable", intra_op_threads=threads, providers=providers
        )
        _ort.run(session, {"x": np.ones((1, 1, 2, 2), np.float32)})
    except Exception as exc:  # the real models will say what is wrong, with their names
        logger.debug("ONNX Runtime warm-up failed: %s", exc)


def _format_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _is_fixed(dim: Any) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0


def _shapes_with_batch(
    session_inputs: Sequence[Any],
    input_shapes: Mapping[str, tuple[int, ...]],
    batch_size: int | None,
) -> dict[str, tuple[int, ...]]:
    """``input_shapes`` plus, for each input whose first dimension is dynamic, ``batch_size`` there
    (its other dimensions fixed or 1)."""
    shapes = dict(input_shapes)
    if batch_size is None:
        return shapes
    batched = []
    for spec in session_inputs:
        dims = list(spec.shape or ())
        if not dims or _is_fixed(dims[0]):
            continue
        batched.append(spec.name)
        if spec.name in shapes:
            if shapes[spec.name][:1] != (batch_size,):
                raise UsageError(
                    f"batch size {batch_size} contradicts the input shape given for "
                    f"{spec.name!r}: {_format_shape(shapes[spec.name])}"
                )
            continue
        shapes[spec.name] = (batch_size, *(int(d) if _is_fixed(d) else 1 for d in dims[1:]))
    if not batched:
        described = ", ".join(f"{s.name} {_format_shape(s.shape or ())}" for s in session_inputs)
        raise UsageError(
            f"batch size {batch_size} given, but no input has a dynamic first dimension "
            f"(inputs: {described or 'none'}); use input shapes instead"
        )
    return shapes


def _check_inputs(label: str, baseline: str, session: Any, feeds: Mapping[str, np.ndarray]) -> None:
    """Every model must accept the baseline's inputs: same names and types, compatible shapes."""
    have = {i.name: i for i in session.get_inputs()}
    if set(have) != set(feeds):
        raise UsageError(
            f"{label} has inputs ({', '.join(have) or 'none'}) but {baseline} has "
            f"({', '.join(feeds) or 'none'}); bench feeds every model the same inputs"
        )
    for name, value in feeds.items():
        spec = have[name]
        try:
            dtype = _ort.ort_type_to_numpy(spec.type)
        except ValueError:
            dtype = None
        if dtype != value.dtype:
            raise UsageError(
                f"input {name!r} of {label} is {spec.type} but {baseline}'s is {value.dtype}"
            )
        dims = list(spec.shape or ())
        if not dims:  # a scalar or unknown rank: ORT reports both as []
            continue
        if len(dims) != value.ndim or any(
            _is_fixed(d) and int(d) != n for d, n in zip(dims, value.shape, strict=True)
        ):
            raise UsageError(
                f"input {name!r} of {label} has shape {_format_shape(dims)}, which does not accept "
                f"the inputs built from {baseline}: {_format_shape(value.shape)}"
            )


def _open_session(
    source: str | bytes, label: str, level: str, providers: list[str], threads: int | None
) -> tuple[Any, float]:
    """A session of ``source`` and the milliseconds its creation took."""
    t0 = time.perf_counter_ns()
    try:
        session = _ort.make_session(
            source, level=level, intra_op_threads=threads, providers=providers
        )
    except InvalidModelError as exc:
        raise InvalidModelError(f"{label}: {exc}") from exc
    elapsed_ms = (time.perf_counter_ns() - t0) / 1e6
    used = session.get_providers()
    if used[:1] != providers[:1]:
        raise UsageError(
            f"ONNX Runtime could not use {providers[0]} for {label} (it fell back to "
            f"{', '.join(used)}); check the GPU driver and the CUDA/cuDNN/TensorRT libraries"
        )
    return session, elapsed_ms


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else math.nan


# --- the benchmark -----------------------------------------------------------------------------------


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
    if isinstance(models, (str, bytes, os.PathLike)):
        models = [models]
    models = list(models)
    if not models:
        raise UsageError("bench needs at least one model")
    levels = (levels,) if isinstance(levels, str) else tuple(levels)
    levels = tuple(dict.fromkeys(str(level).strip().lower() for level in levels))
    if not levels:
        raise UsageError("give at least one optimization level")
    for level in levels:
        if level not in _ort.OPTIMIZATION_LEVELS:
            raise UsageError(
                f"unknown optimization level {level!r}; choose from {', '.join(_ort.OPTIMIZATION_LEVELS)}"
            )
    if runs is not None:
        runs = _check_int(runs, "runs", 1)
    if seconds is not None:
        try:
            seconds = float(seconds)
        except (TypeError, ValueError):
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise UsageError(f"seconds must be a number > 0, got {seconds!r}")
    if runs is None and seconds is None:
        runs = DEFAULT_RUNS
    warmup = _check_int(warmup, "warmup", 0)
    threads = _check_int(intra_op_threads, "intra_op_threads", 0)
    if batch_size is not None:
        batch_size = _check_int(batch_size, "batch_size", 1)
    if sessions is not None:
        sessions = _check_int(sessions, "sessions", 1)
    if input_shapes is None:
        shapes: dict[str, tuple[int, ...]] = {}
    elif isinstance(input_shapes, Mapping):
        shapes = {str(k): tuple(int(d) for d in v) for k, v in input_shapes.items()}
    else:
        shapes = parse_input_shapes(
            [input_shapes] if isinstance(input_shapes, str) else input_shapes
        )
    providers = _ort.resolve_providers(provider)

    resolved = [_source(m, i) for i, m in enumerate(models)]
    sources = [s for s, _ in resolved]
    names = _labels(sources, labels, [d for _, d in resolved])

    import onnxruntime as ort

    ort_threads = threads or None
    _warm_up_runtime(providers, ort_threads)

    count = len(sources)
    per_level = (runs * count) if seconds is None else max(1, int(seconds * 1000))
    total = per_level * len(levels)
    feeds: dict[str, np.ndarray] | None = None
    entries: list[ModelBench] = []
    ratios: list[Ratio] = []

    for level_index, level in enumerate(levels):
        # Fresh sessions per block, created in ABBA order; each block times its share of the runs.
        runners: list[Callable[[], None] | None] = [None] * count
        creates: list[list[float]] = [[] for _ in range(count)]
        firsts: list[list[float]] = [[] for _ in range(count)]
        groups: list[list[list[float]]] = [[] for _ in range(count)]
        planned = sessions
        base = level_index * per_level
        done_before = 0
        block = 0
        while planned is None or block < planned:
            for i in range(count)[:: -1 if block % 2 else 1]:
                runners[i] = None  # free this model's previous session first
                session, create_ms = _open_session(
                    sources[i], names[i], level, providers, ort_threads
                )
                if feeds is None:
                    session_inputs = session.get_inputs()
                    feeds = make_inputs(
                        session_inputs,
                        input_shapes=_shapes_with_batch(session_inputs, shapes, batch_size),
                        seed=seed,
                    )
                elif level_index == 0 and block == 0:
                    _check_inputs(names[i], names[0], session, feeds)
                runner = _ort.make_runner(session, feeds)
                del session
                t0 = time.perf_counter_ns()
                try:
                    runner()
                except _ort.OrtRunError as exc:
                    raise _run_error(names[i], level, feeds, exc) from exc
                firsts[i].append((time.perf_counter_ns() - t0) / 1e6)
                creates[i].append(create_ms)
                runners[i] = runner
            if planned is None:
                slowest_ms = max(c[0] + f[0] for c, f in zip(creates, firsts, strict=True))
                fit = int(_CREATE_BUDGET_S * 1000 // max(slowest_ms, 1e-3))
                planned = max(1, min(_MAX_SESSIONS, fit) // 2 * 2)
            if runs is not None:
                planned = min(planned, runs)
            block_runs = None if runs is None else runs // planned + (block < runs % planned)
            block_seconds = None if seconds is None else seconds / planned
            ready = [r for r in runners if r is not None]
            assert feeds is not None and len(ready) == count

            last = [-_PROGRESS_EVERY_NS]
            share = per_level if seconds is None else per_level // planned

            def report(
                half: int,
                elapsed_ns: int,
                start: int = base + done_before,
                share: int = share,
                last: list[int] = last,
            ) -> None:
                if progress is None or elapsed_ns - last[0] < _PROGRESS_EVERY_NS:
                    return
                last[0] = elapsed_ns
                done = half * count if seconds is None else elapsed_ns // 1_000_000
                progress(min(start + min(done, share), total), total)

            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                if warmup:
                    _interleave(ready, runs=warmup)
                timed = _interleave(
                    ready, runs=block_runs, seconds=block_seconds, on_half_round=report
                )
            except _RunFailed as failed:
                if isinstance(failed.error, _ort.OrtRunError):
                    raise _run_error(names[failed.index], level, feeds, failed.error) from None
                raise failed.error from None
            finally:
                if gc_was_enabled:
                    gc.enable()
            for i in range(count):
                groups[i].append(timed[i])
            done_before += (len(timed[0]) * count) if seconds is None else share
            if progress is not None:
                progress(min(base + done_before, total), total)
            del ready, timed
            block += 1
        runners[:] = [None] * count
        gc.collect()
        if progress is not None:
            progress(base + per_level, total)

        level_entries = [
            ModelBench(
                names[i],
                level,
                LatencyStats.from_samples(
                    [t for group in groups[i] for t in group],
                    session_create_ms=_median(creates[i]),
                    first_run_ms=_median(firsts[i]),
                    sessions=len(creates[i]),
                ),
            )
            for i in range(count)
        ]
        entries += level_entries
        for e in level_entries:
            st = e.stats
            logger.info(
                "%s at %s: median %.4g ms (p90 %.4g, p99 %.4g, n=%d, %d sessions), "
                "session creation %.4g ms, first run %.4g ms",
                e.model,
                level,
                st.median_ms,
                st.p90_ms,
                st.p99_ms,
                st.n,
                st.sessions,
                st.session_create_ms,
                st.first_run_ms,
            )
        baseline = level_entries[0].stats
        for i in range(1, count):
            ratio, low, high = _bootstrap_ratio(groups[0], groups[i], seed=seed)
            create_ratio = (
                level_entries[i].stats.session_create_ms / baseline.session_create_ms
                if baseline.session_create_ms > 0
                else math.nan
            )
            ratios.append(
                Ratio(
                    model=names[i],
                    baseline=names[0],
                    level=level,
                    median_ratio=ratio,
                    ci_low=low,
                    ci_high=high,
                    significant=not (low <= 1.0 <= high),
                    session_create_ratio=create_ratio,
                )
            )
            logger.info(
                "%s vs %s at %s: %.4f (%.4f-%.4f), %s",
                names[i],
                names[0],
                level,
                ratio,
                low,
                high,
                ratios[-1].verdict,
            )

    return BenchResult(
        entries=tuple(entries),
        ratios=tuple(ratios),
        levels=levels,
        threads=threads,
        provider=providers[0],
        note=LEVEL_NOTE,
        models=tuple(names),
        input_shapes={k: tuple(int(d) for d in v.shape) for k, v in (feeds or {}).items()},
        warmup=warmup,
        runs=runs,
        seconds_budget=seconds,
        seed=seed,
        onnxruntime_version=ort.__version__,
        elapsed_s=time.perf_counter() - started,
    )


def _run_error(
    label: str, level: str, feeds: Mapping[str, np.ndarray] | None, error: Exception
) -> BnfoldError:
    text = str(error).removeprefix("ONNX Runtime failed to run the model: ")
    shapes = ", ".join(f"{k}={','.join(map(str, v.shape))}" for k, v in (feeds or {}).items())
    return BnfoldError(
        f"ONNX Runtime cannot run {label} (level {level!r}) on inputs {shapes or 'none'}: {text}; "
        "if it needs other shapes, give input shapes or a batch size"
    )


# --- plot ----------------------------------------------------------------------------------------------


def plot(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Write the latency distributions of ``result`` as a PNG: one panel per level, one box per model.

    Needs matplotlib (``pip install 'bnfold[plot]'``); raises :class:`UsageError` without it, or when
    the result carries no per-run samples. Returns the path written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'bnfold[plot]'") from None
    if not result.entries or any(not e.stats.samples_ms for e in result.entries):
        raise UsageError("the benchmark result has no per-run samples to plot")
    levels = list(result.levels) or list(dict.fromkeys(e.level for e in result.entries))
    models = list(result.models) or list(dict.fromkeys(e.model for e in result.entries))
    width = max(4.0, 1.2 + 1.1 * len(models)) * len(levels)
    figure = Figure(figsize=(min(width, 24.0), 4.8), layout="constrained")
    axes = figure.subplots(1, len(levels), sharey=True, squeeze=False)[0]
    # The axis ends above the largest p95: rare slow runs would squash the boxes; how many runs lie
    # above it is written at the top of each box.
    low = min(e.stats.min_ms for e in result.entries)
    high = max(float(np.percentile(e.stats.samples_ms, 95)) for e in result.entries)
    top = high + 0.5 * max(high - low, 0.02 * high)
    bottom = max(0.0, low - 0.1 * (top - low))
    for axis, level in zip(axes, levels, strict=True):
        level_entries = [e for e in result.entries if e.level == level]
        axis.boxplot(
            [e.stats.samples_ms for e in level_entries],
            showfliers=True,
            flierprops={"markersize": 2, "alpha": 0.4},
            medianprops={"color": "black"},
        )
        for position, e in enumerate(level_entries, start=1):
            above = sum(1 for v in e.stats.samples_ms if v > top)
            if above:
                axis.annotate(
                    f"{above} above",
                    (position, top),
                    xytext=(0, -10),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                    color="gray",
                )
        axis.set_ylim(bottom, top)
        axis.set_xticks(
            range(1, len(level_entries) + 1),
            [f"{e.model}\nmedian {_ms(e.stats.median_ms)} ms" for e in level_entries],
            rotation=15 if len(level_entries) > 3 else 0,
            fontsize=8,
        )
        axis.set_title(f"level {level!r}")
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("latency per run (ms)")
    threads = (
        "ONNX Runtime's default threads"
        if result.threads == 0
        else f"{result.threads} thread{'s' if result.threads != 1 else ''}"
    )
    figure.suptitle(f"bnfold bench: {result.provider}, {threads}, ABBA-interleaved runs")
    out = Path(path)
    figure.savefig(out, format="png", dpi=120)
    logger.info("wrote latency plot %s", out)
    return out
