"""The array files of a run: Orbax checkpoints with checksums, masks as NPZ, and the run lock.

The text files of a run and the names of all its files are :mod:`qsparse.rundir`'s. Every
write is atomic (a temporary file or folder, then a rename), so a process killed at any instant
leaves either the old file or the new one, never half of one; a write the system refuses (a full
disk) raises :class:`qsparse.files.WriteError` naming the file or checkpoint folder. Orbax cannot
tell a flipped byte in its array data from the real thing, so every checkpoint folder also holds
the SHA-256 of its arrays (``qsparse.json``); a file that fails to read back raises
:class:`CorruptFileError` naming it, so the caller can fall back to an earlier state.

In a multi-process run only process 0 writes (:func:`is_writer`): every write below is skipped
on the other processes, which compute the same values and read the same files.

For tests, :func:`fault_point` lets the environment kill the process at named places.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qsparse import files
from qsparse.masks import by_path, path_str
from qsparse.rundir import CorruptFileError, is_writer, read_json, write_json

log = logging.getLogger(__name__)

FAULT_ENV = "QSPARSE_FAULT"
META = "qsparse.json"  # beside Orbax's files in every checkpoint folder: checksum and extras
_fault_counts: dict[str, int] = {}
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # in TensorStore's messages


class CheckpointMismatchError(RuntimeError):
    """A readable checkpoint holds arrays of other shapes or dtypes than the model asks for:
    another model or qsparse version wrote it. Not damage, so nothing is deleted or recomputed."""


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


def fault_point(name: str) -> None:
    """Test hook: ``QSPARSE_FAULT=<name>:<n>[:STOP]`` kills (SIGKILL) or freezes (SIGSTOP) this
    process the n-th time it passes point ``name``, so tests can interrupt a run exactly there.

    Points: ``epoch_end`` (an epoch trained and in metrics.jsonl, its checkpoint not written),
    ``checkpoint_write`` (a checkpoint complete in its temporary folder, not yet renamed into
    place) and ``round_end`` (a round's done.json written).
    """
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if spec[0] != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(spec[1]):
        os.kill(os.getpid(), signal.SIGSTOP if spec[2:] == ["STOP"] else signal.SIGKILL)


def _checkpointer() -> ocp.StandardCheckpointer:
    """Orbax on this process alone: the run's processes never wait on each other for files."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def save_masks(path: Path, masks) -> None:
    """Masks as an .npz keyed by parameter path ('QDense_0/qkernel'): readable with numpy alone.
    Deflated: a byte per weight compresses about tenfold at 10 % density (LeNet-300-100's 268 KB
    to 26 KB), which keeps a run's masks small enough to commit; files written uncompressed by
    earlier versions load the same."""
    if not is_writer():
        return
    arrays = by_path(masks)
    files.atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_masks(path: Path, like) -> Any:
    """Masks shaped like the pytree ``like``; names, shapes and dtype checked (the zip: CRCs)."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a damaged zip raises many types
        raise CorruptFileError(f"cannot read masks {path}: {type(e).__name__}: {e}") from e
    leaves = []
    for p, x in jax.tree_util.tree_leaves_with_path(like):
        a = arrays.get(path_str(p))
        if a is None or a.shape != x.shape or a.dtype != np.bool_:
            raise CorruptFileError(
                f"masks {path}: entry {path_str(p)} missing or of the wrong shape/dtype"
            )
        leaves.append(a)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _host(tree) -> Any:
    """Leaves as numpy arrays: Orbax takes these from any process, where a device array of a
    multi-process run would have to be saved by all of them together."""
    return jax.tree.map(np.asarray, tree)


def abstract(tree) -> Any:
    """Numpy stand-ins of ``tree``'s leaves: what a checkpoint is restored as."""
    return jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), tree)


def _digest(tree, extra: Any) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for p, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(p)}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _remove(path: Path) -> None:
    """Rename, then delete: a folder half deleted by a kill never keeps its valid-looking name."""
    if is_writer() and path.exists():
        doomed = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed)


def save_tree(path: Path, tree, extra: Any = None) -> None:
    """A pytree (plus JSON ``extra``) as one checkpoint folder, replacing ``path`` if it exists.

    A write the system refuses (a full disk) raises :class:`qsparse.files.WriteError` naming
    ``path``, whose old contents stay as they were.
    """
    if not is_writer():
        return
    path = Path(path).absolute()
    tmp = path.with_name(f".{path.name}.tmp")
    _clear(tmp)
    tree = _host(tree)
    try:
        with _checkpointer() as ckptr, _quiet_orbax():
            ckptr.save(tmp, tree)
            ckptr.wait_until_finished()
        write_json(tmp / META, {"sha256": _digest(tree, extra), "extra": extra})
        fault_point("checkpoint_write")
        _remove(path)
        os.replace(tmp, path)
    except (OSError, ValueError, files.WriteError) as e:
        _clear_when_quiet(tmp)
        error = _refused(path, e)
        if error is None:
            raise
        raise error from e


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax logs each failed write of a save with its traceback before it raises; the error
    it raises (chained to the WriteError) says the same, so the logs are dropped meanwhile."""
    absl = logging.getLogger("absl")
    only_others = logging.Filter()
    only_others.filter = lambda record: f"{os.sep}orbax{os.sep}" not in record.pathname
    absl.addFilter(only_others)
    try:
        yield
    finally:
        absl.removeFilter(only_others)


def _clear(tmp: Path) -> None:
    """A checkpoint's temporary folder and Orbax's own beside it (``<tmp>.orbax-checkpoint-tmp``),
    left by a save that failed or was killed."""
    for leftover in _leftovers(tmp):
        shutil.rmtree(leftover, ignore_errors=True)


def _leftovers(tmp: Path) -> list[Path]:
    return [tmp, *tmp.parent.glob(f"{glob.escape(tmp.name)}.orbax-checkpoint-tmp*")]


def _clear_when_quiet(tmp: Path, quiet: float = 0.25, limit: float = 5.0) -> None:
    """:func:`_clear` after a failed save, again until nothing reappears for ``quiet`` seconds.

    When one of a save's array writes fails, Orbax raises while TensorStore's other writes of
    that save are still in flight, and nothing hands them back to wait on; a write that lands
    after the first clear would recreate the temporary folder."""
    start = last_seen = time.monotonic()
    while True:
        if any(p.exists() for p in _leftovers(tmp)):
            _clear(tmp)
            last_seen = time.monotonic()
        now = time.monotonic()
        if now - last_seen >= quiet or now - start >= limit:
            return
        time.sleep(0.01)


def _refused(path: Path, e: Exception) -> files.WriteError | None:
    """The WriteError naming checkpoint ``path`` for an error that says the system refused a
    write: an OSError, or the ValueError in which Orbax's array store (TensorStore, C++) reports
    one ('... No space left on device [os_error_code=28]'); None for any other error."""
    if isinstance(e, files.WriteError) and isinstance(e.__cause__, OSError):
        e = e.__cause__
    if isinstance(e, OSError):
        return files.WriteError.at(path, e)
    code = _OS_ERROR_CODE.search(str(e))
    return files.WriteError.at(path, os.strerror(int(code[1]))) if code else None


def load_tree_extra(path: Path, like) -> tuple[Any, Any]:
    """The pytree shaped like ``like`` and the ``extra`` saved with it, both checksum-verified.

    A folder without the checksum file (written before checksums existed) is read unverified,
    with a warning.
    """
    path = Path(path).absolute()
    meta_path = path / META
    meta = read_json(meta_path) if meta_path.exists() else None
    try:
        with _checkpointer() as ckptr:
            stored = ckptr.metadata(path)
    except Exception as e:  # orbax raises many types for a damaged folder
        raise CorruptFileError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    _check_arrays(path, stored, like)
    try:
        with _checkpointer() as ckptr:
            tree = ckptr.restore(path, abstract(like))
    except Exception as e:  # orbax raises many types for a damaged folder
        raise CorruptFileError(f"cannot restore checkpoint {path}: {type(e).__name__}: {e}") from e
    if meta is None:
        log.warning(
            "checkpoint %s has no checksum (written by an older qsparse); read unverified", path
        )
        return tree, None
    if not isinstance(meta, dict) or meta.get("sha256") != _digest(tree, meta.get("extra")):
        raise CorruptFileError(f"checkpoint {path} fails its checksum ({meta_path})")
    return tree, meta["extra"]


def _check_arrays(path: Path, stored, like) -> None:
    """CheckpointMismatchError unless the checkpoint's arrays (Orbax's metadata) have the shapes
    and dtypes of ``like``'s leaves, as multisets (containers may be spelled differently)."""
    tree = getattr(getattr(stored, "item_metadata", None), "tree", None)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    if tree is None or not all(hasattr(x, "shape") for x in leaves):
        raise CorruptFileError(f"cannot read checkpoint {path}: no array metadata")
    saved = sorted((tuple(x.shape), np.dtype(x.dtype).name) for x in leaves)
    wanted = sorted((x.shape, x.dtype.name) for x in jax.tree.leaves(abstract(like)))
    if saved != wanted:
        only = sorted(set(saved) ^ set(wanted))[:4]
        raise CheckpointMismatchError(
            f"checkpoint {path} holds {len(saved)} arrays where this model has {len(wanted)}, "
            f"differing in (shape, dtype) {only}: another model or qsparse version wrote it; "
            "use another run directory"
        )


def load_tree(path: Path, like) -> Any:
    return load_tree_extra(path, like)[0]


class EpochCheckpoints:
    """Per-epoch training checkpoints of one round, ``epoch_<n>/``: the train state plus the
    metrics so far, under one checksum, so a restored state and its history always match;
    ``metrics.jsonl`` beside them is only a readable copy.
    """

    def __init__(self, directory: Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep

    def epochs(self) -> list[int]:
        """Committed epochs, oldest first (temporary folders start with '.')."""
        return sorted(
            int(p.name[6:]) for p in self.directory.glob("epoch_*") if p.name[6:].isdigit()
        )

    def _path(self, epoch: int) -> Path:
        return self.directory / f"epoch_{epoch:04d}"

    def save(self, epoch: int, state, history: list[dict]) -> None:
        save_tree(self._path(epoch), state, {"history": history})
        for old in self.epochs()[: -self.max_to_keep]:
            _remove(self._path(old))

    def restore_latest(self, like) -> tuple[int, Any, list[dict]] | None:
        """The newest readable checkpoint; damaged ones are reported, deleted and skipped (one
        written for another model raises :class:`CheckpointMismatchError`, deleting nothing)."""
        for epoch in reversed(self.epochs()):
            try:
                state, extra = load_tree_extra(self._path(epoch), like)
                history = extra["history"]
                if [row["epoch"] for row in history] != list(range(1, epoch + 1)):
                    raise CorruptFileError(
                        f"checkpoint {self._path(epoch)}: history does not match epoch {epoch}"
                    )
                return epoch, state, history
            except (CorruptFileError, TypeError, KeyError) as e:
                log.warning("%s; falling back to an earlier checkpoint", e)
                _remove(self._path(epoch))
        return None


class RunLock:
    """An exclusive ``flock`` on a run's lock file: the kernel drops it when the process dies,
    so a killed run never leaves a stale lock, and a second live process is refused. Taken by
    the writing process only (:func:`is_writer`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if not is_writer():
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # open()'s mode, as files
        except OSError as e:
            raise files.WriteError.at(self.path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by another process (pid {owner}); "
                "wait for it to finish or stop it"
            ) from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:
            self.__exit__()
            raise files.WriteError.at(self.path, e) from e
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
