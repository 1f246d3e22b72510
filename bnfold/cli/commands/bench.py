"""``bnfold bench``: time models under ONNX Runtime, interleaved, with ratios to the first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnfold.cli._shared import (
    Progress,
    check_model_path,
    console_for,
    summary_env,
    write_json,
    write_markdown,
)
from bnfold.cli.options import (
    BatchSizeOpt,
    BenchInputShapeOpt,
    BenchSeedOpt,
    BenchTimeoutOpt,
    JsonOpt,
    LevelsOpt,
    MarkdownOpt,
    PlotOpt,
    ProviderOpt,
    RunsOpt,
    SecondsOpt,
    ThreadsOpt,
    WarmupOpt,
)


def bench(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL...",
            help="Models to time; the first is the baseline of every ratio.",
            show_default=False,
        ),
    ],
    level: LevelsOpt = None,
    runs: RunsOpt = None,
    seconds: SecondsOpt = None,
    warmup: WarmupOpt = 10,
    threads: ThreadsOpt = 1,
    batch_size: BatchSizeOpt = None,
    input_shape: BenchInputShapeOpt = None,
    provider: ProviderOpt = "cpu",
    seed: BenchSeedOpt = 0,
    verify_timeout: BenchTimeoutOpt = None,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = None,
    plot_file: PlotOpt = None,
) -> None:
    """Time models under ONNX Runtime, interleaved (A B B A ...), and report each one's latency and its ratio to the first with a bootstrap confidence interval.

    ONNX Runtime fuses Conv+BatchNormalization itself at optimization level 'basic' and above, so by default both 'disable' (where the fold's gain shows) and 'all' (what a deployment runs) are reported, plus session-creation time.
    """
    from bnfold.compare import parse_input_shapes
    from bnfold.latency import bench as run_bench
    from bnfold.latency import plot
    from bnfold.render.console import render_bench
    from bnfold.render.text import inert

    shapes = parse_input_shapes(input_shape or [])
    for path in models:
        check_model_path(path)
    console = console_for(json_out == "-")
    _first_run_bounded([str(m) for m in models], shapes, batch_size, seed, verify_timeout)
    with Progress(console, enabled=True) as tick:
        result = run_bench(
            [str(m) for m in models],
            levels=tuple(level) if level else ("disable", "all"),
            runs=runs,
            seconds=seconds,
            warmup=warmup,
            intra_op_threads=threads,
            batch_size=batch_size,
            input_shapes=shapes or None,
            provider=provider,
            seed=seed,
            progress=(lambda d, n: tick("bench", d, n)) if tick else None,
        )
    if plot_file is not None:
        plot(result, plot_file)
    if json_out:
        write_json({"schema_version": 1, **result.to_dict()}, json_out)
    if markdown is not None or summary_env():
        write_markdown(result.to_markdown(), markdown)
    render_bench(result, console)
    if plot_file is not None:
        console.print(f"Plot written to {inert(str(plot_file))}", markup=False, highlight=False)


def _first_run_bounded(
    models: list[str], shapes: dict, batch_size: int | None, seed: int, timeout: float | None
) -> None:
    """Run each model once on the benchmark's inputs under the verification time budget, where
    Ctrl-C and SIGTERM can stop ONNX Runtime inside a kernel (the timing loops that follow call
    ORT directly, without a watchdog thread, so that nothing but the model is timed). A model that
    does not finish raises VerificationTimeout (exit 4)."""
    from bnfold import _ort
    from bnfold.compare import make_inputs
    from bnfold.compare.inputs import exercising_shapes
    from bnfold.latency.sessions import _shapes_with_batch

    budget = _ort.resolve_verify_timeout(timeout)
    with _ort.time_budget(float("inf") if budget is None else budget):
        for model in models:
            session = _ort.make_session(model, level="disable")
            spec = session.get_inputs()
            given, _ = exercising_shapes(model, _shapes_with_batch(spec, shapes, batch_size))
            try:
                _ort.run(session, make_inputs(spec, input_shapes=given, seed=seed))
            except _ort.OrtRunError:
                pass  # the benchmark itself reports a model that fails to run, with its inputs
            del session
