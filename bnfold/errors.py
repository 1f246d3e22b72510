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
]


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
