"""Comparing one output: tolerances, the pass rule, NaN/Inf rules and the error statistics
(see :mod:`bnfold.compare` for the definitions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from bnfold._text import finite_or_none as _finite_or_none
from bnfold.errors import UsageError

from .inputs import _is_float

_TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float64): (1e-9, 1e-9),
    np.dtype(np.float32): (1e-4, 1e-4),
    np.dtype(np.float16): (5e-2, 1e-2),
    np.dtype(ml_dtypes.bfloat16): (3e-1, 8e-2),
}


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
    # the verdict's yardstick (see bnfold.calibrate): "calibrated" (atol is the threshold derived
    # from the measured noise, rtol 0), "tolerance" (the user's atol/rtol) or "exact" (integers)
    mode: str = "tolerance"
    noise: float | None = None  # the measured noise floor, max over noise_sources' runs
    noise_sources: dict[str, float] | None = None
    scale: float = 0.0  # max |reference| over finite elements and samples
    margin: float = math.inf  # min over elements of allowed / |difference|; passes when >= 1

    def __bool__(self) -> bool:
        return self.passed

    @property
    def threshold(self) -> float:
        """The largest difference allowed at the output's largest reference value."""
        return self.atol + self.rtol * self.scale

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
            "mode": self.mode,
            "noise": _finite_or_none(self.noise) if self.noise is not None else None,
            "noise_sources": (
                {k: _finite_or_none(v) for k, v in self.noise_sources.items()}
                if self.noise_sources is not None
                else None
            ),
            "threshold": _finite_or_none(self.threshold),
            "scale": _finite_or_none(self.scale),
            "margin": _finite_or_none(self.margin),
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
        self.max_ratio = 0.0  # max of |difference| / (atol + rtol * |reference|)
        self.scale = 0.0

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
        allowed = atol + rtol * abs_ref
        self.mismatched += int(np.count_nonzero(~(diff <= allowed)))
        if diff.size == 0:
            return
        self.scale = max(self.scale, float(abs_ref.max()))
        over_zero = (allowed == 0) & (diff > 0)
        ratio = np.where(allowed > 0, diff / np.where(allowed > 0, allowed, 1), 0.0)
        self.max_ratio = max(self.max_ratio, math.inf if over_zero.any() else float(ratio.max()))
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
            scale=self.scale,
            margin=0.0 if hopeless else (math.inf if self.max_ratio == 0 else 1 / self.max_ratio),
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
