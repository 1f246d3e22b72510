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


def _zoom(entries: list) -> tuple[float, float]:
    """``(bottom, top)`` of one panel: from just below the fastest run to a little above the
    largest p95 of its models."""
    low = min(e.stats.min_ms for e in entries)
    high = max(float(np.percentile(e.stats.samples_ms, 95)) for e in entries)
    top = high + 0.5 * max(high - low, 0.02 * high)
    return max(0.0, low - 0.1 * (top - low)), top


def _mark_outliers(axis, position: int, above: list[float], top: float) -> None:  # noqa: ANN001
    """Runs beyond the zoomed axis: a triangle on the top edge and "N above (max X ms)"."""
    if not above:
        return
    axis.plot([position], [top], marker="^", color="red", markersize=6, clip_on=False)
    axis.annotate(
        f"{len(above)} above (max {_ms(max(above))} ms)",
        (position, top),
        xytext=(0, -12),
        textcoords="offset points",
        ha="center",
        fontsize=7,
        color="red",
    )


def plot(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Write the latency distributions of ``result`` as a PNG: one panel per level, one box per model.

    Needs matplotlib (``pip install matplotlib``, or ``pip install '.[plot]'`` in a checkout);
    raises :class:`UsageError` without it, or when the result carries no per-run samples. Returns
    the path written.
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
    # Each panel has its own y-axis, zoomed to its data: levels differ by 10x and more, and rare
    # slow runs would squash the boxes. The axis ends a little above the panel's largest p95; the
    # runs above it are drawn as triangles on the top edge, with how many there are.
    axes = figure.subplots(1, len(levels), sharey=False, squeeze=False)[0]
    for axis, level in zip(axes, levels, strict=True):
        level_entries = [e for e in result.entries if e.level == level]
        bottom, top = _zoom(level_entries)
        axis.boxplot(
            [e.stats.samples_ms for e in level_entries],
            showfliers=True,
            flierprops={"markersize": 2, "alpha": 0.4},
            medianprops={"color": "black"},
        )
        for position, e in enumerate(level_entries, start=1):
            _mark_outliers(axis, position, [v for v in e.stats.samples_ms if v > top], top)
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
