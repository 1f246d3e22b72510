"""Sessions and inputs of a benchmark: model sources and labels, the runtime warm-up, the shared
inputs every model must accept, and ONNX Runtime's errors turned into one-line messages."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnfold import _ort
from bnfold._text import format_shape as _format_shape
from bnfold._text import is_fixed as _is_fixed
from bnfold.errors import BnfoldError, InputNotFoundError, InvalidModelError, UsageError
from bnfold.render.text import inert

logger = logging.getLogger("bnfold.latency")


def _source(model: Any, index: int) -> tuple[str | bytes, str]:
    """ORT source (path or bytes) and a default label for one model argument."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), f"model {index + 1}"
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise InputNotFoundError(f"model not found: {path}")
        return path, path
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        return model.SerializeToString(), f"model {index + 1}"
    try:
        import onnx_ir as ir
    except ImportError:  # pragma: no cover - onnx_ir is a dependency
        ir = None
    if ir is not None and isinstance(model, ir.Model):
        return ir.to_proto(model).SerializeToString(), f"model {index + 1}"
    raise TypeError(
        f"a model must be a path, bytes, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}"
    )


def _labels(
    sources: Sequence[str | bytes], given: Sequence[str] | None, defaults: Sequence[str]
) -> list[str]:
    if given is not None:
        labels = [str(label) for label in given]
        if len(labels) != len(sources):
            raise UsageError(f"{len(labels)} labels given for {len(sources)} models")
        if len(set(labels)) != len(labels):
            raise UsageError("model labels must be unique")
        return labels
    # File names where they are unique; the path where two different files share a name; "#k"
    # after the name for the same file given twice.
    names = [
        os.path.basename(d) if isinstance(src, str) else d
        for src, d in zip(sources, defaults, strict=True)
    ]
    labels = []
    for name, default in zip(names, defaults, strict=True):
        same_name = {d for n, d in zip(names, defaults, strict=True) if n == name}
        labels.append(name if len(same_name) == 1 else default)
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


@functools.lru_cache(maxsize=1)
def _warm_up_model() -> bytes:
    """A tiny Conv+BatchNormalization+Relu model (built with onnx_ir: this module must not import onnx)."""
    import onnx_ir as ir

    text = """<ir_version: 8, opset_import: ["" : 17]>
    warmup (float[1, 1, 2, 2] x) => (float[1, 1, 2, 2] y)
    <float[1, 1, 1, 1] w = {1.0}, float[1] s = {1.0}, float[1] b = {0.0}, float[1] m = {0.0},
     float[1] v = {1.0}>
    { c = Conv(x, w)  n = BatchNormalization(c, s, b, m, v)  y = Relu(n) }"""
    return ir.to_proto(ir.from_onnx_text(text)).SerializeToString()


def _warm_up_runtime(providers: list[str], threads: int | None) -> None:
    """Pay ONNX Runtime's one-time set-up (and a GPU's context) before anything is timed."""
    try:
        session = _ort.make_session(
            _warm_up_model(), level="disable", intra_op_threads=threads, providers=providers
        )
        _ort.run(session, {"x": np.ones((1, 1, 2, 2), np.float32)})
    except Exception as exc:  # the real models will say what is wrong, with their names
        logger.debug("ONNX Runtime warm-up failed: %s", inert(exc))


def _shapes_with_batch(
    session_inputs: Sequence[Any],
    input_shapes: Mapping[str, tuple[int, ...]],
    batch_size: int | None,
) -> dict[str, tuple[int, ...]]:
    """``input_shapes`` plus, for each input whose first dimension is dynamic, ``batch_size`` there
    (its other dimensions fixed or 1)."""
    shapes = dict(input_shapes)
    if batch_size is None:
        return shapes
    batched = []
    for spec in session_inputs:
        dims = list(spec.shape or ())
        if not dims or _is_fixed(dims[0]):
            continue
        batched.append(spec.name)
        if spec.name in shapes:
            if shapes[spec.name][:1] != (batch_size,):
                raise UsageError(
                    f"batch size {batch_size} contradicts the input shape given for "
                    f"{spec.name!r}: {_format_shape(shapes[spec.name])}"
                )
            continue
        shapes[spec.name] = (batch_size, *(int(d) if _is_fixed(d) else 1 for d in dims[1:]))
    if not batched:
        described = ", ".join(f"{s.name} {_format_shape(s.shape or ())}" for s in session_inputs)
        raise UsageError(
            f"batch size {batch_size} given, but no input has a dynamic first dimension "
            f"(inputs: {described or 'none'}); use input shapes instead"
        )
    return shapes


def _check_inputs(label: str, baseline: str, session: Any, feeds: Mapping[str, np.ndarray]) -> None:
    """Every model must accept the baseline's inputs: same names and types, compatible shapes."""
    have = {i.name: i for i in session.get_inputs()}
    if set(have) != set(feeds):
        raise UsageError(
            f"{label} has inputs ({', '.join(have) or 'none'}) but {baseline} has "
            f"({', '.join(feeds) or 'none'}); bench feeds every model the same inputs"
        )
    for name, value in feeds.items():
        spec = have[name]
        try:
            dtype = _ort.ort_type_to_numpy(spec.type)
        except ValueError:
            dtype = None
        if dtype != value.dtype:
            raise UsageError(
                f"input {name!r} of {label} is {spec.type} but {baseline}'s is {value.dtype}"
            )
        dims = list(spec.shape or ())
        if not dims:  # a scalar or unknown rank: ORT reports both as []
            continue
        if len(dims) != value.ndim or any(
            _is_fixed(d) and int(d) != n for d, n in zip(dims, value.shape, strict=True)
        ):
            raise UsageError(
                f"input {name!r} of {label} has shape {_format_shape(dims)}, which does not accept "
                f"the inputs built from {baseline}: {_format_shape(value.shape)}"
            )


def _open_session(
    source: str | bytes, label: str, level: str, providers: list[str], threads: int | None
) -> tuple[Any, float]:
    """A session of ``source`` and the milliseconds its creation took."""
    t0 = time.perf_counter_ns()
    try:
        session = _ort.make_session(
            source, level=level, intra_op_threads=threads, providers=providers
        )
    except InvalidModelError as exc:
        raise InvalidModelError(f"{label}: {exc}") from exc
    elapsed_ms = (time.perf_counter_ns() - t0) / 1e6
    used = session.get_providers()
    if used[:1] != providers[:1]:
        raise UsageError(
            f"ONNX Runtime could not use {providers[0]} for {label} (it fell back to "
            f"{', '.join(used)}); check the GPU driver and the CUDA/cuDNN/TensorRT libraries"
        )
    return session, elapsed_ms


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _run_error(
    label: str, level: str, feeds: Mapping[str, np.ndarray] | None, error: Exception
) -> BnfoldError:
    text = str(error).removeprefix("ONNX Runtime failed to run the model: ")
    shapes = ", ".join(f"{k}={','.join(map(str, v.shape))}" for k, v in (feeds or {}).items())
    return BnfoldError(
        f"ONNX Runtime cannot run {label} (level {level!r}) on inputs {shapes or 'none'}: {text}; "
        "if it needs other shapes, give input shapes or a batch size"
    )
