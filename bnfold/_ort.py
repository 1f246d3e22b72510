"""The one place bnfold talks to ONNX Runtime.

Verification (``bnfold.compare``), ``bnfold.divergence``, the benchmark (``bnfold.latency``) and the
PyTorch front end create and run sessions only through these functions, so that session
options (log level, optimization level, threads, providers), error wording and the handling of
element types numpy cannot hand to ONNX Runtime directly (bfloat16, float8) live in one spot.

``onnxruntime`` is imported inside the functions, never at module level: ``import bnfold`` and
``bnfold --help`` must not pay for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from bnfold._text import first_line
from bnfold.errors import InvalidModelError, UsageError, VerificationTimeout

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

__all__ = [
    "DEFAULT_VERIFY_TIMEOUT",
    "Cancelled",
    "OPTIMIZATION_LEVELS",
    "VerificationTimeout",
    "cancel_on_signals",
    "resolve_verify_timeout",
    "terminate_all",
    "time_budget",
    "OrtRunError",
    "PROVIDER_ALIASES",
    "make_runner",
    "make_session",
    "ort_type_to_numpy",
    "resolve_providers",
    "run",
]

logger = logging.getLogger(__name__)

#: ``level`` argument of :func:`make_session` -> name of the ``onnxruntime.GraphOptimizationLevel``.
OPTIMIZATION_LEVELS: dict[str, str] = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# ONNX Runtime's "tensor(...)" element type -> numpy dtype.
_NUMPY_TYPES: dict[str, np.dtype] = {
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "double": np.dtype(np.float64),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}

# Element types ONNX Runtime's numpy bridge rejects; they travel as raw bits in an OrtValue.
# numpy dtype -> (ONNX TensorProto element type, unsigned integer type of the same width).
_RAW_TYPES: dict[np.dtype, tuple[int, type[np.unsignedinteger]]] = {
    np.dtype(ml_dtypes.bfloat16): (16, np.uint16),
    np.dtype(ml_dtypes.float8_e4m3fn): (17, np.uint8),
    np.dtype(ml_dtypes.float8_e4m3fnuz): (18, np.uint8),
    np.dtype(ml_dtypes.float8_e5m2): (19, np.uint8),
    np.dtype(ml_dtypes.float8_e5m2fnuz): (20, np.uint8),
}

_RAW_TYPE_STRINGS = frozenset(
    f"tensor({name})" for name, dtype in _NUMPY_TYPES.items() if dtype in _RAW_TYPES
)

_ORT_ERROR_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


class OrtRunError(RuntimeError):
    """ONNX Runtime failed while running a session (not while loading it).

    Not a :class:`~bnfold.errors.BnfoldError`: a model that loads but does not run is either a
    problem of the model or a bug of ours, and callers decide which.
    """


LOAD_PREFIX = "ONNX Runtime cannot load the model: "
RUN_PREFIX = "ONNX Runtime failed to run the model: "


def error_reason(error: Exception) -> str:
    """The ORT part of an InvalidModelError / OrtRunError message (without our prefix)."""
    text = str(error)
    for prefix in (LOAD_PREFIX, RUN_PREFIX):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _first_line(exc: BaseException) -> str:
    """ORT's message without the ``[ONNXRuntimeError] : 1 : FAIL :`` noise, first line only."""
    return _ORT_ERROR_PREFIX.sub("", first_line(exc)).strip() or type(exc).__name__


def make_session(
    model: str | os.PathLike[str] | bytes,
    *,
    level: str = "disable",
    intra_op_threads: int | None = None,
    providers: list[str] | None = None,
) -> onnxruntime.InferenceSession:
    """Create an ``onnxruntime.InferenceSession``.

    Args:
        model: a path (ONNX Runtime then resolves external data next to the file) or the bytes of a
            serialized ``ModelProto``.
        level: graph optimization level, one of ``"disable"``, ``"basic"``, ``"extended"``, ``"all"``.
            Note that ORT fuses Conv+BatchNormalization itself from ``"basic"`` up.
        intra_op_threads: threads per operator; ``None`` leaves ORT's default (all cores).
        providers: execution providers; default ``["CPUExecutionProvider"]``.

    Raises:
        UsageError: unknown ``level``.
        InvalidModelError: ONNX Runtime refuses the model; the message is one line starting with
            ``"ONNX Runtime cannot load the model: "``.
    """
    import onnxruntime as ort

    if level not in OPTIMIZATION_LEVELS:
        raise UsageError(
            f"unknown optimization level {level!r}; choose one of {', '.join(OPTIMIZATION_LEVELS)}"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 4  # FATAL only: run and load errors reach the caller as exceptions
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[level]
    )
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    source: str | bytes = (
        bytes(model) if isinstance(model, (bytes, bytearray, memoryview)) else os.fspath(model)
    )
    try:
        session = ort.InferenceSession(
            source, options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # ORT raises its own pybind11 types (Fail, InvalidGraph, ...)
        raise InvalidModelError(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from exc
    logger.debug(
        "created ORT session (level=%s, threads=%s, providers=%s)",
        level,
        intra_op_threads,
        session.get_providers(),
    )
    return session


def ort_type_to_numpy(type_str: str) -> np.dtype:
    """Map ONNX Runtime's type string (``"tensor(float)"``) to a numpy dtype (``float32``).

    bfloat16 and the float8 types map to their ``ml_dtypes`` dtypes. Raises ``ValueError`` for
    anything else (sequences, maps, optional, string, 4-bit types).
    """
    match = re.fullmatch(r"tensor\((\w+)\)", type_str.strip())
    if match is None or match.group(1) not in _NUMPY_TYPES:
        raise ValueError(f"unsupported ONNX Runtime type {type_str!r}")
    return _NUMPY_TYPES[match.group(1)]


def _to_ort_value(array: np.ndarray) -> Any:
    import onnxruntime as ort

    element_type, bits = _RAW_TYPES[array.dtype]
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        np.ascontiguousarray(array).view(bits), onnx_element_type=element_type
    )


def _from_ort_value(value: Any) -> np.ndarray:
    dtype = ort_type_to_numpy(value.data_type())
    if dtype not in _RAW_TYPES:
        return np.asarray(value.numpy())
    shape = tuple(value.shape())
    nbytes = value.tensor_size_in_bytes()
    if nbytes == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_char * nbytes).from_address(value.data_ptr())
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


# --- time budget and cancellation -----------------------------------------------------------------

#: seconds a verification may take unless ``--verify-timeout`` or ``BNFOLD_VERIFY_TIMEOUT`` says
#: otherwise; generous for real models on CPU, finite so that nothing hangs forever
DEFAULT_VERIFY_TIMEOUT = 600.0
TIMEOUT_ENV = "BNFOLD_VERIFY_TIMEOUT"
_POLL_SECONDS = 0.05


class Cancelled(KeyboardInterrupt):
    """A run was ended by SIGINT or SIGTERM (see :func:`cancel_on_signals`). A KeyboardInterrupt,
    so ``finally`` blocks (staging cleanup) run; ``signum`` tells the CLI its exit code
    (``128 + signum``: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(f"cancelled by signal {int(signum)}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_active: set[Any] = set()  # RunOptions of the runs in flight
_active_lock = threading.Lock()
_deadline: list[tuple[float, float]] = []  # stack of (deadline, budget seconds)


def resolve_verify_timeout(value: float | str | None = None) -> float | None:
    """The verification budget in seconds: ``value`` (the ``--verify-timeout`` option) if given,
    else ``$BNFOLD_VERIFY_TIMEOUT``, else :data:`DEFAULT_VERIFY_TIMEOUT`. ``0``, ``"none"`` or
    ``"off"`` mean no limit (``None``). Raises :class:`UsageError` for anything else that is not a
    positive number of seconds."""
    source = "--verify-timeout"
    if value is None:
        value, source = os.environ.get(TIMEOUT_ENV), TIMEOUT_ENV
        if value is None or not str(value).strip():
            return DEFAULT_VERIFY_TIMEOUT
    text = str(value).strip().lower()
    if text in ("none", "off", "0", "0.0", "inf"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise UsageError(
            f"{source} must be a number of seconds (0 or 'none' for no limit), got {str(value)[:40]!r}"
        )
    return seconds or None


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Every :func:`run` inside the block ends by ``seconds`` from now (``None``: no limit),
    raising :class:`VerificationTimeout`. Nested budgets: the earliest deadline wins."""
    if seconds is None:
        yield
        return
    deadline = time.monotonic() + float(seconds)
    if _deadline and _deadline[-1][0] < deadline:
        deadline, seconds = _deadline[-1]
    _deadline.append((deadline, float(seconds)))
    try:
        yield
    finally:
        _deadline.pop()


def terminate_all() -> int:
    """Ask every run in flight to stop (``RunOptions.terminate``); returns how many. Safe to call
    from a signal handler or another thread; ORT checks the flag between kernels and loop
    iterations, so the run returns within about one kernel's time."""
    with _active_lock:
        active = list(_active)
    for options in active:
        options.terminate = True
    return len(active)


@contextlib.contextmanager
def cancel_on_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM terminate every ORT run in flight and raise
    :class:`Cancelled` in the main thread (so cleanup in ``finally`` blocks runs). Only from the
    main thread; elsewhere it does nothing. Previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        terminate_all()
        raise Cancelled(signum)

    previous = {}
    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run_bounded(session: Any, call: Callable[[Any], Any]) -> Any:
    """``call(run_options)`` in a worker thread, the calling thread waiting in Python so that
    signals are handled at once; the run is terminated at the deadline or on interruption."""
    import onnxruntime as ort

    if _deadline:
        deadline, budget = _deadline[-1]
    else:
        budget = resolve_verify_timeout()
        deadline = math.inf if budget is None else time.monotonic() + budget
    if time.monotonic() >= deadline:
        raise VerificationTimeout(_timeout_message(budget))
    options = ort.RunOptions()
    options.log_severity_level = 4
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = call(options)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc
        finally:
            finished.set()

    with _active_lock:
        _active.add(options)
    worker = threading.Thread(target=work, name="bnfold-ort-run", daemon=True)
    timed_out = False
    try:
        worker.start()
        while not finished.wait(_POLL_SECONDS):
            if time.monotonic() >= deadline:
                timed_out = True
                options.terminate = True
                finished.wait()
                break
    except BaseException:
        options.terminate = True  # Ctrl-C or a signal handler's exception: stop ORT, then go
        finished.wait(5.0)
        raise
    finally:
        with _active_lock:
            _active.discard(options)
    if timed_out:
        raise VerificationTimeout(_timeout_message(budget))
    if "error" in outcome:
        if options.terminate:
            raise Cancelled()  # terminated by terminate_all() from another thread
        raise outcome["error"]
    return outcome["value"]


def _timeout_message(budget: float | None) -> str:
    return (
        f"verification did not finish within its time budget of {budget:g} s; raise it with "
        f"--verify-timeout or {TIMEOUT_ENV} (0 for no limit), or skip it with --no-verify"
    )


def run(
    session: onnxruntime.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Run ``session`` and return its outputs as numpy arrays (all outputs by default).

    bfloat16 and float8 tensors, which ORT's numpy bridge rejects, are passed as raw bits and
    come back as ``ml_dtypes`` arrays. Raises :class:`OrtRunError` with a one-line message.

    The run is bounded: inside :func:`time_budget` by its deadline, otherwise by
    :func:`resolve_verify_timeout` (``BNFOLD_VERIFY_TIMEOUT``, default
    :data:`DEFAULT_VERIFY_TIMEOUT`); past it ORT is told to terminate and
    :class:`VerificationTimeout` is raised. Ctrl-C, or :func:`terminate_all` from a signal
    handler, terminates it as well (KeyboardInterrupt / :class:`Cancelled`).
    """
    names = list(output_names) if output_names is not None else None
    try:
        raw_io = any(np.asarray(a).dtype in _RAW_TYPES for a in feeds.values()) or any(
            o.type in _RAW_TYPE_STRINGS
            for o in session.get_outputs()
            if names is None or o.name in names
        )
        if not raw_io:
            arrays = dict(feeds)
            outs = _run_bounded(session, lambda options: session.run(names, arrays, options))
            return [np.asarray(a) for a in outs]
        import onnxruntime as ort

        values = {
            name: _to_ort_value(a)
            if a.dtype in _RAW_TYPES
            else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
            for name, a in ((n, np.asarray(v)) for n, v in feeds.items())
        }
        outs = _run_bounded(
            session, lambda options: session.run_with_ort_values(names, values, options)
        )
        return [_from_ort_value(v) for v in outs]
    except (VerificationTimeout, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise OrtRunError(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from exc


# --- execution providers and tight run loops (used by bench.py) ------------------------------------

#: Short provider names accepted by :func:`resolve_providers` -> ONNX Runtime provider name.
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}


def resolve_providers(name: str) -> list[str]:
    """The ``providers`` list for :func:`make_session` that runs on ``name``, with fallbacks.

    ``name`` is a short name (``"cpu"``, ``"cuda"``, ``"tensorrt"``, ... see ``PROVIDER_ALIASES``) or
    an ONNX Runtime provider name (``"CUDAExecutionProvider"``), case-insensitive. The list puts the
    requested provider first, then CUDA (for TensorRT, when available), then CPU, so nodes the
    accelerator cannot run still run. Raises :class:`UsageError` naming what is available when the
    provider is unknown or not in this onnxruntime build.
    """
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    known = {p.lower(): p for p in [*ort.get_all_providers(), *PROVIDER_ALIASES.values()]}
    key = str(name).strip().lower()
    wanted = PROVIDER_ALIASES.get(key) or known.get(key) or known.get(key + "executionprovider")
    offered = ", ".join(available) or "none"
    if wanted is None:
        raise UsageError(
            f"unknown execution provider {name!r}; this onnxruntime offers: {offered} "
            f"(short names: {', '.join(sorted(PROVIDER_ALIASES))})"
        )
    if wanted not in available:
        hint = (
            "; install onnxruntime-gpu (instead of onnxruntime) for CUDA/TensorRT"
            if wanted in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
            else ""
        )
        raise UsageError(
            f"execution provider {name!r} ({wanted}) is not available in this onnxruntime "
            f"{ort.__version__} build; available: {offered}{hint}"
        )
    chain = [wanted]
    if wanted == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
        chain.append("CUDAExecutionProvider")
    if wanted != "CPUExecutionProvider":
        chain.append("CPUExecutionProvider")
    return chain


def make_runner(
    session: onnxruntime.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
) -> Callable[[], None]:
    """A no-argument callable that runs ``session`` on ``feeds`` once and discards the outputs.

    For timing loops: the checks :func:`run` makes on every call (which element types need raw
    OrtValues) are made once here, so a call costs one ``session.run`` (or ``run_with_ort_values``
    for bfloat16/float8 inputs or outputs, with the input OrtValues built once). Raises
    :class:`OrtRunError` with a one-line message when the run fails.
    """
    names = list(output_names) if output_names is not None else None
    arrays = {name: np.asarray(a) for name, a in feeds.items()}
    raw_io = any(a.dtype in _RAW_TYPES for a in arrays.values()) or any(
        o.type in _RAW_TYPE_STRINGS
        for o in session.get_outputs()
        if names is None or o.name in names
    )
    if raw_io:
        import onnxruntime as ort

        values = {
            name: _to_ort_value(a)
            if a.dtype in _RAW_TYPES
            else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
            for name, a in arrays.items()
        }
        call, argument = session.run_with_ort_values, values
    else:
        call, argument = session.run, arrays

    def run_once() -> None:
        try:
            call(names, argument)
        except Exception as exc:
            raise OrtRunError(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from exc

    return run_once
