"""The typer options shared by bnfold's commands, each defined once as an ``Annotated`` alias.

A command declares ``atol: AtolOpt = None``; the flag name, environment variable and help text live
here, so ``bnfold fold --atol`` and ``bnfold verify --atol`` cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="NAME=D0,D1,...",
        envvar="BNFOLD_INPUT_SHAPE",
        help="Shape of an input with dynamic dimensions for verification, e.g. input=1,3,224,224. "
        "Repeatable. Dynamic dimensions not given are sized from the graph so that every weight "
        "is exercised (the batch is 1); the shapes used are printed.",
    ),
]
AtolOpt = Annotated[
    float | None,
    typer.Option(
        "--atol",
        metavar="X",
        min=0.0,
        envvar="BNFOLD_ATOL",
        help="Judge every output element-wise with this absolute tolerance instead of the "
        "calibrated default (the model's own measured noise); --rtol not given: by dtype.",
    ),
]
RtolOpt = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        metavar="X",
        min=0.0,
        envvar="BNFOLD_RTOL",
        help="Judge every output element-wise with this relative tolerance instead of the "
        "calibrated default; --atol not given: by dtype.",
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed", metavar="N", envvar="BNFOLD_SEED", help="Seed of the random verification inputs."
    ),
]
BenchInputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="NAME=D0,D1,...",
        envvar="BNFOLD_INPUT_SHAPE",
        help="Shape of an input with dynamic dimensions to time at, e.g. input=8,3,224,224. "
        "Repeatable. Dynamic dimensions not given default to 1 (see --batch-size).",
    ),
]
BenchSeedOpt = Annotated[
    int,
    typer.Option(
        "--seed",
        metavar="N",
        envvar="BNFOLD_SEED",
        help="Seed of the random inputs the models are timed on.",
    ),
]
SamplesOpt = Annotated[
    int,
    typer.Option(
        "--samples", metavar="N", min=1, help="Number of seeded input batches to compare."
    ),
]
DistOpt = Annotated[
    str,
    typer.Option(
        "--dist",
        metavar="normal|uniform",
        help="Distribution of random float inputs: normal or uniform.",
    ),
]
RangeOpt = Annotated[
    str | None,
    typer.Option(
        "--range",
        metavar="LOW,HIGH",
        help="Range of random inputs: uniform floats and integers are drawn from [LOW, HIGH); normal floats are clipped to it.",
    ),
]
DataOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        metavar="FILE.npz|NAME=FILE.npy",
        help="Your own input batch instead of random values (repeatable: one batch each). Inputs it leaves out are random.",
    ),
]
MarkdownOpt = Annotated[
    Path | None,
    typer.Option(
        "--markdown",
        metavar="FILE",
        help="Also write the result as Markdown (also appended to $GITHUB_STEP_SUMMARY when set).",
    ),
]
LevelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--level",
        metavar="LEVEL",
        help="ORT graph-optimization level to time: disable, basic, extended, all. Repeatable (default: disable and all).",
    ),
]
JsonOpt = Annotated[
    str | None,
    typer.Option(
        "--json", metavar="PATH|-", help="Write the report as JSON to PATH, or to stdout with '-'."
    ),
]

QuietOpt = Annotated[
    bool,
    typer.Option(
        "-q",
        "--quiet",
        help="No tables: one line per failure (what failed and why), then PASSED or FAILED.",
    ),
]

# --- bnfold fold (and inspect: the fold pass's own options) ------------------------------------------
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="OUT",
        help="Where to write the folded model (one input only; default: MODEL.folded.onnx next to MODEL).",
    ),
]
OutputDirOpt = Annotated[
    Path | None,
    typer.Option(
        "-O",
        "--output-dir",
        metavar="OUTDIR",
        envvar="BNFOLD_OUTPUT_DIR",
        help="Write every folded model here, mirroring the inputs' relative layout (external data included).",
    ),
]
InPlaceOpt = Annotated[
    bool,
    typer.Option(
        "--in-place",
        help="Replace each ONNX MODEL with its folded model, only after verification passed "
        "(atomic, external data included); a model where nothing folds is left untouched. "
        "For pre-commit: the bnfold-fold hook.",
    ),
]
JobsOpt = Annotated[
    int,
    typer.Option(
        "-j",
        "--jobs",
        metavar="N",
        min=1,
        envvar="BNFOLD_JOBS",
        help="Worker processes for several models.",
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        envvar="BNFOLD_SCHEDULER",
        metavar="ADDRESS",
        help="Fold several models on a Dask distributed cluster: the scheduler's address, e.g. "
        "tcp://host:8786 (needs distributed: the dask extra). Inputs and outputs must be paths every worker can "
        "reach.",
        show_default=False,
    ),
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        envvar="BNFOLD_VERIFY",
        help="Run original and folded models in ONNX Runtime (optimizations disabled) and compare "
        "every output. On failure nothing is written and the exit code is 1.",
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        envvar="BNFOLD_STRICT",
        help="Exit 1 when any BatchNormalization is kept (the output is still written).",
    ),
]
BenchOpt = Annotated[
    bool,
    typer.Option(
        "--bench",
        help="Also time the original against the folded model under ONNX Runtime (see 'bnfold bench').",
    ),
]
ExternalDataOpt = Annotated[
    bool | None,
    typer.Option(
        "--external-data/--no-external-data",
        help="Force or forbid external data for the output (default: when the input has it or the "
        "output would exceed 2 GB).",
        show_default=False,
    ),
]
LowerRemainingOpt = Annotated[
    bool,
    typer.Option(
        "--lower-remaining",
        help="Rewrite every BatchNormalization that stays into Mul + Add (for runtimes without a BN kernel); they are still reported as kept.",
    ),
]
DuplicateSharedOpt = Annotated[
    bool,
    typer.Option(
        "--duplicate-shared",
        help="Where a producer's output also feeds other nodes, fold into a copy of the producer (costs compute; stated in the report).",
    ),
]
AllowSlowerFoldsOpt = Annotated[
    bool,
    typer.Option(
        "--allow-slower-folds",
        help="Also fold a BN whose forward fold needs a border-correction Add that is expected to "
        "make the model slower at ONNX Runtime's default optimization level (kept by default, "
        "reason slower_fold).",
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="PyTorch input: trust the file. Allows a whole pickled nn.Module (torch.save(model)), .pt2 weights/constants/sample inputs stored as pickles, and TorchScript/.pt2 graphs that call ops with file, process or network effects (torch.from_file...). Unpickling runs code from the file: use only with files you trust. Default: all of these are refused (exit 2).",
    ),
]
ExporterOpt = Annotated[
    str,
    typer.Option(
        "--exporter",
        help="PyTorch input: torch's ONNX exporter. 'dynamo' (default): the maintained torch.export-based exporter; its optimizer fuses Conv+BN itself and the report says so (status fused_by_exporter). 'torchscript': the deprecated legacy exporter, as a fallback (its deprecation warning is logged).",
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option("-v", "--verbose", help="List every BatchNormalization, also on big models."),
]

# --- bnfold check ---------------------------------------------------------------------------------
AllowOpt = Annotated[
    int,
    typer.Option(
        "--allow",
        metavar="N",
        min=0,
        envvar="BNFOLD_ALLOW",
        help="Pass while at most N foldable BatchNorms remain per model.",
    ),
]
AllowNodeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-node",
        metavar="NAME",
        help="A BatchNormalization kept on purpose (repeatable); it never fails the check.",
    ),
]
AgainstOpt = Annotated[
    Path | None,
    typer.Option(
        "--against",
        metavar="ORIGINAL",
        help="Also verify the (single) model against ORIGINAL, as 'bnfold verify' does.",
    ),
]

# --- bnfold verify ------------------------------------------------------------------------------
TolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tol", metavar="OUTPUT=ATOL,RTOL", help="Tolerances for one output (repeatable)."
    ),
]
LocalizeOpt = Annotated[
    bool,
    typer.Option(
        "--localize",
        help="When outputs differ, find the first intermediate tensor (shared by name) that diverges and name its node.",
    ),
]

# --- bnfold bench -------------------------------------------------------------------------------
RunsOpt = Annotated[
    int | None,
    typer.Option(
        "--runs", metavar="N", min=1, help="Timed runs per model per level (default 200)."
    ),
]
SecondsOpt = Annotated[
    float | None,
    typer.Option(
        "--seconds",
        metavar="S",
        min=0.01,
        help="Time budget of the timed runs per level, all models together.",
    ),
]
WarmupOpt = Annotated[
    int,
    typer.Option("--warmup", metavar="N", min=0, help="Untimed runs per model per level first."),
]
ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        metavar="N",
        min=0,
        help="ORT intra-op threads (0: ORT's default). 1 gives the most repeatable numbers.",
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        metavar="N",
        min=1,
        help="First dimension of inputs whose batch dimension is dynamic.",
    ),
]
ProviderOpt = Annotated[
    str,
    typer.Option(
        "--provider",
        metavar="NAME",
        help="Execution provider: cpu, cuda, tensorrt or an ORT provider name.",
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        metavar="FILE.png",
        help="Draw the latency distributions (needs matplotlib: pip install matplotlib, or pip install '.[plot]' in a bnfold checkout).",
    ),
]
AcceptUnverifiedOpt = Annotated[
    bool,
    typer.Option(
        "--accept-unverified",
        envvar="BNFOLD_ACCEPT_UNVERIFIED",
        help="When the model cannot be verified (ONNX Runtime cannot run the original, or the "
        "time budget ran out), still write it and exit 0; the last line then says WRITTEN "
        "UNVERIFIED. Without it that is exit 4 and nothing is written. Never with --strict.",
    ),
]
VerifyTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--verify-timeout",
        min=0.0,
        metavar="SECONDS",
        help="Time budget of the verification (default: $BNFOLD_VERIFY_TIMEOUT, else 600; 0: no "
        "limit). Past it ONNX Runtime is stopped and the result is unverified (exit 4).",
    ),
]

BenchTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--verify-timeout",
        min=0.0,
        metavar="SECONDS",
        help="Time budget of each model's first, checked run before the timing starts (default: "
        "$BNFOLD_VERIFY_TIMEOUT, else 600; 0: no limit); past it ONNX Runtime is stopped.",
    ),
]
