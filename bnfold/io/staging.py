"""Atomic, crash-safe output: :class:`StagedOutput`, the folder lock, the commit protocol, the
protection of inputs (:func:`protecting`, :func:`input_files`) and the removal of stale staging.

The model (and its external data, if any) is written and fsynced in a private staging folder next
to the destination (``.NAME.bnfold-PID-XXXX``); only after it is complete (and, in ``bnfold fold``,
verified) is it moved into place. The external data gets a name that no existing file has
(``NAME.data``, or ``NAME.<8 hex>.data`` when that is taken) and is linked into place first; then
the model file is replaced with ``os.replace``. So a SIGKILL at any moment leaves the destination
either as it was (old model + the data it references) or complete and new, never a new data file
under an old model. After the switch, the data files that the *previous* model at the destination
referenced and that follow bnfold's naming are removed. Staging folders left by a killed run are
removed by a later run once their process is gone and they are older than ten minutes.

The commit's file steps (:func:`_publish_data`, :func:`_replace_model`, :func:`_remove_files`) are
looked up on the package ``bnfold.io`` when they run (:func:`_steps`), so that replacing
``bnfold.io._publish_data`` (the crash test's KILL_INSIDE hook) takes effect.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import onnx
import onnx_ir as ir

from bnfold.errors import OutputError

from .load import to_proto
from .paths import _refuse_non_regular
from .save import _attribute_data_inline
from .validate import TWO_GB
from .walk import _iter_tensor_protos

_STALE_STAGING_S = 600  # a staging folder of a dead process older than this is removed


_STAGING_MARK = ".bnfold-"
_PREVIOUS_MODEL_MAX = 256 << 20  # previous outputs bigger than this are not parsed for cleanup


def _staging_prefix(name: str) -> str:
    """``.NAME.bnfold-``; the name is shortened so the folder name stays within NAME_MAX."""
    return f".{name[:120]}{_STAGING_MARK}"


def _data_name_pattern(name: str) -> re.Pattern[str]:
    """The names bnfold gives the external data of an output called ``name``."""
    return re.compile(re.escape(name) + r"(\.[0-9a-f]{8})?\.data")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists; anything else: assume it does
        return True
    return True


def remove_stale_staging(
    folder: Path, name: str, *, max_age_s: float = _STALE_STAGING_S
) -> list[Path]:
    """Remove staging folders of output ``name`` in ``folder`` left by a killed run.

    A folder is stale when the process that made it (its pid is in its name) no longer runs and it
    has not changed for ``max_age_s`` seconds. Returns the folders removed.
    """
    prefix = _staging_prefix(name)
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        if age < max_age_s:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _fsync(path: Path) -> None:
    """Flush a file (or folder) to disk, so a crash of the machine cannot undo a rename's content."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise the commits of concurrent bnfold runs into one folder (flock on the folder)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locking on this file system
        yield
    finally:
        os.close(fd)  # releases the lock


_PROTECTED: contextvars.ContextVar[frozenset[Path]] = contextvars.ContextVar(
    "bnfold_protected", default=frozenset()
)


@contextlib.contextmanager
def protecting(paths: set[Path] | frozenset[Path]) -> Iterator[None]:
    """Within this block no commit's cleanup removes any of ``paths`` (resolved): a batch protects
    every input of the whole batch (and their external data) around each model's fold."""
    token = _PROTECTED.set(_PROTECTED.get() | {Path(p).resolve() for p in paths})
    try:
        yield
    finally:
        _PROTECTED.reset(token)


def input_files(path: str | os.PathLike) -> set[Path]:
    """An input file and (for ONNX) the external-data files it references, resolved; for the
    protection of a whole batch. Unreadable files protect just themselves."""
    p = Path(path)
    files = {p.resolve()}
    try:
        if p.is_file() and p.stat().st_size <= TWO_GB and p.suffix != ".pt2":
            proto = onnx.load(str(p), load_external_data=False)
            for tensor in _iter_tensor_protos(proto):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
                    if loc and "\0" not in loc:
                        files.add((p.parent / loc).resolve())
    except Exception:  # noqa: BLE001 - not ONNX (PyTorch) or unreadable: the file alone
        pass
    return files


def _referenced_data(model_path: Path) -> dict[Path, int]:
    """External-data files, following bnfold's naming, that the model at ``model_path`` reads, with
    the end of the last byte it reads from each (``{}`` when it is not a model we can read)."""
    try:
        if not model_path.is_file() or model_path.stat().st_size > _PREVIOUS_MODEL_MAX:
            return {}
        proto = onnx.load(str(model_path), load_external_data=False)
        pattern = _data_name_pattern(model_path.name)
        found: dict[Path, int] = {}
        for tensor in _iter_tensor_protos(proto):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            if pattern.fullmatch(location):
                f = model_path.with_name(location)
                end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
                found[f] = max(found.get(f, 0), end)
        return found
    except Exception:  # not a model we can read: leave its files alone
        return {}


def _own_data(path: Path, end: int, keep: set[Path]) -> bool:
    """``path`` is provably the previous output's own data: bnfold-named (checked by the caller),
    not protected, a regular file (no link), one hard link, and exactly as long as the data the
    previous model reads from it (bnfold writes nothing else into it)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    if path.resolve() in keep:
        return False
    return end > 0 and st.st_size == end


def _publish_data(staged: Path, final: Path) -> None:
    """Put the staged data file at ``final``, which must not exist (never overwrites)."""
    try:
        os.link(staged, final)  # atomic, and fails when ``final`` exists
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "File exists", str(final)) from None
        os.rename(staged, final)
        return
    os.unlink(staged)  # one link left, as onnx_ir requires of external data


def _replace_model(staged: Path, final: Path) -> None:
    os.replace(staged, final)


def _remove_files(paths: Iterator[Path] | set[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _relocate(model_path: Path, old: str, new: str) -> None:
    """Point the staged model's external references from data file ``old`` to ``new``."""
    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in _iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    tmp = model_path.with_name(model_path.name + ".relocating")
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, model_path)


def _steps() -> ModuleType:
    """The package ``bnfold.io``, on which :meth:`StagedOutput.commit` looks up its file steps
    (``_publish_data``, ``_replace_model``, ``_remove_files``) each time it runs: the crash test
    replaces them there to kill the process at an exact step of the commit."""
    return sys.modules[__name__.rpartition(".")[0]]


class StagedOutput:
    """Write a model into a staging folder beside ``final``; :meth:`commit` moves it into place.

    ``path`` is the staged model file, which can be loaded (e.g. by ONNX Runtime for verification)
    exactly as it will be at the destination, since external data is referenced by a relative name.
    The external data's final name is chosen in :meth:`commit`, under the folder lock (the staged
    model is re-pointed if another run took the provisional name meanwhile), so concurrent runs on
    the same ``-o`` never fail on a name clash. ``protected`` files (the input model and its
    external data; in a batch, every input of the batch) are never removed by the cleanup that
    follows a commit, and nothing else is removed unless it is provably the previous output's own
    data (:func:`_own_data`).
    """

    def __init__(
        self, final: str | os.PathLike, *, protected: set[Path] | frozenset[Path] = frozenset()
    ) -> None:
        self.final = Path(final)
        self.folder = self.final.parent if str(self.final.parent) else Path(".")
        self.protected = {Path(p).resolve() for p in protected}
        _refuse_non_regular(self.final)
        remove_stale_staging(self.folder, self.final.name)
        try:
            self._dir = Path(
                tempfile.mkdtemp(
                    prefix=f"{_staging_prefix(self.final.name)}{os.getpid()}-", dir=self.folder
                )
            )
        except OSError as exc:
            raise OutputError(
                f"{self.final}: cannot write in {str(self.folder)!r} ({exc.strerror or exc})"
            ) from None
        self.path = self._dir / self.final.name
        self.data_name: str | None = None
        self.committed = False

    def _fresh_data_name(self) -> str:
        """``NAME.data`` when no such file exists, else ``NAME.<8 hex>.data``: never an existing file,
        so the data an existing model at the destination reads is not touched before the switch.
        Called under the folder lock."""
        name = self.final.name + ".data"
        while os.path.lexists(self.folder / name):
            name = f"{self.final.name}.{secrets.token_hex(4)}.data"
        return name

    def write(
        self,
        model: ir.Model,
        *,
        external: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        try:
            with _attribute_data_inline(model):
                if external:
                    # provisional: the staging folder is private; commit picks the final name
                    self.data_name = self.final.name + ".data"

                    def callback(tensor, info) -> None:  # noqa: ANN001 - onnx_ir signature
                        if progress is not None:
                            progress(info.index + 1, info.total)

                    ir.save(model, self.path, external_data=self.data_name, callback=callback)
                    _fsync(self._dir / self.data_name)
                    _fsync(self.path)
                else:
                    proto = to_proto(model)
                    if proto.ByteSize() > TWO_GB:
                        raise OutputError(
                            "the model exceeds 2 GB as one file; write it with external data"
                        )
                    with open(self.path, "wb") as f:
                        f.write(proto.SerializeToString())
                        f.flush()
                        os.fsync(f.fileno())
        except OSError as exc:
            self.discard()
            raise OutputError(f"{self.final}: cannot write ({exc.strerror or exc})") from None

    def commit(self, *, protected: set[Path] | frozenset[Path] = frozenset()) -> Path:
        """Move the staged files to the destination.

        Under the folder lock: the data file gets a name no file has and goes in first, then the
        model replaces the old one in one ``os.replace``: at every instant the destination is the
        old pair or the new pair. Afterwards the data files the old model read are removed when
        they are provably its own (see :func:`_own_data`) and not in ``protected``,
        ``self.protected`` or the set of :func:`protecting`.
        """
        keep = self.protected | {Path(p).resolve() for p in protected} | set(_PROTECTED.get())
        steps = _steps()
        try:
            with _folder_lock(self.folder):
                _refuse_non_regular(self.final)
                previous = _referenced_data(self.final)
                published: Path | None = None
                try:
                    if self.data_name:
                        name = self._fresh_data_name()
                        if name != self.data_name:
                            os.rename(self._dir / self.data_name, self._dir / name)
                            _relocate(self.path, self.data_name, name)
                            self.data_name = name
                        published = self.folder / name
                        steps._publish_data(self._dir / name, published)
                    steps._replace_model(self.path, self.final)
                except OSError as exc:
                    if published is not None and not isinstance(exc, FileExistsError):
                        steps._remove_files({published})
                    if isinstance(exc, FileExistsError):
                        raise OutputError(
                            f"{self.final}: its data file appeared while bnfold was writing "
                            "(another program is writing the same output); run again"
                        ) from None
                    raise OutputError(
                        f"{self.final}: cannot write ({exc.strerror or exc})"
                    ) from None
                self.committed = True
                _fsync(self.folder)
                if published is not None:
                    keep.add(published.resolve())
                steps._remove_files(p for p, end in previous.items() if _own_data(p, end, keep))
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.discard()
