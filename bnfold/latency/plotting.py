"""The latency plot: one panel per optimization level, one box per model (needs matplotlib)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from bnfold._text import format_ms as _ms
from bnfold.errors import UsageError
from bnfold.render.text import inert

from .results import BenchResult

logger = logging.getLogger("bnfold.latency")


def plot(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Write the latency distributions of ``result`` as a PNG: one panel per level, one box per model.

    Needs matplotlib (``pip install matplotlib``, or ``pip install '.[plot]'`` in a checkout); raises :class:`UsageError` without it, or when
    the result carries no per-run samples. Returns the path written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib: pip install matplotlib "
            "(or, in a bnfold checkout, pip install '.[plot]')"
        ) from None
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
    logger.info("wrote latency plot %s", inert(out))
    return out
