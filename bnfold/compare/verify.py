"""Comparing two models: run the reference, then the candidate, on the same inputs, output by
output (see :mod:`bnfold.compare` for how a check runs and what "equal" means)."""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bnfold import _ort
from bnfold._text import is_fixed as _is_fixed
from bnfold.calibrate import FACTOR, FLOOR_ULPS, _perturbed_source, _Stats, _unit_roundoff
from bnfold.errors import InputNotFoundError, InvalidModelError, UsageError, VerificationTimeout
from bnfold.render.text import inert

from .inputs import _InputSpec, _is_float, exercising_shapes, make_inputs
from .statistics import OutputComparison, _Accumulator, check_tolerance, default_tolerances

logger = logging.getLogger("bnfold.compare")


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
    input_shape_origins: dict[str, str] = field(default_factory=dict)
    #: Set (with ``passed`` True) when the candidate is the reference unchanged, so there is
    #: nothing to compare: why (e.g. no BatchNormalization was found). Not a skipped check.
    unchanged: str | None = None

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        from bnfold.render import summary

        return summary.one_line("VerificationResult", summary.verification(self))

    def _repr_markdown_(self) -> str:
        from bnfold.render.markdown import verification_markdown

        return verification_markdown(self, "reference", "candidate")

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"`` or ``"unverified"`` (the check could not run: the reference
        does not run under ONNX Runtime, or the time budget ran out). Unverified is not a pass."""
        if self.skipped_reason is not None:
            return "unverified"
        return "passed" if self.passed else "failed"

    @property
    def unverified_reason(self) -> str | None:
        """Why the check could not run (the same text as ``skipped_reason``)."""
        return self.skipped_reason

    def shapes_line(self) -> str:
        """``x=[1,3,17,17] (derived), y=[4] (given)``: the input shapes used, for people."""
        return ", ".join(
            f"{name}=[{','.join(map(str, shape))}]"
            + (f" ({self.input_shape_origins[name]})" if name in self.input_shape_origins else "")
            for name, shape in self.input_shapes.items()
        )

    @property
    def failed_outputs(self) -> tuple[OutputComparison, ...]:
        return tuple(o for o in self.outputs if not o.passed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (see :meth:`OutputComparison.to_dict`)."""
        return {
            "status": self.status,
            "passed": self.passed,
            "unverified_reason": self.skipped_reason,
            "skipped_reason": self.skipped_reason,
            "message": self.message,
            "unchanged": self.unchanged,
            "seed": self.seed,
            "samples": self.samples,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "input_shape_origins": dict(self.input_shape_origins),
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
    timeout: float | str | None = None,
) -> VerificationResult:
    """Check that ``candidate`` computes what ``reference`` computes, under ONNX Runtime CPU.

    Args:
        reference, candidate: a path (ORT loads external data next to it) or the bytes of a
            serialized ``ModelProto`` (a ``ModelProto`` itself is accepted and serialized).
        input_shapes: full shapes for inputs with dynamic dimensions; inputs not given get shapes
            that exercise every weight (:func:`bnfold.exercise.derive_input_shapes`).
        seed: seed of the first batch; batch ``k`` uses ``seed + k``.
        atol, rtol: judge every output element-wise with these (the one not given takes the
            dtype default) instead of the calibrated default (:mod:`bnfold.calibrate`).
        output_tolerances: ``{output_name: (atol, rtol)}``, overrides everything for that output.
        samples: number of seeded batches; statistics are aggregated over all of them.
        distribution, value_range: how random inputs are drawn (see :func:`make_inputs`).
        data: user batches, ``[{input_name: array}, ...]``; each is one sample (``samples`` is then
            ``len(data)``); inputs a batch leaves out get seeded random values.
        timeout: the time budget in seconds (``--verify-timeout``; ``None``: ``$BNFOLD_VERIFY_TIMEOUT``
            or the default); past it the result is unverified.

    Returns a :class:`VerificationResult` whose ``status`` is ``"passed"``, ``"failed"`` or
    ``"unverified"`` (the reference cannot run, or the budget ran out: ``skipped_reason``); it does
    not raise when a model cannot be run. Raises :class:`UsageError` for bad arguments (unknown
    input or output names, shapes that contradict the model, negative tolerances, ``samples < 1``),
    :class:`~bnfold.exercise.InputShapeError` when no input size exercises the model (give
    ``input_shapes``) and :class:`InputNotFoundError` for a path that does not exist. Ctrl-C or a
    signal under :func:`bnfold._ort.cancel_on_signals` ends it at once (``KeyboardInterrupt``).
    """
    check = _Check(seed=seed, samples=_check_samples(samples), started=time.perf_counter())
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
    budget = _ort.resolve_verify_timeout(timeout)
    settings = _Settings(per_output, atol, rtol, input_shapes, distribution, value_range, data)
    with _ort.time_budget(math.inf if budget is None else budget):
        try:
            return _verify(check, reference_source, candidate_source, settings)
        except VerificationTimeout as error:
            return check.result(skipped_reason=str(error))


@dataclass(frozen=True)
class _Settings:
    """What the caller asked of one verification (validated)."""

    per_output: Mapping[str, tuple[float, float]]
    atol: float | None
    rtol: float | None
    input_shapes: Mapping[str, tuple[int, ...]] | None
    distribution: str
    value_range: tuple[float, float] | None
    data: Sequence[Mapping[str, np.ndarray]] | None


def _verify(
    check: _Check, reference_source: str | bytes, candidate_source: str | bytes, s: _Settings
) -> VerificationResult:
    # 1. The reference: run every batch, keep the outputs, drop the session.
    try:
        session = _ort.make_session(reference_source, level="disable")
    except InvalidModelError as error:
        return check.result(
            skipped_reason=f"ONNX Runtime cannot run the reference model: {_ort.error_reason(error)}"
        )
    inputs = [_InputSpec(i.name, i.type, tuple(i.shape or ())) for i in session.get_inputs()]
    outputs = [(o.name, o.type) for o in session.get_outputs()]
    unsupported = _unsupported_interface(inputs, outputs, s.per_output)
    if unsupported:
        return check.result(skipped_reason=unsupported)
    if s.data is not None:
        check.samples = _check_data(s.data, inputs)
    shapes = _exercising(reference_source, inputs, s, check)
    feeds_for = _Feeds(inputs, s.data, shapes, check.seed, s.distribution, s.value_range)
    try:
        references = _run_reference(check, session, feeds_for)
    finally:
        del session
        gc.collect()
    if isinstance(references, VerificationResult):
        return references
    calibrated = _yardsticks(outputs, references, s)
    noise = _noise_floor(reference_source, feeds_for, check.samples, references)

    # 2. The candidate: same interface, then compare batch by batch.
    try:
        session = _ort.make_session(candidate_source, level="disable")
    except InvalidModelError as error:
        return check.result(
            message=f"ONNX Runtime cannot run the candidate model: {_ort.error_reason(error)}"
        )
    try:
        message = _interface_mismatch(
            inputs, outputs, session.get_inputs(), [(o.name, o.type) for o in session.get_outputs()]
        )
        if message:
            return check.result(message=message)
        accumulators = [
            _Accumulator(name, *calibrated[i](noise[i])) for i, (name, _) in enumerate(outputs)
        ]
        failed = _compare_candidate(check, session, feeds_for, references, accumulators)
        if failed is not None:
            return failed
    finally:
        del session
    comparisons = tuple(
        replace(
            a.finish(),
            mode=calibrated[i].mode,
            noise=max(noise[i].values(), default=0.0),
            noise_sources=dict(noise[i]) | calibrated[i].sources(noise[i]),
        )
        for i, a in enumerate(accumulators)
    )
    return check.result(passed=all(c.passed for c in comparisons), outputs=comparisons)


def _exercising(
    reference_source: str | bytes, inputs: Sequence[_InputSpec], s: _Settings, check: _Check
) -> dict[str, tuple[int, ...]]:
    """Full shapes for every input: given (``input_shapes``, the first ``data`` batch), fixed by
    the model, or derived so that every weight is exercised; records where each came from."""
    given = dict(s.input_shapes or {})
    if s.data is not None:
        given.update({name: tuple(np.shape(v)) for name, v in s.data[0].items()})
    dynamic = [
        spec for spec in inputs if spec.name not in given and not all(map(_is_fixed, spec.shape))
    ]
    if dynamic:
        shapes, origins = exercising_shapes(reference_source, given)
    else:
        shapes, origins = given, {name: "given" for name in given}
    for spec in inputs:  # "default": dynamic dims left at 1 (the graph could not be walked)
        fixed = all(map(_is_fixed, spec.shape))
        origins.setdefault(
            spec.name, "given" if spec.name in given else "fixed" if fixed else "default"
        )
    check.origins = {spec.name: origins[spec.name] for spec in inputs}
    return shapes


class _Yardstick:
    """How one output is judged: the user's tolerance, exactly, or a threshold calibrated on the
    measured noise (``atol`` = ``FACTOR x noise + FLOOR_ULPS x u x max|ref|``, ``rtol`` 0)."""

    def __init__(self, mode: str, tolerance: tuple[float, float], floor: float = 0.0) -> None:
        self.mode, self.tolerance, self.floor = mode, tolerance, floor

    def __call__(self, noise: Mapping[str, float]) -> tuple[float, float]:
        if self.mode != "calibrated":
            return self.tolerance
        return FACTOR * max(noise.values(), default=0.0) + self.floor, 0.0

    def sources(self, noise: Mapping[str, float]) -> dict[str, float]:
        return {"dtype_floor": self.floor} if self.mode == "calibrated" else {}


def _yardsticks(
    outputs: Sequence[tuple[str, str]], references: list[list[np.ndarray]], s: _Settings
) -> list[_Yardstick]:
    sticks = []
    for index, (name, type_) in enumerate(outputs):
        dtype = _ort.ort_type_to_numpy(type_)
        if name in s.per_output or s.atol is not None or s.rtol is not None:
            sticks.append(
                _Yardstick("tolerance", _tolerances(name, type_, s.per_output, s.atol, s.rtol))
            )
        elif not _is_float(dtype) or dtype.kind == "c":
            sticks.append(
                _Yardstick("exact" if dtype.kind != "c" else "tolerance", default_tolerances(dtype))
            )
        else:
            scale = max((_max_abs(batch[index]) for batch in references), default=0.0)
            sticks.append(
                _Yardstick("calibrated", (0.0, 0.0), FLOOR_ULPS * _unit_roundoff(dtype) * scale)
            )
    return sticks


def _max_abs(array: np.ndarray) -> float:
    values = np.asarray(array).astype(np.float64).ravel()
    values = values[np.isfinite(values)]
    return float(np.max(np.abs(values))) if values.size else 0.0


def _noise_floor(
    reference_source: str | bytes,
    feeds_for: _Feeds,
    samples: int,
    references: list[list[np.ndarray]],
) -> list[dict[str, float]]:
    """Per output, the reference's own noise on the same inputs: ``ort_basic`` (ORT's Conv+BN
    fusion and constant folding) and ``weight_ulp`` (parameters nudged by one ulp); see
    :mod:`bnfold.calibrate`. A noise run that cannot be made is logged and left out."""
    noise: list[dict[str, float]] = [{} for _ in references[0]] if references else []
    runs: list[tuple[str, Any]] = [("ort_basic", lambda: (reference_source, "basic"))]

    def perturbed() -> tuple[bytes, str] | None:
        source = _perturbed_source(reference_source, feeds_for.seed)
        return None if source is None else (source, "disable")

    runs.append(("weight_ulp", perturbed))
    for label, make in runs:
        try:
            made = make()
            if made is None:
                continue
            session = _ort.make_session(made[0], level=made[1])
            try:
                for k in range(samples):
                    produced = _ort.run(session, feeds_for(k))
                    for index, (ref, other) in enumerate(zip(references[k], produced, strict=True)):
                        if np.shape(ref) == np.shape(other) and _is_float(np.asarray(ref).dtype):
                            diff, _ = _Stats._max_diff(ref, other)
                            noise[index][label] = max(noise[index].get(label, 0.0), diff)
            finally:
                del session
                gc.collect()
        except VerificationTimeout:
            raise
        except Exception as error:  # noqa: BLE001 - no noise run is a smaller floor, not a crash
            logger.info("no %s noise run: %s", label, _ort.error_reason(error))
    return noise


@dataclass
class _Check:
    """One verification's settings and what it has learnt so far (the input shapes used)."""

    seed: int
    samples: int
    started: float
    input_shapes: dict[str, list[int]] | None = None
    origins: dict[str, str] | None = None

    def result(self, **kwargs: Any) -> VerificationResult:
        kwargs.setdefault("passed", False)
        if self.input_shapes is not None:
            kwargs.setdefault("input_shapes", self.input_shapes)
        if self.origins is not None:
            kwargs.setdefault("input_shape_origins", self.origins)
        outcome = VerificationResult(
            seed=self.seed,
            samples=self.samples,
            seconds=time.perf_counter() - self.started,
            **kwargs,
        )
        _log_outcome(outcome)
        return outcome


def _check_samples(samples: Any) -> int:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise UsageError(f"samples must be an integer >= 1, got {samples!r}")
    return int(samples)


def _unsupported_interface(
    inputs: Sequence[_InputSpec],
    outputs: Sequence[tuple[str, str]],
    per_output: Mapping[str, tuple[float, float]],
) -> str | None:
    """Why the reference's inputs cannot be generated or its outputs compared (the check is then
    skipped); a tolerance for an output the model lacks is a :class:`UsageError`."""
    for spec in inputs:
        try:
            _ort.ort_type_to_numpy(spec.type)
        except ValueError:
            return f"cannot generate values for input {spec.name!r} of type {spec.type}"
    for name, type_ in outputs:
        try:
            _ort.ort_type_to_numpy(type_)
        except ValueError:
            return f"cannot compare output {name!r} of type {type_}"
    unknown = [name for name in per_output if name not in {n for n, _ in outputs}]
    if unknown:
        raise UsageError(
            f"tolerance given for {', '.join(map(repr, unknown))}, which is not an output of the "
            f"model; its outputs are: {', '.join(repr(n) for n, _ in outputs)}"
        )
    return None


def _check_data(data: Sequence[Mapping[str, np.ndarray]], inputs: Sequence[_InputSpec]) -> int:
    """The number of user batches; every name in them must be an input of the model."""
    if len(data) < 1:
        raise UsageError("no input data given")
    names = {spec.name: spec for spec in inputs}
    for batch in data:
        for name in batch:
            if name not in names:
                raise UsageError(
                    f"input data given for {name!r}, which is not an input of the model; its "
                    f"inputs are: {', '.join(repr(n) for n in names) or 'none'}"
                )
    return len(data)


class _Feeds:
    """The inputs of batch ``k``: the user's batch ``k`` (if any), the rest seeded random values
    (seed ``seed + k``)."""

    def __init__(
        self,
        inputs: Sequence[_InputSpec],
        data: Sequence[Mapping[str, np.ndarray]] | None,
        input_shapes: Mapping[str, tuple[int, ...]] | None,
        seed: int,
        distribution: str,
        value_range: tuple[float, float] | None,
    ) -> None:
        self.inputs, self.data, self.input_shapes = inputs, data, input_shapes
        self.seed, self.distribution, self.value_range = seed, distribution, value_range

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        batch = dict(self.data[k]) if self.data is not None else {}
        shapes = dict(self.input_shapes or {})
        shapes.update({name: tuple(np.shape(v)) for name, v in batch.items()})
        feeds = make_inputs(
            self.inputs,
            input_shapes=shapes,
            seed=self.seed + k,
            distribution=self.distribution,
            value_range=self.value_range,
        )
        for name, value in batch.items():
            feeds[name] = np.asarray(value).astype(feeds[name].dtype, copy=False)
        return feeds


def _run_reference(
    check: _Check, session: Any, feeds_for: _Feeds
) -> list[list[np.ndarray]] | VerificationResult:
    """The reference's outputs for every batch, or a skipped result when ONNX Runtime cannot run it. Records the input shapes in ``check``."""
    first = feeds_for(0)
    check.input_shapes = {name: [int(d) for d in value.shape] for name, value in first.items()}
    references: list[list[np.ndarray]] = []
    try:
        for k in range(check.samples):
            feeds = first if k == 0 else feeds_for(k)
            references.append(_ort.run(session, feeds))
    except _ort.OrtRunError as error:
        return check.result(
            skipped_reason=f"ONNX Runtime cannot run the reference model: {_ort.error_reason(error)}",
        )
    logger.debug("ran the reference model on %d batch(es)", check.samples)
    return references


def _tolerances(
    name: str,
    type_: str,
    per_output: Mapping[str, tuple[float, float]],
    atol: float | None,
    rtol: float | None,
) -> tuple[float, float]:
    """``(atol, rtol)`` of one output: its own, else the global override, else the dtype's."""
    default_atol, default_rtol = default_tolerances(_ort.ort_type_to_numpy(type_))
    return per_output.get(
        name, (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    )


def _compare_candidate(
    check: _Check,
    session: Any,
    feeds_for: _Feeds,
    references: list[list[np.ndarray]],
    accumulators: list[_Accumulator],
) -> VerificationResult | None:
    """Run the candidate batch by batch and accumulate the comparison (freeing each reference
    batch as it goes); a failed result when ONNX Runtime cannot run the candidate."""
    for k in range(check.samples):
        try:
            produced = _ort.run(session, feeds_for(k))
        except _ort.OrtRunError as error:
            return check.result(
                message=f"ONNX Runtime cannot run the candidate model: {_ort.error_reason(error)}",
            )
        expected, references[k] = references[k], []  # free as we go
        for accumulator, ref, cand in zip(accumulators, expected, produced, strict=True):
            accumulator.add(ref, cand, sample=k)
    return None


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
        logger.warning("unverified: %s", inert(outcome.skipped_reason))
    elif outcome.message:
        logger.info("verification failed: %s", inert(outcome.message))
    for output in outcome.outputs:
        logger.info(
            "output %s %s: max abs %.3g, max rel %.3g, %d/%d mismatched (atol=%g, rtol=%g)",
            inert(repr(output.name)),
            "passed" if output.passed else "FAILED",
            output.max_abs_error,
            output.max_rel_error,
            output.mismatched,
            output.elements,
            output.atol,
            output.rtol,
        )
