"""Inputs for running models: parsing ``--input-shape`` and ``--data``, and seeded random inputs
built from a session's declared inputs (shared by verification, the benchmark and the localizer)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from bnfold import _ort
from bnfold._text import first_line as _first_line
from bnfold._text import format_shape as _format_shape
from bnfold._text import is_fixed as _is_fixed
from bnfold.errors import InputNotFoundError, UsageError

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
        raise UsageError(f"{path}: not a .npy array ({_first_line(exc)})") from None


def _load_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path}: not a .npz archive ({_first_line(exc)})") from None


#: where an input's shape came from: the user (``--input-shape`` or ``--data``), the model (every
#: dim fixed), or derived so that every weight is exercised (:mod:`bnfold.exercise`)
SHAPE_ORIGINS = ("given", "fixed", "derived")


def exercising_shapes(
    model: Any, given: Mapping[str, tuple[int, ...]] | None
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Full shapes for the inputs of ``model`` (a path, serialized bytes or an ``onnx_ir.Model``)
    that exercise every weight, and where each came from (``SHAPE_ORIGINS``).

    Shapes in ``given`` are used as given; the others come from
    :func:`bnfold.exercise.derive_input_shapes` (the batch dim 1, other symbolic dims sized from
    what the graph constrains). Raises :class:`~bnfold.exercise.InputShapeError` (exit 2, asking
    for ``--input-shape``) when no sensible size exists. A model that cannot be read as ONNX, or
    whose inputs have no declared rank, keeps the given shapes only (``make_inputs`` then uses 1
    for dynamic dims, as ORT reports them); that case is logged.
    """
    import logging

    from bnfold import io
    from bnfold.errors import BnfoldError
    from bnfold.exercise import InputShapeError, derive_input_shapes

    log = logging.getLogger("bnfold.compare")
    given = {str(k): tuple(int(d) for d in v) for k, v in (given or {}).items()}
    try:
        if isinstance(model, (bytes, bytearray, memoryview)):
            ir_model = io.from_bytes(bytes(model))
        elif isinstance(model, (str, os.PathLike)):
            ir_model = io.load(os.fspath(model))
        else:
            ir_model = model
        graph_inputs = [v for v in ir_model.graph.inputs if not v.is_initializer()]
    except (BnfoldError, OSError, ValueError) as error:
        log.info("input shapes not derived (%s)", _first_line(error))
        return given, {name: "given" for name in given}
    if any(v.shape is None and (v.name or "") not in given for v in graph_inputs):
        log.info("input shapes not derived: an input has no declared rank")
        return given, {name: "given" for name in given}
    try:
        shapes = derive_input_shapes(ir_model, given)
    except InputShapeError:
        raise
    except Exception as error:  # noqa: BLE001 - a graph the walk does not know: say so, go on
        log.warning("input shapes not derived (%s); dynamic dims are 1", _first_line(error))
        return given, {name: "given" for name in given}
    origins: dict[str, str] = {}
    for value in graph_inputs:
        name = value.name or ""
        if name in given:
            origins[name] = "given"
        elif all(isinstance(d, int) for d in value.shape or ()):
            origins[name] = "fixed"
        else:
            origins[name] = "derived"
    return {**given, **shapes}, origins  # a given name the model lacks: make_inputs says so
