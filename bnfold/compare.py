"""Equivalence check: run the original and the folded model on the same seeded inputs and compare.

How a check runs
----------------
Both models run under ONNX Runtime on CPU with graph optimizations **disabled**: from the "basic"
level up ORT fuses Conv+BatchNormalization itself, which would make the reference look like the
folded model and hide a wrong fold. The reference session runs first (all ``samples`` batches), its
outputs are kept, and the session is deleted and garbage-collected before the candidate session is
created, so peak memory is one model plus one set of outputs, not two models.

Inputs come from the reference model's declared inputs, seeded with ``numpy.random.default_rng``:
floating inputs are standard normal (cast to the input's dtype), integer inputs uniform in
``[0, 4)`` (small enough to be valid indices for most Gather-like ops), bool inputs fair coin flips.
Dynamic dimensions are 1 unless ``input_shapes`` says otherwise. Batch ``k`` of ``samples`` uses
seed ``seed + k``, so any failing batch can be reproduced alone.

What "equal" means
------------------
Element-wise, with the semantics of ``numpy.isclose(candidate, reference)``::

    |candidate - reference| <= atol + rtol * |reference|

Positions where both values are NaN, or both are the same infinity, are equal. Where only one side
is NaN or infinite, or the infinities have opposite signs, the element is a mismatch (counted in
``nan_or_inf_mismatch``) that no tolerance can excuse. All statistics are computed in float64 over
the elements that are finite in both outputs, aggregated over all samples:

* ``max_abs_error``, ``mean_abs_error``, ``median_abs_error`` of ``|candidate - reference|``;
* ``max_rel_error = max(|candidate - reference| / max(|reference|, atol))``. Dividing by
  ``max(|reference|, atol)`` instead of ``|reference|`` keeps the ratio finite where the reference
  is 0 (it becomes ``|difference| / atol`` there); only with ``atol == 0`` can a difference at a
  zero reference make it infinite;
* ``min_atol_to_pass``: the smallest atol that would pass with the rtol in use, and
  ``min_rtol_to_pass``: the smallest rtol that would pass with the atol in use (``inf`` when none
  can, e.g. a difference where the reference is exactly 0 and exceeds atol, or any NaN/Inf
  mismatch). Comparing again with them passes; they are minimal up to float rounding.

Default tolerances and why
--------------------------
Folding changes the order of rounding, not the math: ``conv(x, W) * s + t`` becomes
``conv(x, W * s) + t'``, each side rounded differently. A correct fold therefore differs from the
original by about as much as the original differs from exact arithmetic, and that grows with depth
and with the magnitude of activations. The defaults were calibrated on a 50-layer residual network
of 3x3 Conv+BN+ReLU (25 blocks, 32 to 256 channels, realistic BN statistics) folded in float64 and
rounded once; the numbers below are the atol a *correct* fold needed at the listed rtol there:

================  ==========  ==========  =========================================================
dtype             atol        rtol        reasoning
================  ==========  ==========  =========================================================
float64           1e-9        1e-9        a correct fold is ~1e-15 off; this still catches a fold
                                          that was computed in float32 precision (~1e-7)
float32           1e-4        1e-4        a correct fold needed atol ~6e-6 at rtol 1e-4 (errors
                                          ~1e-5 on activations of magnitude ~8): 15x headroom for
                                          deeper/wider nets, still ~1000 ulp, so a wrong epsilon
                                          (~5e-4 relative) or a missing bias fails
float16           5e-2        1e-2        ORT rounds every fp16 activation, so a correct fold is
                                          ~1-2 ulp off at the activations' magnitude: it needed
                                          atol ~9e-3 at rtol 1e-2; rtol is ~10 eps
bfloat16          3e-1        8e-2        float16's budget scaled to bfloat16's 8x larger eps (ORT
                                          CPU runs few bfloat16 kernels, so not measured)
other floats      48 * eps    10 * eps    the same rule in units of the dtype's eps (float8 ...)
integers, bool    0           0           must be identical
================  ==========  ==========  =========================================================

Explicit ``atol``/``rtol`` arguments override the defaults for every output; ``output_tolerances``
overrides both per output name.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from bnfold import _ort
from bnfold.errors import InputNotFoundError, InvalidModelError, UsageError

__all__ = [
    "OutputComparison",
    "VerificationResult",
    "compare_outputs",
    "default_tolerances",
    "make_inputs",
    "parse_input_shapes",
    "verify_models",
    "load_input_data",
    "DISTRIBUTIONS",
]

logger = logging.getLogger(__name__)

_TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float64): (1e-9, 1e-9),
    np.dtype(np.float32): (1e-4, 1e-4),
    np.dtype(np.float16): (5e-2, 1e-2),
    np.dtype(ml_dtypes.bfloat16): (3e-1, 8e-2),
}

_INT_LOW, _INT_HIGH = 0, 4  # integer inputs are uniform in [0, 4)


def _is_float(dtype: np.dtype) -> bool:
    """True for numpy floats and the ml_dtypes floats (bfloat16, float8...)."""
    if np.issubdtype(dtype, np.inexact):
        return True
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """``(atol, rtol)`` used for an output of ``dtype`` when nothing overrides them.

    See the module docstring for the values and the reasoning. Integers and bool compare exactly.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        dtype = np.dtype(np.float64 if dtype.itemsize > 8 else np.float32)
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if _is_float(dtype):
        eps = float(ml_dtypes.finfo(dtype).eps)
        return 48.0 * eps, 10.0 * eps
    return 0.0, 0.0


# --- input shapes and inputs -----------------------------------------------------------------------

_SHAPE_HELP = "expected NAME=DIM,DIM,... with positive integers, e.g. x=1,3,224,224"


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``["x=1,3,224,224", "y=4"]`` into ``{"x": (1, 3, 224, 224), "y": (4,)}``.

    Dimensions may also be wrapped in brackets (``x=[1,3,224,224]``); ``x=`` or ``x=[]`` is a
    scalar. The name is everything before the last ``=``. Raises :class:`UsageError` with one line
    for a malformed spec or a name given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = str(spec).rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"malformed input shape {spec!r}: {_SHAPE_HELP}")
        dims_text = dims_text.strip()
        if dims_text and dims_text[0] in "[(" and dims_text[-1] in "])":
            dims_text = dims_text[1:-1].strip()
        dims: list[int] = []
        if dims_text:
            for part in dims_text.split(","):
                part = part.strip()
                if not re.fullmatch(r"[0-9]+", part) or int(part) < 1:
                    raise UsageError(
                        f"malformed input shape {spec!r}: dimension {part!r} is not a positive "
                        f"integer; {_SHAPE_HELP}"
                    )
                dims.append(int(part))
        if name in shapes:
            raise UsageError(f"input shape for {name!r} is given twice")
        shapes[name] = tuple(dims)
    return shapes


class _InputSpec(NamedTuple):
    """What ``make_inputs`` needs of an input; ORT's ``NodeArg`` has the same attributes."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]


def _format_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _is_fixed(dim: Any) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0


def _resolve_shape(
    name: str, model_shape: Sequence[Any], given: tuple[int, ...] | None
) -> tuple[int, ...]:
    if given is None:
        return tuple(int(d) if _is_fixed(d) else 1 for d in model_shape)
    if not model_shape:  # ORT reports scalars and inputs of unknown rank alike: trust the user
        return tuple(given)
    expected = f"the model expects {_format_shape(model_shape)}"
    if len(given) != len(model_shape):
        raise UsageError(
            f"input shape for {name!r} has rank {len(given)} but {expected} (rank {len(model_shape)})"
        )
    for i, (dim, want) in enumerate(zip(given, model_shape, strict=True)):
        if _is_fixed(want) and int(want) != dim:
            raise UsageError(f"input shape for {name!r} has {dim} in dimension {i} but {expected}")
    return tuple(given)


DISTRIBUTIONS = ("normal", "uniform")


def _check_input_size(name: str, shape: tuple[int, ...]) -> None:
    """Refuse a random input that would not fit in memory (it is generated in float64)."""
    try:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        budget = 8 << 30
    needed = math.prod(shape) * 8
    if needed > budget:
        raise UsageError(
            f"input {name!r} of shape {list(shape)} would need {needed / 2**30:.3g} GiB to verify; "
            "give a smaller --input-shape, or use --no-verify"
        )


def make_inputs(
    session_inputs: Iterable[Any],
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    seed: int,
    distribution: str = "normal",
    value_range: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded random inputs for ``session_inputs`` (ORT ``NodeArg`` objects: name, type, shape).

    Floats are standard normal (``distribution="normal"``, clipped to ``value_range`` when given) or
    uniform in ``value_range`` (default ``[-1, 1)``), cast to the input's dtype; integers are
    uniform in ``value_range`` (default ``[0, 4)``), bools fair coin flips. Dynamic dimensions (``None`` or a symbolic name) are 1 unless ``input_shapes`` gives
    the input's full shape. ORT reports an input of unknown rank like a scalar (shape ``[]``), so
    for those any given shape is accepted. Raises :class:`UsageError` when ``input_shapes`` names an input the model
    does not have, or gives a shape whose rank or fixed dimensions disagree with the model, or an
    input is not a tensor of a supported type.
    """
    specs = [_InputSpec(i.name, i.type, tuple(i.shape or ())) for i in session_inputs]
    given = dict(input_shapes or {})
    unknown = [name for name in given if name not in {s.name for s in specs}]
    if unknown:
        real = ", ".join(repr(s.name) for s in specs) or "none"
        raise UsageError(
            f"input shape given for {', '.join(map(repr, unknown))}, which is not an input of the "
            f"model; its inputs are: {real}"
        )
    if distribution not in DISTRIBUTIONS:
        raise UsageError(
            f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}"
        )
    if value_range is not None and not (float(value_range[0]) < float(value_range[1])):
        raise UsageError(f"value range {list(value_range)} is empty: LOW must be below HIGH")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            dtype = _ort.ort_type_to_numpy(spec.type)
        except ValueError:
            raise UsageError(
                f"cannot generate values for input {spec.name!r} of type {spec.type}; only numeric "
                "and bool tensors are supported"
            ) from None
        shape = _resolve_shape(spec.name, spec.shape, given.get(spec.name))
        _check_input_size(spec.name, shape)
        if dtype == np.bool_:
            value = rng.random(shape) < 0.5
        elif _is_float(dtype):
            if distribution == "uniform":
                low, high = value_range if value_range is not None else (-1.0, 1.0)
                value = rng.uniform(low, high, size=shape).astype(dtype)
            else:
                value = rng.standard_normal(shape)
                if value_range is not None:
                    value = np.clip(value, value_range[0], value_range[1])
                value = value.astype(dtype)
        else:
            low, high = (
                (_INT_LOW, _INT_HIGH)
                if value_range is None
                else (
                    math.ceil(value_range[0]),
                    max(math.ceil(value_range[0]) + 1, math.ceil(value_range[1])),
                )
            )
            info = np.iinfo(dtype)
            value = rng.integers(
                max(low, info.min), min(high, int(info.max) + 1), size=shape, dtype=dtype
            )
        feeds[spec.name] = np.asarray(value, dtype=dtype)
    return feeds


# --- comparing one output --------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the candidate compares with the reference; truthy when it passed.

    Statistics are float64 over the elements finite in both outputs, over all samples (see the
    module docstring for the formulas). ``mismatched`` counts every failing element, including the
    ``nan_or_inf_mismatch`` ones. ``worst_index`` is the position (within one sample's output,
    sample number in ``worst_sample``) of the first NaN/Inf mismatch if there is one, else of the
    largest absolute error; ``None`` when the outputs are identical. ``message`` says why the
    outputs could not be compared element-wise (shape or dtype differ); the statistics are NaN then.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs_error: float
    mean_abs_error: float
    median_abs_error: float
    max_rel_error: float
    worst_index: tuple[int, ...] | None
    mismatched: int
    nan_or_inf_mismatch: int
    min_atol_to_pass: float
    min_rtol_to_pass: float
    passed: bool
    elements: int = 0
    worst_sample: int | None = None
    message: str | None = None

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; floats that are not finite (``inf``, ``nan``) become ``None``."""
        return {
            "name": self.name,
            "passed": self.passed,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "elements": self.elements,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_error": _finite_or_none(self.max_abs_error),
            "mean_abs_error": _finite_or_none(self.mean_abs_error),
            "median_abs_error": _finite_or_none(self.median_abs_error),
            "max_rel_error": _finite_or_none(self.max_rel_error),
            "worst_index": None if self.worst_index is None else list(self.worst_index),
            "worst_sample": self.worst_sample,
            "mismatched": self.mismatched,
            "nan_or_inf_mismatch": self.nan_or_inf_mismatch,
            "min_atol_to_pass": _finite_or_none(self.min_atol_to_pass),
            "min_rtol_to_pass": _finite_or_none(self.min_rtol_to_pass),
            "message": self.message,
        }


def check_tolerance(value: Any, what: str) -> float:
    """A tolerance as a float; a negative, NaN, infinite or non-numeric one is a UsageError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise UsageError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


def _smallest_passing(start: float, passes: Any) -> float:
    """``start`` nudged up by ulps until ``passes(value)``, so rounding cannot make it fail."""
    value = start
    for _ in range(64):
        if passes(value):
            return value
        value = float(np.nextafter(value, math.inf))
    return value * (1 + 1e-12) if passes(value * (1 + 1e-12)) else math.inf


class _Accumulator:
    """Statistics of one output, fed one sample at a time (so references can be freed as we go)."""

    def __init__(self, name: str, atol: float, rtol: float) -> None:
        self.name, self.atol, self.rtol = name, atol, rtol
        self.dtype: str | None = None
        self.shape: tuple[int, ...] = ()
        self.diffs: list[np.ndarray] = []
        self.elements = 0
        self.max_abs = -1.0
        self.max_rel = 0.0
        self.mismatched = 0
        self.nonfinite = 0
        self.min_atol = 0.0
        self.min_rtol = 0.0
        self.worst: tuple[tuple[int, ...], int] | None = None
        self.first_nonfinite: tuple[tuple[int, ...], int] | None = None
        self.message: str | None = None

    def add(self, reference: Any, candidate: Any, sample: int = 0) -> None:
        ref, cand = np.asarray(reference), np.asarray(candidate)
        if self.dtype is None:
            self.dtype, self.shape = str(ref.dtype), tuple(ref.shape)
        if ref.shape != cand.shape or ref.dtype != cand.dtype:
            self._incomparable(
                ref,
                f"output {self.name!r}: the candidate's is {cand.dtype}{list(cand.shape)}, the "
                f"reference's {ref.dtype}{list(ref.shape)}",
            )
            return
        wide = np.complex128 if ref.dtype.kind == "c" else np.float64
        try:
            r, c = ref.astype(wide), cand.astype(wide)
        except (TypeError, ValueError):
            self._incomparable(
                ref, f"output {self.name!r}: cannot compare values of type {ref.dtype}"
            )
            return
        self.elements += r.size
        # Overflow (|c - r| of huge finite values, ratios over tiny references) rightly gives inf.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            self._add_values(r, c, sample)

    def _add_values(self, r: np.ndarray, c: np.ndarray, sample: int) -> None:
        shape = r.shape
        finite = np.isfinite(r) & np.isfinite(c)
        all_finite = bool(finite.all())
        if not all_finite:
            same = (np.isnan(r) & np.isnan(c)) | (r == c)
            bad = ~finite & ~same
            n_bad = int(np.count_nonzero(bad))
            if n_bad:
                self.nonfinite += n_bad
                self.mismatched += n_bad
                if self.first_nonfinite is None:
                    flat = int(np.flatnonzero(bad)[0])
                    self.first_nonfinite = (self._unravel(flat, shape), sample)
            r, c = r[finite], c[finite]
        else:
            r, c = r.ravel(), c.ravel()

        diff = np.abs(c - r)
        abs_ref = np.abs(r)
        atol, rtol = self.atol, self.rtol
        self.mismatched += int(np.count_nonzero(~(diff <= atol + rtol * abs_ref)))
        if diff.size == 0:
            return
        self.diffs.append(diff)

        k = int(np.argmax(diff))
        if diff[k] > self.max_abs:
            self.max_abs = float(diff[k])
            flat = k if all_finite else int(np.flatnonzero(finite)[k])
            self.worst = (self._unravel(flat, shape), sample)

        denominator = np.maximum(abs_ref, atol)
        rel = np.where(denominator > 0, diff / np.where(denominator > 0, denominator, 1), 0.0)
        rel = np.where((denominator == 0) & (diff > 0), np.inf, rel)
        self.max_rel = max(self.max_rel, float(rel.max()))

        need_atol = max(0.0, float((diff - rtol * abs_ref).max()))
        need_atol = _smallest_passing(need_atol, lambda a: bool(np.all(diff <= a + rtol * abs_ref)))
        self.min_atol = max(self.min_atol, need_atol)

        over = diff > atol
        if over.any():
            d, a = diff[over], abs_ref[over]
            if np.any(a == 0):
                need_rtol = math.inf
            else:
                need_rtol = _smallest_passing(
                    float(((d - atol) / a).max()), lambda t: bool(np.all(d <= atol + t * a))
                )
            self.min_rtol = max(self.min_rtol, need_rtol)

    @staticmethod
    def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()

    def _incomparable(self, ref: np.ndarray, message: str) -> None:
        self.message = self.message or message
        self.mismatched += max(int(ref.size), 1)
        self.elements += int(ref.size)

    def finish(self) -> OutputComparison:
        incomparable = self.message is not None
        if incomparable:
            max_abs = mean_abs = median_abs = max_rel = math.nan
        elif self.diffs:
            all_diffs = np.concatenate(self.diffs) if len(self.diffs) > 1 else self.diffs[0]
            max_abs = float(all_diffs.max())
            mean_abs = float(all_diffs.mean())
            median_abs = float(np.median(all_diffs))
            max_rel = self.max_rel
        else:  # nothing finite in both (empty output, or all NaN/Inf)
            max_abs = mean_abs = median_abs = max_rel = 0.0
        hopeless = incomparable or self.nonfinite > 0
        if self.first_nonfinite is not None:
            worst = self.first_nonfinite
        elif self.worst is not None and max_abs > 0:
            worst = self.worst
        else:
            worst = None
        return OutputComparison(
            name=self.name,
            dtype=self.dtype or "unknown",
            shape=self.shape,
            atol=self.atol,
            rtol=self.rtol,
            max_abs_error=max_abs,
            mean_abs_error=mean_abs,
            median_abs_error=median_abs,
            max_rel_error=max_rel,
            worst_index=None if worst is None else worst[0],
            mismatched=self.mismatched,
            nan_or_inf_mismatch=self.nonfinite,
            min_atol_to_pass=math.inf if hopeless else self.min_atol,
            min_rtol_to_pass=math.inf if hopeless else self.min_rtol,
            passed=self.mismatched == 0 and not incomparable,
            elements=self.elements,
            worst_sample=None if worst is None else worst[1],
            message=self.message,
        )


def compare_outputs(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> OutputComparison:
    """Compare one output; ``atol``/``rtol`` default to :func:`default_tolerances` of the reference.

    See the module docstring for the pass criterion, NaN/Inf rules and statistics.
    """
    reference = np.asarray(reference)
    default_atol, default_rtol = default_tolerances(reference.dtype)
    accumulator = _Accumulator(
        name,
        check_tolerance(default_atol if atol is None else atol, "atol"),
        check_tolerance(default_rtol if rtol is None else rtol, "rtol"),
    )
    accumulator.add(reference, candidate)
    return accumulator.finish()


# --- comparing two models --------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationResult:
    """The outcome of :func:`verify_models`; truthy when it passed.

    ``passed`` is True only when every output passed. ``skipped_reason`` is set (and ``passed`` is
    False, ``outputs`` empty) when the check could not run at all, e.g. ONNX Runtime cannot load or
    run the reference model; callers may treat that as "unverified" rather than "different".
    ``message`` is set when the candidate could not be compared: it does not load or run, or its
    inputs or outputs differ from the reference's. Per-output problems are in ``outputs``.
    """

    passed: bool
    outputs: tuple[OutputComparison, ...] = ()
    seed: int = 0
    samples: int = 1
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    skipped_reason: str | None = None
    message: str | None = None
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failed_outputs(self) -> tuple[OutputComparison, ...]:
        return tuple(o for o in self.outputs if not o.passed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (see :meth:`OutputComparison.to_dict`)."""
        return {
            "passed": self.passed,
            "skipped_reason": self.skipped_reason,
            "message": self.message,
            "seed": self.seed,
            "samples": self.samples,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "seconds": self.seconds,
            "outputs": [o.to_dict() for o in self.outputs],
        }


ModelSource = str | os.PathLike | bytes


def _model_source(model: Any, what: str) -> str | bytes:
    """A path or bytes for ORT; a ModelProto-like object (anything with SerializeToString) too."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise InputNotFoundError(f"{what} model not found: {path}")
        return path
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    raise TypeError(f"{what} model must be a path or bytes, got {type(model).__name__}")


def _describe_interface(items: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{name}: {type_}" for name, type_ in items) or "none"


def verify_models(
    reference: ModelSource,
    candidate: ModelSource,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    output_tolerances: Mapping[str, tuple[float, float]] | None = None,
    samples: int = 1,
    distribution: str = "normal",
    value_range: tuple[float, float] | None = None,
    data: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> VerificationResult:
    """Check that ``candidate`` computes what ``reference`` computes, under ONNX Runtime CPU.

    Args:
        reference, candidate: a path (ORT loads external data next to it) or the bytes of a
            serialized ``ModelProto`` (a ``ModelProto`` itself is accepted and serialized).
        input_shapes: full shapes for inputs with dynamic dimensions (others default to 1).
        seed: seed of the first batch; batch ``k`` uses ``seed + k``.
        atol, rtol: override the per-dtype defaults for every output.
        output_tolerances: ``{output_name: (atol, rtol)}``, overrides everything for that output.
        samples: number of seeded batches; statistics are aggregated over all of them.
        distribution, value_range: how random inputs are drawn (see :func:`make_inputs`).
        data: user batches, ``[{input_name: array}, ...]``; each is one sample (``samples`` is then
            ``len(data)``); inputs a batch leaves out get seeded random values.

    Returns a :class:`VerificationResult`; it does not raise when a model cannot be run (see
    ``skipped_reason`` and ``message``). Raises :class:`UsageError` for bad arguments (unknown input
    or output names, shapes that contradict the model, negative tolerances, ``samples < 1``) and
    :class:`InputNotFoundError` for a path that does not exist.
    """
    started = time.perf_counter()
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise UsageError(f"samples must be an integer >= 1, got {samples!r}")
    samples = int(samples)
    atol = None if atol is None else check_tolerance(atol, "atol")
    rtol = None if rtol is None else check_tolerance(rtol, "rtol")
    per_output = {
        name: (
            check_tolerance(t[0], f"atol of {name!r}"),
            check_tolerance(t[1], f"rtol of {name!r}"),
        )
        for name, t in (output_tolerances or {}).items()
    }
    reference_source = _model_source(reference, "reference")
    candidate_source = _model_source(candidate, "candidate")

    def result(**kwargs: Any) -> VerificationResult:
        kwargs.setdefault("passed", False)
        outcome = VerificationResult(
            seed=seed, samples=samples, seconds=time.perf_counter() - started, **kwargs
        )
        _log_outcome(outcome)
        return outcome

    # 1. The reference: run every batch, keep the outputs, drop the session.
    try:
        session = _ort.make_session(reference_source, level="disable")
    except InvalidModelError as error:
        return result(
            skipped_reason=f"ONNX Runtime cannot run the reference model: {_ort.error_reason(error)}"
        )
    inputs = [_InputSpec(i.name, i.type, tuple(i.shape or ())) for i in session.get_inputs()]
    outputs = [(o.name, o.type) for o in session.get_outputs()]
    for spec in inputs:
        try:
            _ort.ort_type_to_numpy(spec.type)
        except ValueError:
            return result(
                skipped_reason=f"cannot generate values for input {spec.name!r} of type {spec.type}"
            )
    for name, type_ in outputs:
        try:
            _ort.ort_type_to_numpy(type_)
        except ValueError:
            return result(skipped_reason=f"cannot compare output {name!r} of type {type_}")
    unknown = [name for name in per_output if name not in {n for n, _ in outputs}]
    if unknown:
        raise UsageError(
            f"tolerance given for {', '.join(map(repr, unknown))}, which is not an output of the "
            f"model; its outputs are: {', '.join(repr(n) for n, _ in outputs)}"
        )

    if data is not None:
        samples = len(data)
        if samples < 1:
            raise UsageError("no input data given")
        names = {spec.name: spec for spec in inputs}
        for batch in data:
            for name in batch:
                if name not in names:
                    raise UsageError(
                        f"input data given for {name!r}, which is not an input of the model; its "
                        f"inputs are: {', '.join(repr(n) for n in names) or 'none'}"
                    )

    def feeds_for(k: int) -> dict[str, np.ndarray]:
        batch = dict(data[k]) if data is not None else {}
        shapes = dict(input_shapes or {})
        shapes.update({name: tuple(np.shape(v)) for name, v in batch.items()})
        feeds = make_inputs(
            inputs,
            input_shapes=shapes,
            seed=seed + k,
            distribution=distribution,
            value_range=value_range,
        )
        for name, value in batch.items():
            feeds[name] = np.asarray(value).astype(feeds[name].dtype, copy=False)
        return feeds

    first = feeds_for(0)
    used_shapes = {name: [int(d) for d in value.shape] for name, value in first.items()}
    references: list[list[np.ndarray]] = []
    try:
        for k in range(samples):
            feeds = first if k == 0 else feeds_for(k)
            references.append(_ort.run(session, feeds))
    except _ort.OrtRunError as error:
        return result(
            input_shapes=used_shapes,
            skipped_reason=f"ONNX Runtime cannot run the reference model: {_ort.error_reason(error)}",
        )
    finally:
        del session, first
        gc.collect()
    logger.debug("ran the reference model on %d batch(es)", samples)

    # 2. The candidate: same interface, then compare batch by batch.
    try:
        session = _ort.make_session(candidate_source, level="disable")
    except InvalidModelError as error:
        return result(
            input_shapes=used_shapes,
            message=f"ONNX Runtime cannot run the candidate model: {_ort.error_reason(error)}",
        )
    try:
        message = _interface_mismatch(
            inputs, outputs, session.get_inputs(), [(o.name, o.type) for o in session.get_outputs()]
        )
        if message:
            return result(input_shapes=used_shapes, message=message)
        accumulators = []
        for name, type_ in outputs:
            default_atol, default_rtol = default_tolerances(_ort.ort_type_to_numpy(type_))
            out_atol, out_rtol = per_output.get(
                name,
                (default_atol if atol is None else atol, default_rtol if rtol is None else rtol),
            )
            accumulators.append(_Accumulator(name, out_atol, out_rtol))
        for k in range(samples):
            feeds = feeds_for(k)
            try:
                produced = _ort.run(session, feeds)
            except _ort.OrtRunError as error:
                return result(
                    input_shapes=used_shapes,
                    message=f"ONNX Runtime cannot run the candidate model: {_ort.error_reason(error)}",
                )
            expected, references[k] = references[k], []  # free as we go
            for accumulator, ref, cand in zip(accumulators, expected, produced, strict=True):
                accumulator.add(ref, cand, sample=k)
    finally:
        del session
    comparisons = tuple(a.finish() for a in accumulators)
    return result(
        passed=all(c.passed for c in comparisons),
        outputs=comparisons,
        input_shapes=used_shapes,
    )


def _interface_mismatch(
    inputs: Sequence[_InputSpec],
    outputs: Sequence[tuple[str, str]],
    candidate_inputs: Sequence[Any],
    candidate_outputs: Sequence[tuple[str, str]],
) -> str | None:
    """Why the candidate cannot be fed the reference's inputs or matched output by output, if so."""
    want = {s.name: s.type for s in inputs}
    have = {i.name: i.type for i in candidate_inputs}
    if want != have:
        return (
            f"the candidate's inputs ({_describe_interface(have.items())}) differ from the "
            f"reference's ({_describe_interface(want.items())})"
        )
    if [n for n, _ in outputs] != [n for n, _ in candidate_outputs]:
        return (
            f"the candidate's outputs ({', '.join(n for n, _ in candidate_outputs)}) differ from the "
            f"reference's ({', '.join(n for n, _ in outputs)}); names and order must match"
        )
    return None


def _log_outcome(outcome: VerificationResult) -> None:
    if outcome.skipped_reason:
        logger.warning("verification skipped: %s", outcome.skipped_reason)
    elif outcome.message:
        logger.info("verification failed: %s", outcome.message)
    for output in outcome.outputs:
        logger.info(
            "output %r %s: max abs %.3g, max rel %.3g, %d/%d mismatched (atol=%g, rtol=%g)",
            output.name,
            "passed" if output.passed else "FAILED",
            output.max_abs_error,
            output.max_rel_error,
            output.mismatched,
            output.elements,
            output.atol,
            output.rtol,
        )


def load_input_data(specs: Iterable[str]) -> list[dict[str, np.ndarray]]:
    """Parse ``--data`` values; each is one batch: ``FILE.npz`` (arrays keyed by input name) or
    ``NAME=FILE.npy[,NAME=FILE.npy...]``. Raises :class:`UsageError` / :class:`InputNotFoundError`."""
    batches: list[dict[str, np.ndarray]] = []
    for spec in specs:
        batch: dict[str, np.ndarray] = {}
        parts = (
            [str(spec)]
            if str(spec).endswith(".npz") and "=" not in str(spec)
            else str(spec).split(",")
        )
        for part in parts:
            name, sep, path = part.rpartition("=")
            if not sep and path.endswith(".npz"):
                batch.update(_load_npz(path))
                continue
            if not sep or not name or not path:
                raise UsageError(f"malformed --data {spec!r}: expected FILE.npz or NAME=FILE.npy")
            batch[name] = _load_npy(path)
        batches.append(batch)
    return batches


def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UsageError(
            f"{path}: not a .npy array ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None


def _load_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise UsageError(
            f"{path}: not a .npz archive ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
