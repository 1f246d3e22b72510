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

Layout
------
``benchmark`` (:func:`bench` in named phases), ``schedule`` (interleaving and session
blocks), ``sessions`` (sources, labels, inputs, errors), ``statistics`` (the bootstrap),
``results`` (the result classes), ``plotting`` (:func:`plot`).
"""

from __future__ import annotations

from .benchmark import ModelSource, bench  # noqa: F401
from .plotting import plot
from .results import (  # noqa: F401
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    DEFAULT_LEVELS,
    DEFAULT_RUNS,
    LEVEL_NOTE,
    BenchResult,
    LatencyStats,
    ModelBench,
    Ratio,
)

# Private names the tests import from here, kept reachable.
from .schedule import ProgressFn, _interleave, _RunFailed  # noqa: F401
from .statistics import _bootstrap_ratio, _groups, _resampled_medians  # noqa: F401

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
