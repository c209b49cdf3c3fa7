"""Files of a run: Orbax checkpoints, atomic JSON/NPZ writes, and the run-directory lock.

Every write is atomic (a temporary file or folder, then a rename), so a process killed at any
instant leaves either the old file or the new one, never half of one. Orbax already writes a
checkpoint to a temporary folder and renames it when complete; a read that fails is reported
with the file's name (:class:`CorruptFileError`) so the caller can fall back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qsparse.masks import path_str

log = logging.getLogger(__name__)


class CorruptFileError(RuntimeError):
    """A run file exists but cannot be read back; the message names it."""


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"cannot read {path}: {e}") from e


def save_masks(path: Path, masks) -> None:
    """Masks as an .npz keyed by parameter path ('QDense_0/qkernel'): readable with numpy alone."""
    arrays = {path_str(p): np.asarray(m) for p, m in jax.tree_util.tree_leaves_with_path(masks)}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_masks(path: Path, like) -> Any:
    """Masks shaped like the pytree ``like``; checks names, shapes and dtype."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise CorruptFileError(f"cannot read masks {path}: {e}") from e
    leaves = []
    for p, x in jax.tree_util.tree_leaves_with_path(like):
        a = arrays.get(path_str(p))
        if a is None or a.shape != x.shape or a.dtype != np.bool_:
            raise CorruptFileError(f"masks {path}: entry {path_str(p)} missing or of the wrong shape/dtype")
        leaves.append(a)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def abstract(tree) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_tree(path: Path, tree) -> None:
    """A whole pytree as one Orbax checkpoint folder (replaced if it exists)."""
    path = Path(path).absolute()
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp, tree)
        ckptr.wait_until_finished()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_tree(path: Path, like) -> Any:
    path = Path(path).absolute()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, abstract(like))
    except Exception as e:  # orbax raises many types for a damaged folder
        raise CorruptFileError(f"cannot restore checkpoint {path}: {type(e).__name__}: {e}") from e


class EpochCheckpoints:
    """Per-epoch training checkpoints of one round: the train state plus the metrics so far.

    The metrics live *inside* the checkpoint, so a restored state and its history always match;
    ``metrics.jsonl`` beside it is only a readable copy.
    """

    def __init__(self, directory: Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, epoch: int, state, history: list[dict]) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history))
        self._manager.save(epoch, args=args, force=True)

    def restore_latest(self, like) -> tuple[int, Any, list[dict]] | None:
        """The newest readable checkpoint; damaged ones are reported, deleted and skipped."""
        for epoch in sorted(self._manager.all_steps(), reverse=True):
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract(like)), history=ocp.args.JsonRestore())
                restored = self._manager.restore(epoch, args=args)
                return epoch, restored["state"], list(restored["history"])
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                log.warning("checkpoint %s/%d is unreadable (%s: %s); falling back", self.directory, epoch,
                            type(e).__name__, e)
                self._manager.delete(epoch)
        return None

    def close(self) -> None:
        self._manager.close()


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``: the kernel drops it when the process dies,
    so a killed run never leaves a stale lock, and a second live process is refused."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by another process (pid {owner}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
