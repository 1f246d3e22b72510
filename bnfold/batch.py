"""Many models at once: ``bnfold fold DIR -O OUT --jobs N`` and ``bnfold check MODEL...``.

Inputs may be files, directories (every ``*.onnx`` below them, recursively) or glob patterns. With an
output directory the relative layout is mirrored: ``models/a/b.onnx`` given as ``models`` is written to
``OUT/a/b.onnx`` (external data beside it). One model that fails does not stop the others; each gets
its own entry, and the batch's exit code is the worst of them (2 bad input > 1 failed > 0).
"""

from __future__ import annotations

__all__ = [
    "as_onnx",
    "fold_any",
    "is_torch_input",
    "BatchItem",
    "BatchResult",
    "CheckResult",
    "expand_inputs",
    "dask_executor",
    "fold_many",
    "check_model",
]

import contextlib
import glob
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BnfoldError, UsageError
from .options import FoldOptions

if TYPE_CHECKING:
    from concurrent.futures import Executor

_SKIP_SUFFIXES = (".folded.onnx",)


def expand_inputs(specs: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """``[(model path, path relative to its root)]`` for files, directories and globs, in order."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()

    def add(path: Path, root: Path | None) -> None:
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        found.append((path, path.relative_to(root) if root is not None else Path(path.name)))

    for spec in specs:
        text = os.fspath(spec)
        p = Path(text)
        if p.is_dir():
            for child in sorted(p.rglob("*.onnx")):
                if (
                    child.is_file()
                    and not child.name.endswith(_SKIP_SUFFIXES)
                    and not _in_hidden(child, p)
                ):
                    add(child, p)
        elif p.exists() or not glob.has_magic(text):
            add(p, None)  # a missing file is reported by fold/check as that model's error
        else:
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UsageError(f"{text}: no file matches")
            for m in matches:
                if Path(m).is_file():
                    add(Path(m), None)
    return found


def _in_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


@dataclass
class BatchItem:
    """One model of a batch: its report as a dict (the FoldReport JSON form) or its error."""

    input: str
    output: str | None
    exit_code: int
    report: dict[str, Any] | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        if self.exit_code == 4:
            return "UNVERIFIED"
        if (
            self.exit_code == 0
            and self.report is not None
            and self.report.get("status") == "unverified"
        ):
            return "WRITTEN UNVERIFIED"
        return "PASSED" if self.exit_code == 0 else "FAILED"

    def to_dict(self) -> dict[str, Any]:
        if self.report is not None:
            return {**self.report, "exit_code": self.exit_code, "error": None}
        return {
            "input": self.input,
            "output": self.output,
            "exit_code": self.exit_code,
            "error": self.error,
            "passed": False,
        }


@dataclass
class BatchResult:
    items: list[BatchItem] = field(default_factory=list)
    seconds: float = 0.0
    jobs: int = 1

    @property
    def exit_code(self) -> int:
        from .report import worst_exit_code

        return worst_exit_code([i.exit_code for i in self.items])

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def __repr__(self) -> str:
        from .render import summary

        return summary.one_line("BatchResult", summary.batch(self))

    def _repr_markdown_(self) -> str:
        from .render.markdown import batch_markdown

        return batch_markdown(self)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        from .report import SCHEMA_VERSION

        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "models": [i.to_dict() for i in self.items],
        }


def is_torch_input(path: str | os.PathLike) -> bool:
    """A PyTorch file (.pt2 ExportedProgram, TorchScript, pickled module), by its first bytes."""
    p = Path(path)
    if not p.is_file() or p.suffix == ".onnx":
        return False
    from .torch import is_torch_file  # needs no torch

    return is_torch_file(p)


def fold_any(
    model: str | os.PathLike,
    output: str | os.PathLike,
    options: FoldOptions | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
):  # noqa: ANN201 - bnfold.api.FoldResult
    """``bnfold.fold`` for ONNX files, ``bnfold.torch.fold_file`` (export, fold, verify against
    PyTorch) for PyTorch files, with the same :class:`FoldOptions`. ``trust_pickle`` and ``opset``
    only apply to PyTorch files (a permission and an export setting: ONNX files ignore them)."""
    opts = options if options is not None else FoldOptions()
    if is_torch_input(model):
        from .torch import fold_file

        return fold_file(model, output, options=opts)
    from .api import fold_with

    return fold_with(
        model,
        output,
        opts.replace(trust_pickle=False, opset=17, exporter="dynamo"),
        progress=progress,
    )


def as_onnx(
    path: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    trust_pickle: bool = False,
) -> contextlib.AbstractContextManager[str | os.PathLike]:
    """``path`` itself for an ONNX file; for a PyTorch file, a temporary ONNX export of it (as
    ``bnfold fold`` exports it, every BatchNorm kept), removed when the context ends."""
    if not is_torch_input(path):
        return contextlib.nullcontext(path)
    from .torch.files import torch_file_as_onnx

    return torch_file_as_onnx(path, input_shapes=input_shapes, trust_pickle=trust_pickle)


def _fold_one(task: tuple[str, str | None, FoldOptions, frozenset[Path]]) -> BatchItem:
    """Worker: fold one model; never raises for the user's errors (they become the item's error).

    ``protected`` holds every input of the batch (and its data files): no model's post-commit
    cleanup may remove another model's input."""
    from . import io as _io
    from .errors import resource_error

    src, dst, options, protected = task
    try:
        with _io.protecting(protected):
            result = fold_any(src, dst, options)
    except BnfoldError as exc:
        return BatchItem(src, dst, exc.exit_code, error=str(exc))
    except Exception as exc:  # out of memory, a failed mmap: this model's error, exit 2
        resource = resource_error(exc, src)
        if resource is None:
            raise
        return BatchItem(src, dst, resource.exit_code, error=str(resource))
    report = result.report
    return BatchItem(src, dst, report.exit_code, report=report.to_dict())


def _warm_worker() -> None:
    """Pool initializer: import what every fold needs once per worker, not once per model."""
    import onnx_ir  # noqa: F401
    import onnxruntime  # noqa: F401

    from . import api, io  # noqa: F401
    from .compare import verify  # noqa: F401


def fold_many(
    tasks: Sequence[tuple[Path, Path]],
    *,
    jobs: int = 1,
    options: FoldOptions | None = None,
    on_done: Callable[[BatchItem, int, int], None] | None = None,
    on_running: Callable[[list[str]], None] | None = None,
    executor: Executor | None = None,
) -> BatchResult:
    """Fold ``[(input, output)]``; ``on_done(item, done, total)`` as each model finishes,
    ``on_running(inputs)`` with the models in flight whenever that changes (workers take models
    in order, so these are the first ``jobs`` unfinished ones).

    Where the work runs: with ``executor`` (any :class:`concurrent.futures.Executor`: a
    ``ProcessPoolExecutor``, a Dask ``Client.get_executor()``, ...) every model is one task
    submitted to it, and the caller owns (and shuts down) the executor; else with ``jobs`` > 1 a
    spawned process pool, created once for the batch, whose workers import the heavy modules
    once and then fold model after model; else one by one in this process. Inputs and outputs
    are paths: every worker must be able to reach them. Every model gets the same ``options``
    (a frozen, picklable :class:`FoldOptions`); one failing model (or worker) is that model's
    error, never the batch's."""
    import time

    from . import io as _io

    opts = options if options is not None else FoldOptions()
    protected: set[Path] = set()
    for src, _dst in tasks:  # no model's cleanup may remove another input (or its data)
        protected |= _io.input_files(src)
    frozen = frozenset(protected)
    work = [(str(src), str(dst), opts, frozen) for src, dst in tasks]
    for _, dst, _, _ in work:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    items: list[BatchItem | None] = [None] * len(work)
    if executor is not None:
        _run_on(executor, work, items, on_done, on_running, len(work))
    elif jobs <= 1 or len(work) <= 1:
        for k, task in enumerate(work):
            if on_running:
                on_running([task[0]])
            items[k] = _fold_one(task)
            if on_done:
                on_done(items[k], k + 1, len(work))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: ONNX Runtime's thread pools do not survive a fork.
        ctx = multiprocessing.get_context("spawn")
        workers = min(jobs, len(work))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_warm_worker) as pool:
            _run_on(pool, work, items, on_done, on_running, workers)
    return BatchResult(
        items=[i for i in items if i is not None], seconds=time.perf_counter() - started, jobs=jobs
    )


def _run_on(
    executor: Executor,
    work: list[tuple[str, str, FoldOptions, frozenset[Path]]],
    items: list[BatchItem | None],
    on_done: Callable[[BatchItem, int, int], None] | None,
    on_running: Callable[[list[str]], None] | None = None,
    slots: int = 1,
) -> None:
    """Submit every task to ``executor``; fill ``items`` in input order as they complete.
    ``on_running`` gets the first ``slots`` unfinished inputs (workers take models in order)."""
    from concurrent.futures import as_completed

    futures = {executor.submit(_fold_one, task): k for k, task in enumerate(work)}
    unfinished = list(range(len(work)))
    if on_running:
        on_running([work[i][0] for i in unfinished[:slots]])
    for done, future in enumerate(as_completed(futures), start=1):
        k = futures[future]
        unfinished.remove(k)
        if on_running and unfinished:
            on_running([work[i][0] for i in unfinished[:slots]])
        try:
            items[k] = future.result()
        except Exception as exc:  # a crashed worker is that model's failure, not the batch's
            detail = str(exc) or type(exc).__name__
            items[k] = BatchItem(work[k][0], work[k][1], 3, error=f"worker failed: {detail}")
        if on_done:
            on_done(items[k], done, len(work))


@contextlib.contextmanager
def dask_executor(address: str, *, timeout: float = 30.0) -> Iterator[tuple[Executor, int]]:
    """``(executor, workers)`` for a Dask distributed scheduler at ``address`` (``tcp://host:port``)
    while the block runs; the client is closed after it. Needs ``distributed`` (the optional ``dask``
    extra). Refuses (:class:`UsageError`, exit 2) when Dask is missing or the scheduler cannot be
    reached within ``timeout`` seconds."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError(
            "--scheduler needs Dask distributed: pip install distributed "
            "(or, in a bnfold checkout, pip install '.[dask]')"
        ) from None
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot reach the Dask scheduler at {address}: {detail}") from None
    try:
        workers = max(1, sum(client.nthreads().values()))
        # pure=False: two identical tasks (the same model twice) are still two runs.
        yield client.get_executor(pure=False), workers
    finally:
        client.close()


@dataclass
class CheckResult:
    """``bnfold check`` on one model: which BatchNorms bnfold could still fold (each with where)."""

    path: str
    batchnorms: int = 0
    foldable: list[dict[str, Any]] = field(default_factory=list)
    allowed: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    verification: Any = None
    error: str | None = None
    exit_code: int = 0

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "error": self.error,
            "batchnorms": self.batchnorms,
            "foldable": self.foldable,
            "allowed": self.allowed,
            "kept": self.kept,
            "verification": self.verification.to_dict() if self.verification is not None else None,
        }


def check_model(
    path: str | os.PathLike,
    *,
    allow: int = 0,
    allow_nodes: Sequence[str] = (),
    against: str | os.PathLike | None = None,
    verify_options: dict[str, Any] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    trust_pickle: bool = False,
    accept_unverified: bool = False,
) -> CheckResult:
    """Read-only gate: fold a copy in memory (nothing is written) and list the BNs that folded.

    It passes while at most ``allow`` foldable BNs remain (besides those in ``allow_nodes``). With
    ``against`` (the original model), also verify ``path`` against it under ONNX Runtime; a
    failed verification fails the check whatever ``allow`` says (exit 1), and one that could not
    run (unverified) gives exit 4 unless ``accept_unverified``. A PyTorch file is exported as
    ``bnfold fold`` exports it (``input_shapes``, ``trust_pickle`` as there) and that is checked.
    """
    from . import io as _io
    from .api import fold_model

    result = CheckResult(path=str(path))
    try:
        with as_onnx(path, input_shapes=input_shapes, trust_pickle=trust_pickle) as onnx_path:
            model = _io.load(onnx_path)
            decisions = fold_model(model)  # in memory only; folded weights stay lazy
    except BnfoldError as exc:
        result.error, result.exit_code = str(exc), exc.exit_code
        return result
    allowed_names = set(allow_nodes)
    decisions = [d for d in decisions if d.kind == "batchnorm"]  # a layer-scale Mul is no BN
    result.batchnorms = len(decisions)
    for d in decisions:
        entry = d.to_dict()
        if not d.folded:
            result.kept.append(entry)
        elif d.name in allowed_names:
            result.allowed.append(entry)
        else:
            result.foldable.append(entry)
    if against is not None:
        from .compare import verify_models

        try:
            result.verification = verify_models(str(against), str(path), **(verify_options or {}))
        except BnfoldError as exc:
            result.error, result.exit_code = str(exc), exc.exit_code
            return result
    status = result.verification.status if result.verification is not None else None
    if len(result.foldable) > allow or status == "failed":
        result.exit_code = 1
    elif status == "unverified" and not accept_unverified:
        result.exit_code = 4
    else:
        result.exit_code = 0
    return result
