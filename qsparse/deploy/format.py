"""The export file: its constants, the value and kernel codec, and pack/read/save.

The format is written out once, in ``docs/deployment.md`` (the file's entries, its header, how
kernels are stored); this module implements it. It writes version 3 (version 2 and the residual
networks' ops: batch norm, residual blocks, average pool, strided bias-free convolutions) and
reads versions 1 to 3 (:func:`read` gives a version-1 header the shape of a version-2 one). Numpy
only; files are written through :mod:`qsparse.files`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from qsparse import files, ops
from qsparse.algebras import QUATERNION, Algebra

FORMAT = "qsparse-deploy"
VERSION = 3
READS = (1, 2, 3)  # the versions :func:`read` accepts
HEADER = "header.json"
DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
ENCODINGS = tuple(ops.ENCODINGS)
LAYOUTS = ("element", "nblock")  # version 1 named nblock "qblock" (quaternions only)


class ExportFileError(ValueError):
    """An export file that cannot be read back; the message names it and what is wrong."""


# -- values ------------------------------------------------------------------------------------


def encode_values(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as stored: float32, float16, or bfloat16 bits (uint16, round to nearest
    even); a value the dtype cannot hold (overflow to inf) is an error."""
    x = np.asarray(x, np.float32)
    if dtype == "float32":
        return x.astype("<f4")
    if dtype == "float16":
        y = x.astype("<f2")
        if not np.all(np.isfinite(y)):
            raise ValueError(f"weights up to {np.abs(x).max():g} overflow float16")
        return y
    if dtype == "bfloat16":
        u = x.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    raise ValueError(f"unknown dtype {dtype!r}; valid: {list(DTYPES)}")


def decode_values(v: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float32 (exact: every stored dtype is a subset of float32)."""
    if dtype == "bfloat16":
        return (v.astype(np.uint32) << 16).view(np.float32)
    return v.astype(np.float32)


# -- positions and the storage chooser -----------------------------------------------------------


def index_dtype(n: int) -> np.dtype:
    """The smallest unsigned type holding every flat index of a grid of ``n`` positions."""
    for t in ("<u1", "<u2", "<u4"):
        if n - 1 <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype("<u8")


def _candidates(grid: np.ndarray, layout: str, per_value: int) -> list[dict]:
    """Storage of the boolean position grid ``grid`` with ``per_value`` bytes per position."""
    n, count = grid.size, int(np.count_nonzero(grid))
    values = count * per_value
    idx = index_dtype(n)
    return [
        {"layout": layout, "positions": "dense", "count": n, "bytes": n * per_value},
        {"layout": layout, "positions": "bitmask", "count": count, "bytes": values + -(-n // 8)},
        {
            "layout": layout,
            "positions": "indices",
            "count": count,
            "index_dtype": idx.name,
            "bytes": values + count * idx.itemsize,
        },
    ]


def storage_candidates(mask: np.ndarray, hypercomplex: bool, itemsize: int) -> list[dict]:
    """Every way to store a kernel with this mask (``itemsize`` bytes per value), with its bytes.

    Real kernels: ``element`` positions. Component kernels (``hypercomplex``: the ``n``
    components on axis 0): ``nblock`` (one position per number with any component alive, ``n``
    values each) and ``element``.
    """
    mask = np.asarray(mask, bool)
    out = []
    if hypercomplex:
        n = mask.shape[0]
        out += _candidates(mask.any(axis=0), "nblock", n * itemsize)[1:]  # nblock/dense = element
    return out + _candidates(mask, "element", itemsize)


def choose_storage(mask: np.ndarray, hypercomplex: bool, itemsize: int) -> dict:
    """The candidate of :func:`storage_candidates` with the fewest bytes (the first on a tie)."""
    return min(storage_candidates(mask, hypercomplex, itemsize), key=lambda s: s["bytes"])


def encode_kernel(
    kernel: np.ndarray, mask: np.ndarray, hypercomplex: bool, dtype: str = "float32"
) -> tuple[dict, dict[str, np.ndarray]]:
    """(storage, {"values", "positions"?}): the kernel's surviving values, smallest storage."""
    kernel = np.asarray(kernel, np.float32)
    mask = np.asarray(mask, bool)
    if kernel.shape != mask.shape:
        raise ValueError(f"kernel {kernel.shape} and mask {mask.shape} differ in shape")
    if hypercomplex and kernel.ndim < 3:
        raise ValueError(f"a component kernel has its components on axis 0, got {kernel.shape}")
    storage = choose_storage(mask, hypercomplex, np.dtype(DTYPES[dtype]).itemsize)
    storage.update(alive=int(np.count_nonzero(mask)), total=int(mask.size))
    kernel = np.where(mask, kernel, np.float32(0))
    if storage["layout"] == "nblock":
        grid = mask.any(axis=0)
        values = np.moveaxis(kernel, 0, -1)[grid]  # (count, n)
    else:
        grid = mask if storage["positions"] != "dense" else np.ones_like(mask)
        values = kernel[grid]
    arrays = {"values": encode_values(values, dtype)}
    if storage["positions"] == "bitmask":
        arrays["positions"] = np.packbits(grid.ravel())
    elif storage["positions"] == "indices":
        arrays["positions"] = np.flatnonzero(grid.ravel()).astype(storage["index_dtype"])
    return storage, arrays


def decode_kernel(
    storage: dict, kernel_shape: tuple[int, ...], arrays: dict[str, np.ndarray], dtype: str
) -> tuple[np.ndarray | None, np.ndarray]:
    """(flat positions, float32 values) of a stored kernel; positions None for ``dense``.

    Positions index ``kernel_shape`` (``element``) or ``kernel_shape[1:]`` (``nblock``, values
    ``(count, kernel_shape[0])``). Raises ValueError saying what does not fit.
    """
    layout, kind, count = storage["layout"], storage["positions"], storage["count"]
    grid = tuple(kernel_shape[1:]) if layout == "nblock" else tuple(kernel_shape)
    n = int(np.prod(grid))
    if layout not in LAYOUTS or kind not in ("dense", "bitmask", "indices"):
        raise ValueError(f"unknown storage {layout}/{kind}")
    values = arrays["values"]
    want = (count, kernel_shape[0]) if layout == "nblock" else (count,)
    if values.shape != want or values.dtype != np.dtype(DTYPES[dtype]):
        raise ValueError(f"values are {values.dtype}{values.shape}, expected {DTYPES[dtype]}{want}")
    values = decode_values(values, dtype)
    if not np.all(np.isfinite(values)):
        raise ValueError("values are not all finite")
    if kind == "dense":
        if count != n:
            raise ValueError(f"dense storage of {count} values for {n} positions")
        return None, values
    positions = arrays.get("positions")
    if positions is None:
        raise ValueError("positions are missing")
    if kind == "bitmask":
        if positions.dtype != np.uint8 or positions.shape != (-(-n // 8),):
            raise ValueError(f"bitmask is {positions.dtype}{positions.shape} for {n} positions")
        bits = np.unpackbits(positions)
        if bits[n:].any():
            raise ValueError("bitmask has bits set beyond its grid")
        flat = np.flatnonzero(bits[:n])
    else:
        if positions.dtype != np.dtype(storage["index_dtype"]) or positions.shape != (count,):
            raise ValueError(f"indices are {positions.dtype}{positions.shape}, expected {count}")
        flat = positions.astype(np.int64)
        if count and (flat[-1] >= n or np.any(np.diff(flat) <= 0)):
            raise ValueError("indices are not ascending within the grid")
    if flat.size != count:
        raise ValueError(f"{flat.size} positions for {count} values")
    return flat, values


def dense_kernel(
    storage: dict, kernel_shape: tuple[int, ...], positions: np.ndarray | None, values: np.ndarray
) -> np.ndarray:
    """The stored kernel as a dense float32 array of ``kernel_shape`` (zeros where pruned)."""
    if storage["layout"] == "nblock":
        n = kernel_shape[0]
        grid = np.zeros((int(np.prod(kernel_shape[1:])), n), np.float32)
        grid[slice(None) if positions is None else positions] = values
        return np.moveaxis(grid.reshape(*kernel_shape[1:], n), -1, 0)
    flat = np.zeros(int(np.prod(kernel_shape)), np.float32)
    flat[slice(None) if positions is None else positions] = values
    return flat.reshape(kernel_shape)


# -- the algebras a file's layers compute in ------------------------------------------------------


def algebra_entry(algebra: Algebra) -> dict:
    """The header's ``algebras`` entry of an algebra: its ``kind`` and ``n``, and for the
    ``table`` kind its structure constants ``A[i, j, k]`` (so that a file runs where its
    algebra was never registered)."""
    entry = {"kind": algebra.kind, "n": algebra.n}
    if algebra.table is not None:
        entry["table"] = algebra.table.tolist()
    return entry


def _upgrade(header: dict) -> dict:
    """A version-1 header as version 2 states it: ``qblock`` storage is ``nblock`` and the
    quaternion layers' table is written out (version 1 knew only ``real`` and ``quat``)."""
    header = json.loads(json.dumps(header))  # a copy
    for op in header.get("ops", []):
        storage = op.get("storage", {})
        if storage.get("layout") == "qblock":
            storage["layout"] = "nblock"
    header["algebras"] = {"quat": algebra_entry(QUATERNION)}
    return header


# -- writing and reading the file ------------------------------------------------------------------


def _digest(header: dict, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(_canonical({k: v for k, v in header.items() if k != "sha256"}))
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def pack(header: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file's entries: ``arrays`` plus the header, completed with ``format``, ``version``,
    ``arrays`` (each entry's dtype and shape) and the ``sha256`` of it all."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    header = {
        **header,
        "format": FORMAT,
        "version": VERSION,
        "arrays": {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrays.items()},
    }
    header["sha256"] = _digest(header, arrays)
    return {HEADER: np.frombuffer(_canonical(header), np.uint8), **arrays}


def save(path: str | os.PathLike, entries: dict[str, np.ndarray], overwrite: bool = False) -> int:
    """Write :func:`pack`'s entries to ``path`` atomically (:func:`qsparse.files.atomic_write`);
    an existing ``path`` is kept unless ``overwrite``. Returns the file's size in bytes;
    :class:`qsparse.files.WriteError` naming the file when it cannot be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (overwrite it explicitly)")
    files.atomic_write(path, lambda f: np.savez(f, **entries))
    return path.stat().st_size


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of an export file, every entry checked against the header's SHA-256 (a
    version-1 header upgraded as version 2 states it; its ``version`` still says 1);
    :class:`ExportFileError` naming the file when it cannot be read or is damaged."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            entries = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ExportFileError(f"export file {path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ExportFileError(
            f"cannot read export file {path} (damaged or truncated?): {type(e).__name__}: {e}"
        ) from None
    if HEADER not in entries:
        raise ExportFileError(f"{path} is not a qsparse export file: it has no {HEADER}")
    try:
        header = json.loads(entries.pop(HEADER).tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportFileError(f"export file {path}: damaged header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ExportFileError(f"{path} is not a qsparse export file (format {FORMAT!r})")
    if header.get("version") not in READS:
        raise ExportFileError(
            f"export file {path} has format version {header.get('version')!r}; this qsparse "
            f"reads versions {list(READS)}"
        )
    if header.get("sha256") != _digest(header, entries):
        raise ExportFileError(f"export file {path} is damaged: its content fails its SHA-256")
    return (_upgrade(header) if header["version"] == 1 else header), entries
