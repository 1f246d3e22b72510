"""PyTorch files: sniff them (``.pt2`` ExportedProgram, TorchScript, ``torch.save`` pickle) without
torch, load them safely (``weights_only`` unless trusted), build example inputs from the shapes the
file records or the user gives, and ``fold_file`` (load, then :func:`bnfold.torch.export`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import InputNotFoundError, InvalidModelError, TrainingModeError, UsageError
from bnfold.options import FoldOptions

from ._common import (
    _first_line,
    _forward_arg_names,
    _graph_runs_bn_in_training,
    _import_torch,
    warnings_to_log,
)
from .onnx_export import export, exported_onnx

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.api import FoldResult

logger = logging.getLogger(__name__)


@dataclass
class TorchSource:
    """A model loaded from a PyTorch file, ready for :func:`export`.

    ``kind`` is ``"exported_program"`` (``torch.export.save``), ``"torchscript"``
    (``torch.jit.save``) or ``"pickled_module"`` (``torch.save(model)``). ``example_inputs`` are
    seeded tensors of the shapes and dtypes the model takes, named ``input_names``.
    ``dynamic_batch`` is False for an exported program whose batch dimension is static.
    """

    module: Any
    example_inputs: tuple
    input_names: list[str]
    kind: str
    path: Path
    dynamic_batch: bool = True


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def is_torch_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PyTorch file (a zip archive or a legacy pickle), by its first bytes.

    ONNX files are protobuf and never start like these. Needs no torch.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4).startswith(_ZIP_MAGIC)


def _archive_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        return "pickle"
    if not head.startswith(_ZIP_MAGIC):
        raise InvalidModelError(
            f"{path}: not a PyTorch file (expected a torch.export .pt2, a TorchScript archive or a "
            "torch.save file)"
        )
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile as exc:
        raise InvalidModelError(f"{path}: damaged archive ({_first_line(exc)})") from None
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if (
        "archive_format" in tails
        or any(t.startswith("models/") for t in tails)
        or any(t.endswith("serialized_exported_program.json") for t in tails)
    ):
        return "exported_program"
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "pickle"
    raise InvalidModelError(f"{path}: a zip archive, but not one PyTorch wrote")


def _state_dict_error(path: Path, what: str) -> InvalidModelError:
    return InvalidModelError(
        f"{path} holds {what}, not a model: it has no architecture, so bnfold cannot rebuild the "
        "network from it. Build the model in Python, load_state_dict() it, call model.eval(), then "
        "use bnfold.torch.fold_module(model) or bnfold.torch.export(model, example_inputs, "
        "'folded.onnx')"
    )


def _describe_loaded(obj: Any) -> str:
    torch = _import_torch()
    if isinstance(obj, Mapping):
        values = list(obj.values())
        if values and all(isinstance(v, torch.Tensor) for v in values):
            return f"a state_dict ({len(values)} tensors)"
        return f"a dict (keys {', '.join(map(repr, list(obj)[:4]))}{' ...' if len(obj) > 4 else ''}; a checkpoint or state_dict)"
    if isinstance(obj, torch.Tensor):
        return "a single tensor"
    return f"a {type(obj).__name__}"


@warnings_to_log
def load_torch_file(
    path: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    trust_pickle: bool = False,
) -> TorchSource:
    """Load a PyTorch model file and build example inputs for it.

    * ``.pt2`` from ``torch.export.save``: loaded with ``torch.export.load``; input names and
      (unless given) shapes come from the exported program.
    * TorchScript (``torch.jit.save``): ``torch.jit.load``; names from ``forward``'s schema, shapes
      must be given.
    * ``torch.save(model)``: read with ``torch.load(weights_only=True)`` first; a pickled module
      needs ``trust_pickle=True`` (``torch.load(weights_only=False)``: unpickling runs code from the
      file) and its class importable; shapes must be given. A state_dict (or checkpoint dict) is
      refused with an error that explains why and points to the Python API.

    Args:
        path: the file.
        input_shapes: ``{input name: shape}``; required for inputs whose shape the file does not
            record. Names must be the model's input names.
        trust_pickle: allow unpickling a whole ``nn.Module``.

    Raises:
        InputNotFoundError, InvalidModelError, UsageError (missing or inconsistent shapes, a
        pickle without ``trust_pickle``), TrainingModeError, TorchUnavailableError.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such file")
    kind = _archive_kind(path)
    # Vet the archive before torch reads anything (zip bombs, pickles; issue 15): torch-free.
    from bnfold.torch import archive, safety

    if kind == "exported_program":
        archive.check_pt2(path, trust_pickle=trust_pickle)
    elif _is_zip(path):
        archive.check_torch_zip(path)
    torch = _import_torch()
    given = {str(k): tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}

    if kind == "exported_program":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise InvalidModelError(
                f"{path}: torch.export.load failed: {_first_line(exc)}"
            ) from None
        safety.check_exported_program(ep, str(path), trust=trust_pickle)
        return _from_exported_program(ep, path, given)

    if kind == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise InvalidModelError(f"{path}: torch.jit.load failed: {_first_line(exc)}") from None
        safety.check_torchscript(module, str(path), trust=trust_pickle)
        names = _forward_arg_names(module, len(module.forward.schema.arguments) - 1)
        dtype = _module_float_dtype(module)
        args = _inputs_from_shapes(
            path, "a TorchScript archive", names, given, {}, {n: dtype for n in names}
        )
        return TorchSource(module, args, names, "torchscript", path)

    obj = _load_pickled(path, trust_pickle)
    if not isinstance(obj, torch.nn.Module):
        raise _state_dict_error(path, _describe_loaded(obj))
    names = _forward_arg_names(obj, _n_required_args(obj))
    dtype = _module_float_dtype(obj)
    args = _inputs_from_shapes(
        path, "a pickled module", names, given, {}, {n: dtype for n in names}
    )
    return TorchSource(obj, args, names, "pickled_module", path)


def _load_pickled(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` a ``torch.save`` file: weights only, unless the user trusts the file."""
    torch = _import_torch()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any class it does not know
        if not _refused_by_weights_only(exc):
            raise InvalidModelError(f"{path}: torch.load failed: {_first_line(exc)}") from None
        if not trust_pickle:
            raise UsageError(
                f"{path} is a pickled Python object (torch.save of a whole model). Loading it runs "
                "code from the file; if you trust it, pass --trust-pickle (Python: trust_pickle=True). "
                "Safer: save the model with torch.export.save (.pt2) or as TorchScript"
            ) from None
        logger.debug("weights_only load refused: %s", _first_line(exc))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError, ImportError) as exc2:
            raise InvalidModelError(
                f"{path}: cannot unpickle the model, its class is not importable here "
                f"({_first_line(exc2)}); run bnfold where the model's code is importable"
            ) from None
        except Exception as exc2:
            raise InvalidModelError(f"{path}: torch.load failed: {_first_line(exc2)}") from None
    return obj


def _refused_by_weights_only(exc: BaseException) -> bool:
    """torch.load(weights_only=True) met a class it may not import (a pickled module), as opposed
    to a damaged file (torch wraps both in the same UnpicklingError)."""
    text = str(exc)
    return "Unsupported global" in text or "Unsupported class" in text


def _n_required_args(module: Any) -> int:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return (
        sum(
            1
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is inspect.Parameter.empty
        )
        or 1
    )


def _module_float_dtype(module: Any) -> Any:
    torch = _import_torch()
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _inputs_from_shapes(
    path: Path,
    what: str,
    names: list[str],
    given: dict[str, tuple[int, ...]],
    defaults: dict[str, tuple[Any, ...]],
    dtypes: dict[str, Any],
) -> tuple:
    """Seeded example tensors; ``defaults`` holds shapes the file records (ints or None if dynamic)."""
    torch = _import_torch()
    unknown = [n for n in given if n not in names]
    if unknown:
        raise UsageError(
            f"--input-shape given for {', '.join(map(repr, unknown))}, which is not an input of "
            f"{path.name}; its inputs are: {', '.join(map(repr, names))}"
        )
    gen = torch.Generator().manual_seed(0)
    args = []
    for name in names:
        recorded = defaults.get(name)
        shape = given.get(name)
        if shape is None:
            if recorded is None or any(d is None for d in recorded):
                example = (
                    "1,3,224,224"
                    if recorded is None
                    else ",".join("1" if d is None else str(d) for d in recorded)
                )
                raise UsageError(
                    f"{path.name}: give the shape of input {name!r} with --input-shape {name}={example} "
                    f"({what} does not record {'its input shapes' if recorded is None else 'every dimension'}; "
                    f"inputs needed: {', '.join(map(repr, names))})"
                )
            shape = tuple(int(d) for d in recorded)
        elif recorded is not None:
            want = "[" + ", ".join("?" if d is None else str(d) for d in recorded) + "]"
            if len(shape) != len(recorded):
                raise UsageError(
                    f"input shape for {name!r} has rank {len(shape)} but {path.name} expects {want}"
                )
            for i, (d, r) in enumerate(zip(shape, recorded, strict=True)):
                if r is not None and int(r) != d:
                    raise UsageError(
                        f"input shape for {name!r} has {d} in dimension {i} but {path.name} expects {want}"
                    )
        dtype = dtypes.get(name, torch.float32)
        if dtype.is_floating_point:
            args.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        elif dtype == torch.bool:
            args.append(torch.zeros(shape, dtype=torch.bool))
        else:
            args.append(torch.zeros(shape, dtype=dtype))
    return tuple(args)


def _from_exported_program(ep: Any, path: Path, given: dict[str, tuple[int, ...]]) -> TorchSource:
    torch = _import_torch()
    if _graph_runs_bn_in_training(ep.graph):
        raise TrainingModeError(
            f"{path.name}: the exported program runs BatchNorm in training mode (batch statistics), "
            "so there is nothing fixed to fold; export the model after model.eval()"
        )
    user_inputs = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    recorded: dict[str, tuple[Any, ...]] = {}
    dtypes: dict[str, Any] = {}
    batch_static = True
    for name in user_inputs:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(val, torch.Tensor):
            raise UsageError(
                f"{path.name}: input {name!r} is not a tensor; bnfold exports tensor inputs only"
            )
        dims = tuple(int(d) if isinstance(d, int) else None for d in val.shape)
        recorded[name] = dims
        dtypes[name] = val.dtype
        if dims and dims[0] is None:
            batch_static = False
    # The example inputs saved with the program fill in dynamic dimensions when none are given.
    saved = getattr(ep, "example_inputs", None)
    if saved and isinstance(saved, tuple) and len(saved) == 2 and not saved[1]:
        saved_args = saved[0]
        if len(saved_args) == len(user_inputs):
            for name, a in zip(user_inputs, saved_args, strict=True):
                if (
                    name not in given
                    and isinstance(a, torch.Tensor)
                    and any(d is None for d in recorded[name])
                ):
                    given[name] = tuple(int(d) for d in a.shape)
    args = _inputs_from_shapes(path, "the exported program", user_inputs, given, recorded, dtypes)
    module = ep.module()
    return TorchSource(
        module, args, user_inputs, "exported_program", path, dynamic_batch=not batch_static
    )


@warnings_to_log
def fold_file(
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    trust_pickle: bool = False,
    opset: int = 17,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    strict: bool = False,
    external_data: bool | None = None,
    lower_remaining: bool = False,
    duplicate_shared: bool = False,
    bench: bool = False,
    options: FoldOptions | None = None,
    exporter: str = "dynamo",
) -> FoldResult:
    """``bnfold fold model.pt2 -o folded.onnx``: :func:`load_torch_file`, then :func:`export`.

    The report's ``input`` is ``path``. See those two functions for the arguments and errors;
    ``options`` (a :class:`~bnfold.options.FoldOptions`) replaces every other keyword.
    """
    opts = FoldOptions.from_keywords(
        options,
        input_shapes=input_shapes,
        trust_pickle=trust_pickle,
        opset=opset,
        verify=verify,
        atol=atol,
        rtol=rtol,
        seed=seed,
        strict=strict,
        external_data=external_data,
        lower_remaining=lower_remaining,
        duplicate_shared=duplicate_shared,
        bench=bench,
        exporter=exporter,
    )
    src = load_torch_file(path, input_shapes=opts.input_shapes, trust_pickle=opts.trust_pickle)
    result = export(
        src.module,
        src.example_inputs,
        output,
        input_names=src.input_names,
        dynamic_batch=src.dynamic_batch,
        options=opts.replace(input_shapes={}, trust_pickle=False),
    )
    result.report.input = str(path)
    return result


@contextlib.contextmanager
def torch_file_as_onnx(
    path: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    trust_pickle: bool = False,
    opset: int = 17,
) -> Iterator[Path]:
    """A PyTorch file (``.pt2``, TorchScript, pickled module) exported to a temporary ONNX file as
    ``bnfold fold`` exports it, unfolded; removed on exit. Loading errors are the one-line
    :class:`~bnfold.errors.BnfoldError` of :func:`load_torch_file`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            src = load_torch_file(path, input_shapes=input_shapes, trust_pickle=trust_pickle)
            with exported_onnx(
                src.module,
                src.example_inputs,
                input_names=src.input_names,
                dynamic_batch=src.dynamic_batch,
                opset=opset,
            ) as exported:
                yield exported
        finally:
            for w in caught:
                logger.debug("%s: %s", w.category.__name__, w.message)
