"""``FoldOptions``: every fold flag in one typed, immutable value.

The same object travels from the CLI (``bnfold fold``) through batch mode (it crosses process
boundaries, so it is a plain picklable dataclass) to :func:`bnfold.fold` and the PyTorch front end
(:func:`bnfold.torch.fold_file`, :func:`bnfold.torch.export`, :func:`bnfold.torch.fold_module`).
A front end that cannot honour an option refuses it with a :class:`~bnfold.errors.UsageError`
(one line, exit code 2) instead of ignoring it.

The public functions keep their keyword arguments; they build a ``FoldOptions`` from them, or take
``options=FoldOptions(...)``. Giving both is refused, so one call can never mean two things.
"""

from __future__ import annotations

__all__ = ["FoldOptions"]

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

#: What each option is called on the command line, for refusals that a CLI user reads.
FLAG_NAMES = {
    "verify": "--no-verify",
    "input_shapes": "--input-shape",
    "atol": "--atol",
    "rtol": "--rtol",
    "seed": "--seed",
    "strict": "--strict",
    "external_data": "--external-data/--no-external-data",
    "lower_remaining": "--lower-remaining",
    "duplicate_shared": "--duplicate-shared",
    "allow_slower_folds": "--allow-slower-folds",
    "bench": "--bench",
    "trust_pickle": "--trust-pickle",
    "opset": "opset",
    "exporter": "--exporter",
    "accept_unverified": "--accept-unverified",
    "verify_timeout": "--verify-timeout",
}


@dataclass(frozen=True)
class FoldOptions:
    """How to fold, verify, write and time one model.

    Attributes:
        verify: run the original and the folded model (ONNX Runtime, optimizations disabled; for
            PyTorch inputs the original is PyTorch itself) on seeded inputs and compare outputs.
        input_shapes: ``{input name: shape}`` for inputs with dynamic dimensions (ONNX) or whose
            shape a PyTorch file does not record.
        atol, rtol: override the per-dtype default tolerances of the verification.
        seed: seed of the random verification (and benchmark) inputs.
        strict: the result fails when any BatchNormalization is kept.
        external_data: force (True) or forbid (False) external data in the output; None: when the
            input had it or the output would exceed 2 GB.
        lower_remaining: rewrite every BatchNormalization that stays into ``Mul`` + ``Add``.
        duplicate_shared: fold into a copy of a producer whose output also feeds other nodes.
        allow_slower_folds: also make forward folds that the cost rule expects to slow the model
            down at ONNX Runtime's default level (a padded Conv's border-correction ``Add``
            larger than the BN it replaces); kept by default with reason ``slower_fold``.
        bench: after a verified write, time the original against the folded model under ONNX
            Runtime (for a PyTorch input, the unfolded export against the folded model).
        trust_pickle: PyTorch input: allow unpickling a whole ``nn.Module`` (runs code from the
            file). A permission, not an action: it changes nothing for other inputs.
        opset: ONNX opset of the export of a PyTorch input.
        exporter: PyTorch input: ``"dynamo"`` (torch's torch.export-based exporter, the default)
            or ``"torchscript"`` (the deprecated legacy exporter, an explicit fallback).
        accept_unverified: write the output even when it could not be verified (ONNX Runtime
            cannot run the original, or the time budget ran out); the result's status stays
            ``"unverified"``. Never under ``strict``.
        verify_timeout: the verification's time budget in seconds (0: none); ``None``:
            ``$BNFOLD_VERIFY_TIMEOUT`` or the default (see :func:`bnfold._ort.resolve_verify_timeout`).
    """

    verify: bool = True
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0
    strict: bool = False
    external_data: bool | None = None
    lower_remaining: bool = False
    duplicate_shared: bool = False
    allow_slower_folds: bool = False
    bench: bool = False
    trust_pickle: bool = False
    opset: int = 17
    exporter: str = "dynamo"
    accept_unverified: bool = False
    verify_timeout: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shapes", _normalized_shapes(self.input_shapes))
        if self.strict and not self.verify:
            raise UsageError(
                "--strict never lets an unverified model through and --no-verify writes one "
                "unverified: give one of them, not both"
            )
        timeout = self.verify_timeout
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not timeout >= 0
            or math.isinf(timeout)
        ):
            raise UsageError(f"verify_timeout must be a number of seconds >= 0, got {timeout!r}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise UsageError(f"{name} must be a number >= 0, got {value!r}")
            if value is not None and math.isnan(value):
                raise UsageError(f"{name} must be a number >= 0, got nan")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < 7:
            raise UsageError(f"opset must be an integer >= 7, got {self.opset!r}")
        if self.exporter not in ("dynamo", "torchscript"):
            raise UsageError(f"exporter must be 'dynamo' or 'torchscript', got {self.exporter!r}")

    @classmethod
    def from_keywords(cls, options: FoldOptions | None, **keywords: Any) -> FoldOptions:
        """``options`` if given (then every keyword must be at its default), else the keywords.

        The public functions call this with their own keyword arguments, so ``fold(m,
        strict=True)`` and ``fold(m, options=FoldOptions(strict=True))`` mean the same thing.
        """
        if options is None:
            return cls(**keywords)
        if not isinstance(options, FoldOptions):
            raise UsageError(f"options must be a bnfold.FoldOptions, got {type(options).__name__}")
        defaults = cls()
        mixed = sorted(k for k, v in keywords.items() if _differs(v, getattr(defaults, k)))
        if mixed:
            raise UsageError(
                f"give fold options either as keywords or as options=FoldOptions(...), not both "
                f"(got options= and {', '.join(mixed)})"
            )
        return options

    def replace(self, **changes: Any) -> FoldOptions:
        """A copy with ``changes`` applied (validated like a new object)."""
        return dataclasses.replace(self, **changes)

    def changed(self) -> list[str]:
        """The names of the options that differ from their defaults, in declaration order."""
        defaults = FoldOptions()
        return [
            f.name
            for f in dataclasses.fields(self)
            if _differs(getattr(self, f.name), getattr(defaults, f.name))
        ]

    def refuse(self, names: Iterable[str], where: str, why: str) -> None:
        """Raise a UsageError when any option in ``names`` is set: ``where`` cannot honour it."""
        given = [n for n in self.changed() if n in set(names)]
        if given:
            flags = ", ".join(f"{n} ({FLAG_NAMES.get(n, n)})" for n in given)
            raise UsageError(f"{where} does not support {flags}: {why}")


def _differs(value: Any, default: Any) -> bool:
    if isinstance(default, Mapping):
        return bool(value)
    return value is not default and value != default


def _normalized_shapes(shapes: Any) -> dict[str, tuple[int, ...]]:
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise UsageError(
            f"input_shapes must map input names to shapes, got {type(shapes).__name__}"
        )
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        try:
            if isinstance(shape, (str, bytes)):
                raise TypeError(shape)
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise UsageError(
                f"input shape for {str(name)!r} must be a sequence of integers"
            ) from None
        out[str(name)] = dims
    return out
