"""Calibrated equality: judge a folded model against the numerical noise the model itself has.

Why
---
A correct fold changes the order of rounding, not the math. How far that moves an output depends on
the model: a 50-layer net with logits of magnitude 3e5 moves a near-zero logit by 0.1 when its
convolution weights are rounded differently, while a shallow MLP moves by 1e-7. A fixed element-wise
``atol + rtol·|ref|`` cannot tell the first from a bug in the second, so this module *measures* the
noise of the reference model on the very inputs of the check and judges the fold against it.

The noise floor, per output
---------------------------
Every quantity is a maximum over the elements (finite in both runs) and over all samples, computed in
float64:

* ``ort_basic``: ``max |ref_basic - ref|``, where ``ref`` is the reference model run by ONNX Runtime
  with graph optimizations disabled and ``ref_basic`` the same model at ``ORT_ENABLE_BASIC``. From that
  level ORT fuses Conv+BatchNormalization itself and folds constants: the difference is the rounding
  noise of exactly the rewrite bnfold makes, made by the runtime users accept in production.
* ``weight_ulp``: ``max |ref_perturbed - ref|``, where ``ref_perturbed`` is the reference with the
  floating-point parameters (initializers or Constant nodes) of its Conv, ConvTranspose, Gemm,
  MatMul, BatchNormalization, Add, Sub, Mul, Div and PRelu nodes moved by one unit in the last place
  with probability ``NUDGE_PROBABILITY`` (1/4), up or down at random (seeded): a root-mean-square
  change of 0.5 ulp per parameter, against the 0.29 ulp of the single rounding a fold makes to each
  new weight and bias. It measures the output's sensitivity to exactly that rounding, also where
  ORT does not fuse (Gemm, MatMul, forward folds, decomposed BNs) and in any dtype (float16 too).
* ``dtype_floor``: ``FLOOR_ULPS × unit roundoff(dtype) × max |ref|``, so that an output whose
  measured noise happens to be 0 (integer-valued, or a model ORT runs exactly) is not held to
  bit-exactness.

A float64 shadow of the reference (casting the model to double and running it in ORT) would be the
other natural yardstick, but ONNX Runtime's CPU provider has no double kernel for Conv,
ConvTranspose or GlobalAveragePool (measured with onnxruntime 1.32), so it is unavailable for the
models that matter most; ``benchmarks/mutations.py`` uses onnx's float64 ReferenceEvaluator instead,
as the independent truth against which this verdict is measured.

The verdict
-----------
``noise = max(ort_basic, weight_ulp)``; ``threshold = FACTOR × noise + dtype_floor``;
``error = max |candidate - ref|``. The output passes when ``error <= threshold`` and the candidate is
NaN/±Inf exactly where the reference is. ``margin = threshold / error`` (``inf`` for an exact match):
above 1 passes, and the larger it is the further the fold is from being refused. ``FACTOR`` (4)
covers the accumulation-order noise beyond what ORT's fusion shows, the difference between the
perturbation and a fold's rounding, and variation between samples. ``FLOOR_ULPS`` is 2.

User tolerances keep meaning exactly what they say
--------------------------------------------------
Calibration is the default only when the user gave no tolerance. For an output with a tolerance
(``output_tolerances[name]``, i.e. ``--tol NAME=ATOL,RTOL``), or for every output when ``atol`` or
``rtol`` is given (``--atol``/``--rtol``; the one not given takes the dtype default of
:func:`bnfold.compare.default_tolerances`), that output is judged element-wise as
``|candidate - ref| <= atol + rtol·|ref|`` (numpy.isclose semantics, NaN equal to NaN), and nothing
else: no noise floor widens or narrows it. Its noise floor is still measured and reported, so a reader
sees how the given tolerance compares with the model's own noise. Integer and bool outputs are always
compared exactly.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bnfold import _ort
from bnfold.errors import InvalidModelError, UsageError

__all__ = [
    "FACTOR",
    "FLOOR_ULPS",
    "CalibratedOutput",
    "CalibratedResult",
    "perturb_parameters",
    "verify_calibrated",
]

logger = logging.getLogger(__name__)

#: the fold's error may be this many times the measured noise
FACTOR = 4.0
#: minimum threshold, in unit roundoffs of the output dtype times max |reference|
FLOOR_ULPS = 2.0

# ops whose floating-point initializer operands are perturbed by one ulp (input positions)
_PERTURBED_OPS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4),
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "Div": (0, 1),
    "PRelu": (1,),
}


def _unit_roundoff(dtype: np.dtype) -> float:
    return float(ml_dtypes.finfo(dtype).eps) / 2.0


@dataclass(frozen=True)
class CalibratedOutput:
    """The verdict on one output. ``error``/``noise``/``threshold`` are maxima over elements and
    samples; ``noise_sources`` holds each measured noise (``ort_basic``, ``weight_ulp``) and the
    ``dtype_floor``; ``mode`` is ``"calibrated"``, ``"tolerance"`` (user-given atol/rtol) or
    ``"exact"`` (integers, bools)."""

    name: str
    mode: str
    passed: bool
    error: float
    noise: float
    threshold: float
    scale: float
    margin: float
    noise_sources: dict[str, float] = field(default_factory=dict)
    atol: float | None = None
    rtol: float | None = None
    nan_or_inf_mismatch: int = 0
    message: str | None = None

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        """One line for a human report: the error next to the noise floor and the margin. The
        output name is shown with ``repr`` (it is model-controlled text)."""
        verdict = "ok" if self.passed else "FAILED"
        if self.message:
            return f"{self.name!r}: {verdict}, {self.message}"
        if self.mode == "exact":
            return f"{self.name!r}: {verdict}, exact comparison, max error {self.error:.3g}"
        sources = ", ".join(f"{k} {v:.3g}" for k, v in self.noise_sources.items())
        limit = (
            f"atol {self.atol:g} + rtol {self.rtol:g}·|ref|"
            if self.mode == "tolerance"
            else f"threshold {self.threshold:.3g}"
        )
        extra = (
            f", {self.nan_or_inf_mismatch} NaN/Inf mismatch(es)" if self.nan_or_inf_mismatch else ""
        )
        return (
            f"{self.name!r}: {verdict}, error {self.error:.3g} vs {limit} "
            f"(noise {self.noise:.3g}: {sources}; max |ref| {self.scale:.3g}; "
            f"margin {self.margin:.3g}x){extra}"
        )

    def to_dict(self) -> dict[str, Any]:
        def num(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        return {
            "name": self.name,
            "mode": self.mode,
            "passed": self.passed,
            "error": num(self.error),
            "noise": num(self.noise),
            "threshold": num(self.threshold),
            "scale": num(self.scale),
            "margin": num(self.margin),
            "noise_sources": {k: num(v) for k, v in self.noise_sources.items()},
            "atol": self.atol,
            "rtol": self.rtol,
            "nan_or_inf_mismatch": self.nan_or_inf_mismatch,
            "message": self.message,
        }


@dataclass
class CalibratedResult:
    """The outcome of :func:`verify_calibrated`; truthy only when every output passed.

    ``unverified_reason`` is set (and ``passed`` False) when the reference could not be run: the
    fold is then *unverified*, not different. ``message`` is set when the candidate could not be
    compared (does not load or run, or its interface differs).
    """

    passed: bool
    outputs: tuple[CalibratedOutput, ...] = ()
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    samples: int = 1
    seed: int = 0
    unverified_reason: str | None = None
    message: str | None = None
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.passed

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"`` or ``"unverified"``."""
        if self.unverified_reason is not None:
            return "unverified"
        return "passed" if self.passed else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "passed": self.passed,
            "unverified_reason": self.unverified_reason,
            "message": self.message,
            "seed": self.seed,
            "samples": self.samples,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "seconds": self.seconds,
            "outputs": [o.to_dict() for o in self.outputs],
        }


# --- the perturbed reference -----------------------------------------------------------------------


#: probability that a parameter is moved by one ulp (then up or down with equal chance)
NUDGE_PROBABILITY = 0.25


def _nudge(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each element moved one ulp up or down with probability ``NUDGE_PROBABILITY`` (RMS 0.5 ulp,
    against the 0.29 ulp of a rounding); zeros and non-finite values are kept."""
    moving = rng.random(array.shape) < NUDGE_PROBABILITY
    up = rng.random(array.shape) < 0.5
    keep = ~moving | ~np.isfinite(array.astype(np.float64)) | (array == 0)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):  # no nextafter: step the raw bits
        bits = array.view(np.uint16).astype(np.int32)
        away = up == (array.astype(np.float32) > 0)  # moving away from zero adds one to the bits
        moved = np.where(away, bits + 1, bits - 1).astype(np.uint16).view(array.dtype)
    else:
        moved = np.nextafter(array, np.where(up, np.inf, -np.inf).astype(array.dtype))
    return np.where(keep, array, moved).astype(array.dtype)


_FLOAT_DTYPES = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)
)


def perturb_parameters(model: ir.Model, seed: int = 0) -> int:
    """Nudge the floating-point parameters of ``model``'s main graph (see ``_nudge``), in place.

    Only initializers and Constant-node values read by the ops in ``_PERTURBED_OPS`` at the listed
    positions are touched (never shapes, indices, Resize scales...). Returns how many tensors
    were changed.
    """
    rng = np.random.default_rng(seed)
    targets: dict[str, ir.Value] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        for position in _PERTURBED_OPS.get(node.op_type, ()):
            if position < len(node.inputs) and node.inputs[position] is not None:
                value = node.inputs[position]
                targets.setdefault(value.name or f"#{id(value)}", value)
    changed = 0
    for key in sorted(targets):
        value = targets[key]
        producer = value.producer()
        if value.is_initializer() and value.const_value is not None:
            array = value.const_value.numpy()
            if array.dtype in _FLOAT_DTYPES:
                value.const_value = ir.Tensor(_nudge(np.array(array), rng), name=value.name)
                changed += 1
        elif (
            producer is not None
            and producer.op_type == "Constant"
            and producer.domain in ("", "ai.onnx")
            and "value" in producer.attributes
        ):
            tensor = producer.attributes["value"].as_tensor()
            array = tensor.numpy()
            if array.dtype in _FLOAT_DTYPES:
                producer.attributes["value"] = ir.AttrTensor(
                    "value", ir.Tensor(_nudge(np.array(array), rng), name=tensor.name)
                )
                changed += 1
    return changed


def _load_ir(source: str | bytes) -> ir.Model:
    from bnfold import io

    if isinstance(source, bytes):
        return io.from_bytes(source)
    return io.load(source)


def _perturbed_source(source: str | bytes, seed: int) -> bytes | None:
    """The serialized reference with parameters nudged, or None when it has none to nudge."""
    from bnfold import io

    model = _load_ir(source)
    if perturb_parameters(model, seed) == 0:
        return None
    return io.to_proto(model).SerializeToString()


# --- judging ---------------------------------------------------------------------------------------


class _Stats:
    """Running maxima for one output over samples."""

    def __init__(self) -> None:
        self.error = 0.0
        self.scale = 0.0
        self.noise: dict[str, float] = {}
        self.mismatch = 0
        self.tolerance_failures = 0
        self.message: str | None = None

    @staticmethod
    def _max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
        a64 = np.asarray(a).astype(np.float64)
        b64 = np.asarray(b).astype(np.float64)
        both = np.isfinite(a64) & np.isfinite(b64)
        same_special = (np.isnan(a64) & np.isnan(b64)) | (
            np.isinf(a64) & np.isinf(b64) & (np.sign(a64) == np.sign(b64))
        )
        mismatch = int(np.count_nonzero(~both & ~same_special))
        diff = float(np.max(np.abs(a64[both] - b64[both]))) if both.any() else 0.0
        return diff, mismatch


def _judge_tolerance(ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> int:
    r = np.asarray(ref).astype(np.float64)
    c = np.asarray(cand).astype(np.float64)
    ok = np.isclose(c, r, atol=atol, rtol=rtol, equal_nan=True)
    return int(np.count_nonzero(~ok))


def _model_source(model: Any) -> str | bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if isinstance(model, ir.Model):
        from bnfold import io

        return io.to_proto(model).SerializeToString()
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    raise TypeError(f"model must be a path, bytes or a model, got {type(model).__name__}")


def _run_all(
    source: str | bytes, level: str, batches: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    session = _ort.make_session(source, level=level)
    try:
        return [_ort.run(session, feeds) for feeds in batches]
    finally:
        del session
        gc.collect()


class _Early(Exception):
    """A phase ends the check early: ``fields`` are the :class:`CalibratedResult` it ends with."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(fields.get("unverified_reason") or fields.get("message"))
        self.fields = fields


def _check_arguments(
    samples: Any,
    factor: Any,
    atol: float | None,
    rtol: float | None,
    output_tolerances: Mapping[str, tuple[float, float]] | None,
) -> tuple[float | None, float | None, dict[str, tuple[float, float]]]:
    """Validate the arguments; return ``atol``, ``rtol`` and the per-output tolerances, checked."""
    from bnfold.compare import check_tolerance

    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise UsageError(f"samples must be an integer >= 1, got {samples!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
        raise UsageError(f"calibration factor must be a finite number >= 1, got {factor!r}")
    atol = None if atol is None else check_tolerance(atol, "atol")
    rtol = None if rtol is None else check_tolerance(rtol, "rtol")
    per_output = {
        name: (check_tolerance(a, f"atol of {name!r}"), check_tolerance(r, f"rtol of {name!r}"))
        for name, (a, r) in (output_tolerances or {}).items()
    }
    return atol, rtol, per_output


def _input_batches(
    session: Any,
    feeds: Sequence[Mapping[str, np.ndarray]] | None,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    seed: int,
    samples: int,
) -> list[dict[str, np.ndarray]]:
    """The input batches: ``feeds`` as given, else ``samples`` generated ones (seed ``seed + k``)."""
    from bnfold.compare import make_inputs

    if feeds is not None:
        batches = [dict(b) for b in feeds]
        if not batches:
            raise UsageError("no input data given")
        return batches
    return [
        make_inputs(session.get_inputs(), input_shapes=input_shapes, seed=seed + k)
        for k in range(int(samples))
    ]


def _shapes_of(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, list[int]]:
    return {name: [int(d) for d in np.shape(v)] for name, v in batches[0].items()}


def _run_reference(
    ref_source: str | bytes,
    per_output: Mapping[str, tuple[float, float]],
    feeds: Sequence[Mapping[str, np.ndarray]] | None,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    seed: int,
    samples: int,
) -> tuple[list[tuple[str, Any]], list[dict[str, np.ndarray]], list[list[np.ndarray]]]:
    """Run the reference with ORT's optimizations disabled on the input batches.

    Returns the reference's ``(name, ORT type)`` outputs, the batches and its results. Raises
    :class:`_Early` (unverified) when ORT cannot load or run it, UsageError for a tolerance given
    for a name that is not an output.
    """
    try:
        session = _ort.make_session(ref_source, level="disable")
    except InvalidModelError as error:
        raise _Early(
            unverified_reason=f"ONNX Runtime cannot run the reference model: "
            f"{_ort.error_reason(error)}"
        ) from error
    outputs = [(o.name, o.type) for o in session.get_outputs()]
    unknown = [n for n in per_output if n not in {name for name, _ in outputs}]
    if unknown:
        raise UsageError(
            f"tolerance given for {', '.join(map(repr, unknown))}, which is not an output of the "
            f"model; its outputs are: {', '.join(repr(n) for n, _ in outputs)}"
        )
    batches = _input_batches(session, feeds, input_shapes, seed, samples)
    try:
        try:
            references = [_ort.run(session, b) for b in batches]
        finally:
            del session
            gc.collect()
    except _ort.OrtRunError as error:
        raise _Early(
            input_shapes=_shapes_of(batches),
            samples=len(batches),
            unverified_reason=f"ONNX Runtime cannot run the reference model: "
            f"{_ort.error_reason(error)}",
        ) from error
    return outputs, batches, references


def _noise_runs(
    ref_source: str | bytes, batches: Sequence[Mapping[str, np.ndarray]], seed: int
) -> dict[str, list[list[np.ndarray]]]:
    """The noise: the reference at ORT's basic level, and with its parameters nudged by one ulp.

    A run ORT cannot make is left out (logged), not an error.
    """
    noise_runs: dict[str, list[list[np.ndarray]]] = {}
    try:
        noise_runs["ort_basic"] = _run_all(ref_source, "basic", batches)
    except (InvalidModelError, _ort.OrtRunError) as error:
        logger.info("no ORT-basic noise run: %s", _ort.error_reason(error))
    try:
        perturbed = _perturbed_source(ref_source, seed)
        if perturbed is not None:
            noise_runs["weight_ulp"] = _run_all(perturbed, "disable", batches)
    except (InvalidModelError, _ort.OrtRunError) as error:
        logger.info("no perturbed noise run: %s", _ort.error_reason(error))
    return noise_runs


def _run_candidate(
    cand_source: str | bytes, batches: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """Run the candidate with ORT's optimizations disabled; :class:`_Early` (failed) if it cannot."""
    try:
        return _run_all(cand_source, "disable", batches)
    except (InvalidModelError, _ort.OrtRunError) as error:
        raise _Early(
            message=f"ONNX Runtime cannot run the candidate model: {_ort.error_reason(error)}"
        ) from error


@dataclass(frozen=True)
class _Judging:
    """What every output is judged with: the runs, the user's tolerances and the factor."""

    references: list[list[np.ndarray]]
    candidates: list[list[np.ndarray]]
    noise_runs: dict[str, list[list[np.ndarray]]]
    per_output: Mapping[str, tuple[float, float]]
    atol: float | None
    rtol: float | None
    factor: float

    def tolerance(self, name: str, dtype: np.dtype) -> tuple[float, float] | None:
        """The user's (atol, rtol) for output ``name``, or None when it is to be calibrated."""
        from bnfold.compare import default_tolerances

        tolerance: tuple[float, float] | None = self.per_output.get(name)
        if tolerance is None and (self.atol is not None or self.rtol is not None):
            d_atol, d_rtol = default_tolerances(dtype)
            tolerance = (
                d_atol if self.atol is None else self.atol,
                d_rtol if self.rtol is None else self.rtol,
            )
        return tolerance


def _measure(
    judging: _Judging, index: int, tolerance: tuple[float, float] | None, is_float: bool
) -> _Stats:
    """Error, scale, noise and tolerance failures of output ``index``, over all samples."""
    stats = _Stats()
    for k, ref_outs in enumerate(judging.references):
        ref, cand = ref_outs[index], judging.candidates[k][index]
        if np.shape(ref) != np.shape(cand):
            stats.message = f"shape {list(np.shape(cand))}, expected {list(np.shape(ref))}"
            continue
        diff, mismatch = _Stats._max_diff(ref, cand)
        stats.error = max(stats.error, diff)
        stats.mismatch += mismatch
        finite = np.asarray(ref).astype(np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size:
            stats.scale = max(stats.scale, float(np.max(np.abs(finite))))
        for source, runs in judging.noise_runs.items():
            if np.shape(runs[k][index]) == np.shape(ref):
                n, _ = _Stats._max_diff(ref, runs[k][index])
                stats.noise[source] = max(stats.noise.get(source, 0.0), n)
        if tolerance is not None and is_float:
            stats.tolerance_failures += _judge_tolerance(ref, cand, *tolerance)
    return stats


def _judge_output(judging: _Judging, index: int, name: str, type_: Any) -> CalibratedOutput:
    """Judge one output: exactly (integer/bool), by the user's tolerance, or against the noise."""
    try:
        dtype = _ort.ort_type_to_numpy(type_)
    except ValueError as error:
        raise _Early(unverified_reason=f"cannot compare output {name!r} of type {type_}") from error
    is_float = (
        dtype.kind == "f" or dtype in (np.dtype(ml_dtypes.bfloat16),) or ("float" in str(dtype))
    )
    tolerance = judging.tolerance(name, dtype)
    stats = _measure(judging, index, tolerance, is_float)
    noise = max(stats.noise.values(), default=0.0)
    sources = dict(stats.noise)
    if not is_float:
        mode, threshold = "exact", 0.0
        passed = stats.error == 0 and stats.mismatch == 0
    elif tolerance is not None:
        mode = "tolerance"
        threshold = tolerance[0] + tolerance[1] * stats.scale
        passed = stats.tolerance_failures == 0
    else:
        mode = "calibrated"
        floor = FLOOR_ULPS * _unit_roundoff(dtype) * stats.scale
        sources["dtype_floor"] = floor
        threshold = judging.factor * noise + floor
        passed = stats.error <= threshold and stats.mismatch == 0
    if stats.message is not None:
        passed = False
    logger.debug(
        "output %r: %s, error %.3g, noise %.3g, threshold %.3g",
        name,
        "passed" if passed else "FAILED",
        stats.error,
        noise,
        threshold,
    )
    return CalibratedOutput(
        name=name,
        mode=mode,
        passed=passed,
        error=stats.error,
        noise=noise,
        threshold=threshold,
        scale=stats.scale,
        margin=math.inf if stats.error == 0 else threshold / stats.error,
        noise_sources=sources,
        atol=None if tolerance is None else tolerance[0],
        rtol=None if tolerance is None else tolerance[1],
        nan_or_inf_mismatch=stats.mismatch,
        message=stats.message,
    )


def verify_calibrated(
    reference: Any,
    candidate: Any,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    samples: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    output_tolerances: Mapping[str, tuple[float, float]] | None = None,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    factor: float = FACTOR,
) -> CalibratedResult:
    """Check that ``candidate`` computes what ``reference`` computes, within the reference's noise.

    ``reference``/``candidate``: a path, serialized bytes, an ``onnx_ir.Model`` or anything with
    ``SerializeToString``. Inputs are :func:`bnfold.compare.make_inputs` batches (seed ``seed + k``)
    unless ``feeds`` gives them. See the module docstring for the verdict and how ``atol``, ``rtol``
    and ``output_tolerances`` combine with calibration. Never raises for a model ORT cannot run: the
    result is then unverified (reference) or failed with ``message`` (candidate).
    """
    started = time.perf_counter()
    atol, rtol, per_output = _check_arguments(samples, factor, atol, rtol, output_tolerances)
    ref_source = _model_source(reference)
    cand_source = _model_source(candidate)

    def done(**kwargs: Any) -> CalibratedResult:
        kwargs.setdefault("passed", False)
        return CalibratedResult(seed=seed, seconds=time.perf_counter() - started, **kwargs)

    try:
        outputs, batches, references = _run_reference(
            ref_source, per_output, feeds, input_shapes, seed, samples
        )
    except _Early as early:
        return done(**early.fields)
    shapes = _shapes_of(batches)
    try:
        noise_runs = _noise_runs(ref_source, batches, seed)
        candidates = _run_candidate(cand_source, batches)
        judging = _Judging(references, candidates, noise_runs, per_output, atol, rtol, factor)
        results = [
            _judge_output(judging, index, name, type_)
            for index, (name, type_) in enumerate(outputs)
        ]
    except _Early as early:
        return done(input_shapes=shapes, samples=len(batches), **early.fields)
    return done(
        passed=all(r.passed for r in results),
        outputs=tuple(results),
        input_shapes=shapes,
        samples=len(batches),
    )
