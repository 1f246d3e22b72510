"""The statistics of a benchmark: a two-level (session, run) bootstrap of the ratio of medians."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .results import BOOTSTRAP_RESAMPLES, CONFIDENCE

_BOOTSTRAP_CHUNK = 2_000_000  # resampled run indices held in memory at once
_BOOTSTRAP_MAX_RUNS = 10_000  # more runs per model are thinned for the interval (about 1 s)


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


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else math.nan
