"""Inspect PyTorch zip archives before torch reads them: torch-free, nothing is unpickled.

``torch.export.load`` trusts the archive: it inflates every member into memory, unpickles any weight
or constant whose config says ``use_pickle: true`` (``torch.load(weights_only=False)``), calls
``pickle.loads`` on opaque constants and ``_pickle_load_obj`` on torchbind objects, and falls back to
``weights_only=False`` when the sample inputs (or a legacy ``serialized_*.pt`` member) are not plain
tensors. :func:`check_pt2` looks first:

* the zip itself (:func:`check_zip`): member count, every member's declared size against its
  compressed size (ratio), their total against what the machine has, stored members whose two sizes
  disagree, members that lie outside the file. Nothing is inflated before this passes.
* the weights and constants configs (``data/{weights,constants}/<model>_*_config.json``): a payload
  with ``use_pickle`` or an opaque/torchbind constant (``opaque_obj_*``, ``custom_obj_*``) is refused.
* every member torch would ``torch.load`` (``data/sample_inputs/<model>.pt``, the legacy
  ``data/weights/<model>.pt``, ``data/constants/<model>.pt``, ``serialized_*.pt``): its pickle
  streams are read with :func:`pickletools.genops` (which decodes, never executes) and refused when
  they import anything beyond the tensor-rebuilding allowlist (:func:`scan_pickle`).

Refusals raise :class:`~bnfold.errors.UntrustedInputError` (unpickling without ``trust_pickle``) or
:class:`~bnfold.errors.ResourceError` (a zip bomb), each with one line; exit code 2.
"""

from __future__ import annotations

__all__ = ["ArchiveLimits", "check_zip", "check_pt2", "scan_pickle", "PICKLE_ALLOWLIST"]

import io
import json
import os
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bnfold.errors import InvalidModelError, ResourceError, UntrustedInputError


@dataclass(frozen=True)
class ArchiveLimits:
    """What a PyTorch archive may declare before bnfold inflates any of it."""

    max_members: int = 100_000
    #: a member that declares more than ``ratio_min_bytes`` may inflate at most this much
    max_ratio: float = 100.0
    ratio_min_bytes: int = 1 << 20
    #: total declared (inflated) size; ``None``: the machine's available memory (at least 1 GiB)
    max_total_bytes: int | None = None
    #: a config/pickle member bnfold reads itself may be at most this big
    max_read_bytes: int = 256 << 20


def _available_memory() -> int:
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and size > 0:
            return int(pages) * int(size)
    except (ValueError, OSError, AttributeError):
        pass
    return 8 << 30


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_zip(
    path: str | os.PathLike, limits: ArchiveLimits | None = None, *, data: bytes | None = None
) -> list[zipfile.ZipInfo]:
    """Check the archive's directory against ``limits`` without inflating anything.

    Returns the members. Raises InvalidModelError (not a readable zip) or ResourceError (too many
    members, a declared size that does not fit, a compression ratio of a zip bomb).
    """
    limits = limits or ArchiveLimits()
    where = str(path)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data) if data is not None else path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InvalidModelError(f"{where}: damaged zip archive ({_first_line(exc)})") from None
    with zf:
        infos = zf.infolist()
    file_size = len(data) if data is not None else os.stat(path).st_size
    if len(infos) > limits.max_members:
        raise ResourceError(
            f"{where}: archive has {len(infos)} members, more than the {limits.max_members} allowed"
        )
    budget = limits.max_total_bytes
    if budget is None:
        budget = max(1 << 30, _available_memory())
    total = 0
    for info in infos:
        name = info.filename
        if info.file_size < 0 or info.compress_size < 0:
            raise InvalidModelError(f"{where}: member {name!r} declares a negative size")
        if info.header_offset + info.compress_size > file_size:
            raise InvalidModelError(
                f"{where}: member {name!r} declares {info.compress_size} bytes past the end of the file"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise InvalidModelError(
                f"{where}: stored member {name!r} declares {info.file_size} bytes but holds "
                f"{info.compress_size}"
            )
        if info.file_size > limits.ratio_min_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_ratio:
                raise ResourceError(
                    f"{where}: member {name!r} inflates {ratio:.0f}-fold to {_gib(info.file_size)} "
                    f"(limit {limits.max_ratio:.0f}-fold): refused as a zip bomb"
                )
        total += info.file_size
    if total > budget:
        raise ResourceError(
            f"{where}: archive inflates to {_gib(total)}, more than the {_gib(budget)} of memory "
            "bnfold may use for it"
        )
    return infos


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------------------------- pickle scan
_TORCH_STORAGES = re.compile(
    r"(Float|Double|Half|BFloat16|Long|Int|Short|Char|Byte|Bool|ComplexFloat|ComplexDouble|"
    r"QUInt8|QInt8|QInt32|QUInt4x2|QUInt2x4|Untyped)Storage"
)
_TORCH_DTYPES = {
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int8", "uint8",
    "int16", "short", "int32", "int", "int64", "long", "bool", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
}  # fmt: skip
#: (module, name) a tensor-only torch.save pickle may import; what ``weights_only=True`` needs for
#: tensors, parameters, tuples/lists/dicts of them.
PICKLE_ALLOWLIST = frozenset(
    {
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "strided"),
        ("torch", "contiguous_format"),
        ("torch", "channels_last"),
        ("torch", "preserve_format"),
        ("torch.serialization", "_get_layout"),
        ("torch.nn.parameter", "Parameter"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
    }
)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}  # fmt: skip
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in PICKLE_ALLOWLIST:
        return True
    return module == "torch" and (bool(_TORCH_STORAGES.fullmatch(name)) or name in _TORCH_DTYPES)


def scan_pickle(data: bytes) -> list[str]:
    """The imports of the pickle stream(s) in ``data`` outside :data:`PICKLE_ALLOWLIST`.

    ``GLOBAL``/``INST`` carry their import; ``STACK_GLOBAL`` takes the last two strings pushed
    (directly or from the memo); one it cannot resolve counts as disallowed, as do the extension
    registry (``EXT*``). Returns ``[]`` for a tensor-only pickle; never executes anything.
    """
    bad: list[str] = []
    memo: dict[int, object] = {}
    pushed: list[object] = []  # the last values pushed (strings, or None for anything else)
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                if not _allowed(module, attr):
                    bad.append(f"{module}.{attr}")
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                    module, attr = pushed[-2], pushed[-1]
                    if not _allowed(module, attr):
                        bad.append(f"{module}.{attr}")
                else:
                    bad.append("<unresolvable STACK_GLOBAL>")
                pushed.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                bad.append(f"<copyreg extension {arg}>")
            elif name in _STRING_OPS:
                pushed.append(str(arg) if not isinstance(arg, bytes) else arg.decode("latin-1"))
            elif name in _MEMO_PUT:
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in _MEMO_GET:
                pushed.append(memo.get(int(arg)))
            else:
                pushed.append(None)
            if len(pushed) > 64:
                del pushed[:-8]
    except Exception as exc:  # a damaged stream: torch would fail, or worse; refuse it
        bad.append(f"<unreadable pickle: {_first_line(exc)}>")
    return bad


# ------------------------------------------------------------------------------------- .pt2
_TORCH_LOADED = re.compile(
    r"(data/sample_inputs/[^/]+\.pt|data/weights/[^/]+\.pt|data/constants/[^/]+\.pt|"
    r"serialized_(state_dict|constants|example_inputs)\.pt)"
)
_CONFIG = re.compile(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json")


def _strip_root(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits, where: str) -> bytes:
    if info.file_size > limits.max_read_bytes:
        raise ResourceError(
            f"{where}: member {info.filename!r} is {_gib(info.file_size)}, more than bnfold reads "
            f"({_gib(limits.max_read_bytes)})"
        )
    try:
        with zf.open(info) as f:
            data = f.read(limits.max_read_bytes + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise InvalidModelError(
            f"{where}: cannot read member {info.filename!r} ({_first_line(exc)})"
        ) from None
    if len(data) > info.file_size:
        raise ResourceError(f"{where}: member {info.filename!r} inflates beyond its declared size")
    return data


def _untrusted(where: str, what: str) -> UntrustedInputError:
    return UntrustedInputError(
        f"{where}: {what}; loading it would unpickle (run code from the file). If you trust the file, "
        "pass --trust-pickle (Python: trust_pickle=True)"
    )


def _check_torch_save(data: bytes, member: str, limits: ArchiveLimits, where: str) -> None:
    """A member torch will ``torch.load``: a tensor-only torch.save zip, or refused."""
    if not data:
        return  # torch reads an empty member as {}
    if not data.startswith(b"PK"):
        raise _untrusted(where, f"member {member!r} is a raw (legacy) pickle bnfold cannot vet")
    inner = check_zip(f"{where}:{member}", limits, data=data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in inner:
            if info.filename.endswith(".pkl"):
                bad = scan_pickle(_read(zf, info, limits, f"{where}:{member}"))
                if bad:
                    raise _untrusted(
                        where, f"member {member!r} imports {', '.join(sorted(set(bad))[:3])}"
                    )


def check_pt2(
    path: str | os.PathLike, *, trust_pickle: bool = False, limits: ArchiveLimits | None = None
) -> None:
    """Vet a ``torch.export.save`` archive before ``torch.export.load`` sees it (see module doc).

    The zip checks always apply; with ``trust_pickle`` the pickle checks are skipped.
    """
    limits = limits or ArchiveLimits()
    where = str(path)
    infos = check_zip(path, limits)
    if trust_pickle:
        return
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            member = _strip_root(info.filename)
            if _CONFIG.fullmatch(member):
                raw = _read(zf, info, limits, where)
                try:
                    config = json.loads(raw).get("config", {})
                    items = list(config.items())
                except (ValueError, AttributeError, UnicodeDecodeError) as exc:
                    raise InvalidModelError(
                        f"{where}: member {member!r} is not a valid payload config "
                        f"({_first_line(exc)})"
                    ) from None
                for fqn, meta in items:
                    if not isinstance(meta, dict):
                        raise InvalidModelError(
                            f"{where}: {member!r}: entry {fqn!r} is not an object"
                        )
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle"):
                        raise _untrusted(where, f"{fqn!r} is stored as a pickle ({member})")
                    if path_name.startswith(("opaque_obj_", "custom_obj_")):
                        raise _untrusted(where, f"constant {fqn!r} is an opaque/torchbind object")
            elif _TORCH_LOADED.fullmatch(member) or _TORCH_LOADED.fullmatch(info.filename):
                _check_torch_save(_read(zf, info, limits, where), member, limits, where)
            elif member.startswith("data/constants/") and (
                member.split("/")[-1].startswith(("opaque_obj_", "custom_obj_"))
            ):
                raise _untrusted(where, f"member {member!r} is an opaque/torchbind object")


def check_torch_zip(path: str | os.PathLike, limits: ArchiveLimits | None = None) -> None:
    """The zip checks alone, for TorchScript and ``torch.save`` zips."""
    check_zip(Path(path), limits)
