"""Errors the user can cause.

Every exception bnfold raises on purpose is a :class:`BnfoldError`. Its message is one line that says
what is wrong and, where it helps, what to do; the CLI prints it without a traceback and exits with
:attr:`BnfoldError.exit_code`. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "BnfoldError",
    "InputNotFoundError",
    "InvalidModelError",
    "ExternalDataError",
    "OutputError",
    "UsageError",
    "TorchUnavailableError",
    "UnfoldableModuleError",
    "TrainingModeError",
    "NoRunningStatsError",
    "ResourceError",
    "UntrustedInputError",
    "resource_error",
    "VerificationTimeout",
]

import errno as _errno


class BnfoldError(Exception):
    """Base class of the errors a user can cause (bad input, bad usage). Exit code 2."""

    exit_code = 2


class InputNotFoundError(BnfoldError):
    """The input path does not exist or is not a regular file."""


class InvalidModelError(BnfoldError):
    """The input is not a loadable ONNX model (empty, truncated, not protobuf, no graph...)."""


class ExternalDataError(InvalidModelError):
    """External data is missing, unreadable, out of bounds or outside the model's folder."""


class OutputError(BnfoldError):
    """The output cannot be written where asked (the input itself, a directory, not writable)."""


class UsageError(BnfoldError):
    """Options that contradict each other or cannot be parsed (e.g. a malformed --input-shape)."""


# --- the PyTorch front end (bnfold.torch re-exports these) -------------------------------------------


class TorchUnavailableError(UsageError):
    """PyTorch is not installed (it is the optional ``torch`` extra)."""


class UnfoldableModuleError(BnfoldError):
    """The module as a whole cannot be folded (exit code 2, like every BnfoldError)."""


class TrainingModeError(UnfoldableModuleError):
    """The module, or one of its BatchNorms, is in training mode."""


class NoRunningStatsError(UnfoldableModuleError):
    """A BatchNorm has no running statistics (``track_running_stats=False``)."""


class ResourceError(BnfoldError):
    """The input needs more memory, address space or disk than it can have (a sparse 1 TiB tensor,
    a zip bomb, a MemoryError or a failed mmap anywhere in load/fold/verify)."""


class UntrustedInputError(BnfoldError):
    """The input would run code (unpickling, a graph op with file/process/network side effects)
    and the user did not opt in with ``--trust-pickle`` / ``--trust-code``."""


_MMAP_ERRNOS = {_errno.ENOMEM, getattr(_errno, "EOVERFLOW", -1), _errno.EFBIG}
_ALLOCATION_TEXT = (
    "bad_alloc",
    "bad allocation",
    "failed to allocate",
    "not enough memory",
    "cannot allocate memory",
    "out of memory",
)


def resource_error(exc: BaseException, where: str = "") -> ResourceError | None:
    """The one-line :class:`ResourceError` for an exhausted-resource failure, else ``None``.

    Recognises ``MemoryError`` (numpy's ``_ArrayMemoryError`` included), ``mmap`` failures
    (``OSError`` ENOMEM/EOVERFLOW/EFBIG, ``ValueError`` about mmap lengths) and the allocation
    failures ONNX Runtime and torch report as ``RuntimeError``. The CLI's guard and the batch
    worker call this on an unexpected exception before treating it as a bug.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(exc, ResourceError):
        return exc
    if isinstance(exc, MemoryError):
        detail = str(exc).strip().splitlines()
        more = f" ({detail[0][:200]})" if detail and detail[0] else ""
        return ResourceError(
            f"{prefix}out of memory{more}; the model needs more memory than this machine has"
        )
    if isinstance(exc, OSError) and exc.errno in _MMAP_ERRNOS:
        return ResourceError(
            f"{prefix}cannot map or allocate the model's data ({exc.strerror or exc}); "
            "it needs more memory or address space than this machine has"
        )
    text = str(exc).lower()
    if isinstance(exc, ValueError) and "mmap" in text:
        return ResourceError(f"{prefix}cannot memory-map the model's data ({str(exc)[:200]})")
    engine = type(exc).__module__.startswith(("onnxruntime", "torch"))  # ORT's are no RuntimeError
    if (isinstance(exc, RuntimeError) or engine) and any(t in text for t in _ALLOCATION_TEXT):
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return ResourceError(f"{prefix}out of memory ({first})")
    return None


class VerificationTimeout(BnfoldError):
    """Verification did not finish within its time budget (``--verify-timeout``,
    ``BNFOLD_VERIFY_TIMEOUT``). Not a mismatch and not a bug: the model is unverified, exit code 4
    (3 means an internal error; CI must tell them apart). ``verify_models`` turns it into an
    unverified result; it escapes only from ``bnfold bench``'s bounded first run."""

    exit_code = 4
