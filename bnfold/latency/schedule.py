"""The schedule of a benchmark: interleaved (ABBA) runs, and per optimization level the blocks of
fresh sessions among which the timed runs are split (see :mod:`bnfold.latency`)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnfold import _ort
from bnfold.compare.inputs import exercising_shapes, make_inputs

from .sessions import _check_inputs, _open_session, _run_error, _shapes_with_batch

_CREATE_BUDGET_S = 1.0  # session creations + first runs per model and level stay within about this
_MAX_SESSIONS = 6
_MIN_HALF_ROUNDS = 2  # with a time budget, at least one full ABBA round
_PROGRESS_EVERY_NS = 50_000_000  # call the progress callback at most every 50 ms

ProgressFn = Callable[[int, int], None]


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


@dataclass
class _Plan:
    """What every level of one benchmark shares: the models, the settings, the common inputs."""

    sources: list[str | bytes]
    names: list[str]
    levels: tuple[str, ...]
    providers: list[str]
    threads: int | None  # ORT intra-op threads; None for ORT's default
    runs: int | None
    seconds: float | None
    warmup: int
    sessions: int | None
    shapes: dict[str, tuple[int, ...]]
    batch_size: int | None
    seed: int
    progress: ProgressFn | None
    per_level: int  # progress units per level: timed runs of all models, or ms of budget
    total: int
    feeds: dict[str, np.ndarray] | None = None
    shape_origins: dict[str, str] | None = None  # given / fixed / derived, per input

    @property
    def count(self) -> int:
        return len(self.sources)


@dataclass
class _Level:
    """What one level measured, per model: session creation and first-run times per block, and
    the timed runs grouped by block (session)."""

    level: str
    index: int
    count: int
    runners: list[Callable[[], None] | None] = field(default_factory=list)
    creates: list[list[float]] = field(default_factory=list)
    firsts: list[list[float]] = field(default_factory=list)
    groups: list[list[list[float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runners = [None] * self.count
        self.creates = [[] for _ in range(self.count)]
        self.firsts = [[] for _ in range(self.count)]
        self.groups = [[] for _ in range(self.count)]


def measure_level(plan: _Plan, level: str, level_index: int) -> _Level:
    """Time every model at one level: blocks of fresh sessions (created in ABBA order), each
    timing its share of the runs, until the planned number of blocks is done."""
    state = _Level(level, level_index, plan.count)
    planned = plan.sessions
    base = level_index * plan.per_level
    done_before = 0
    block = 0
    while planned is None or block < planned:
        _open_block(plan, state, block)
        if planned is None:
            planned = _blocks_that_fit(state)
        if plan.runs is not None:
            planned = min(planned, plan.runs)
        done_before += _time_block(plan, state, block, planned, base + done_before)
        if plan.progress is not None:
            plan.progress(min(base + done_before, plan.total), plan.total)
        block += 1
    state.runners[:] = [None] * plan.count
    gc.collect()
    if plan.progress is not None:
        plan.progress(base + plan.per_level, plan.total)
    return state


def _open_block(plan: _Plan, state: _Level, block: int) -> None:
    """A fresh session per model (forward order in even blocks, backward in odd ones), its
    creation and first run timed; the first session builds the inputs every model is fed."""
    for i in range(plan.count)[:: -1 if block % 2 else 1]:
        state.runners[i] = None  # free this model's previous session first
        session, create_ms = _open_session(
            plan.sources[i], plan.names[i], state.level, plan.providers, plan.threads
        )
        if plan.feeds is None:
            session_inputs = session.get_inputs()
            given = _shapes_with_batch(session_inputs, plan.shapes, plan.batch_size)
            # the shapes verification uses: every weight exercised, not a 1x1 image
            shapes, plan.shape_origins = exercising_shapes(plan.sources[i], given)
            plan.feeds = make_inputs(session_inputs, input_shapes=shapes, seed=plan.seed)
            for spec in session_inputs:  # "default": dynamic dims left at 1 (see verify)
                fixed = all(isinstance(d, int) for d in spec.shape or ())
                plan.shape_origins.setdefault(spec.name, "fixed" if fixed else "default")
        elif state.index == 0 and block == 0:
            _check_inputs(plan.names[i], plan.names[0], session, plan.feeds)
        runner = _ort.make_runner(session, plan.feeds)
        del session
        t0 = time.perf_counter_ns()
        try:
            runner()
        except _ort.OrtRunError as exc:
            raise _run_error(plan.names[i], state.level, plan.feeds, exc) from exc
        state.firsts[i].append((time.perf_counter_ns() - t0) / 1e6)
        state.creates[i].append(create_ms)
        state.runners[i] = runner


def _blocks_that_fit(state: _Level) -> int:
    """As many blocks as fit in about ``_CREATE_BUDGET_S`` of creation per model: an even number
    up to ``_MAX_SESSIONS`` (both creation orders equally often), or 1 for a slow model."""
    slowest_ms = max(c[0] + f[0] for c, f in zip(state.creates, state.firsts, strict=True))
    fit = int(_CREATE_BUDGET_S * 1000 // max(slowest_ms, 1e-3))
    return max(1, min(_MAX_SESSIONS, fit) // 2 * 2)


def _time_block(plan: _Plan, state: _Level, block: int, planned: int, start: int) -> int:
    """Warm-up, then this block's share of the timed runs, interleaved, with the garbage collector
    paused. Returns the progress units it used."""
    runs, seconds, count = plan.runs, plan.seconds, plan.count
    block_runs = None if runs is None else runs // planned + (block < runs % planned)
    block_seconds = None if seconds is None else seconds / planned
    ready = [r for r in state.runners if r is not None]
    assert plan.feeds is not None and len(ready) == count
    share = plan.per_level if seconds is None else plan.per_level // planned
    report = _progress_reporter(plan, start, share)

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if plan.warmup:
            _interleave(ready, runs=plan.warmup)
        timed = _interleave(ready, runs=block_runs, seconds=block_seconds, on_half_round=report)
    except _RunFailed as failed:
        if isinstance(failed.error, _ort.OrtRunError):
            raise _run_error(
                plan.names[failed.index], state.level, plan.feeds, failed.error
            ) from None
        raise failed.error from None
    finally:
        if gc_was_enabled:
            gc.enable()
    for i in range(count):
        state.groups[i].append(timed[i])
    return (len(timed[0]) * count) if seconds is None else share


def _progress_reporter(plan: _Plan, start: int, share: int) -> Callable[[int, int], None]:
    """``on_half_round`` for :func:`_interleave`: progress at most every ``_PROGRESS_EVERY_NS``."""
    last = [-_PROGRESS_EVERY_NS]

    def report(half: int, elapsed_ns: int) -> None:
        if plan.progress is None or elapsed_ns - last[0] < _PROGRESS_EVERY_NS:
            return
        last[0] = elapsed_ns
        done = half * plan.count if plan.seconds is None else elapsed_ns // 1_000_000
        plan.progress(min(start + min(done, share), plan.total), plan.total)

    return report
