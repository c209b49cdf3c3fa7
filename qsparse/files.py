"""Writing files so that no reader ever sees half of one: the one home for qsparse's file writes.

Standard library only, so that the jax-free ``qsparse.deploy`` can use it. Every file goes through
a temporary file beside it that is flushed, fsynced, given the mode ``open`` would give a new file
and renamed into place; a directory is staged beside its destination and swapped in. A write that
fails (a full disk, a read-only folder) raises :class:`WriteError`, one line naming the file, and
leaves what was there before untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class WriteError(Exception):
    """A file or folder could not be written; the message names it and says why, on one line."""

    @classmethod
    def at(cls, path: Path | str, why: OSError | str) -> WriteError:
        """``cannot write <path>: <why>``, ``why`` an OSError's reason ('No space left on
        device') or a reason in words."""
        if isinstance(why, OSError):
            why = why.strerror or str(why)
        return cls(f"cannot write {path}: {' '.join(why.split())}")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode ``open`` gives a new file (0o666 less the umask); ``mkstemp``'s 0o600 would hide
    files from the other users of a shared filesystem."""
    return 0o666 & ~_umask()


def atomic_write(path: Path | str, write: Callable[[IO[Any]], object], binary: bool = True) -> None:
    """Write ``path`` by calling ``write`` on an open temporary file, then rename it into place."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError.at(path, e) from e
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield an empty staging folder beside ``dest``; on a clean exit it replaces ``dest`` whole.

    On an error the staging folder is removed and ``dest`` is left as it was. The swap renames the
    old folder aside first, so ``dest`` is missing only between two renames, never half-written.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        os.chmod(staging, 0o777 & ~_umask())
    except OSError as e:
        raise WriteError.at(dest, e) from e
    try:
        yield staging
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise WriteError.at(dest, e) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable(
    path: Path | str, error: type[Exception] = WriteError, what: str = "", action: str = "write"
) -> None:
    """Raise ``error`` ("cannot <action> <what>: <why>") unless ``path`` can be created or
    replaced: its nearest existing ancestor must be a writable folder. Checked before a long job
    starts, so it fails before any work."""
    path = Path(path).absolute()
    what = what or str(path)
    parent = next(p for p in (path, *path.parents) if p.exists())
    if parent == path and not path.is_dir():
        parent = path.parent
    if not parent.is_dir():
        raise error(f"cannot {action} {what}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot {action} {what}: {parent} is not writable")
