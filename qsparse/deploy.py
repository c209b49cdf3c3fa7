r"""Pruned models as one self-contained file, and a small runtime that needs only numpy and scipy.

``python -m experiments.export`` writes a trained round of a run directory as one ``.npz`` file
(a zip: numpy-readable, with a CRC per entry and a SHA-256 of the whole content in its header);
:func:`load` reads it back and returns a :class:`Model` whose :meth:`Model.predict` takes raw
uint8 images and returns the trained model's logits::

    from qsparse import deploy

    model = deploy.load("lenet300_100_quat.npz")
    logits = model.predict(images)  # (N, 28, 28, 1) uint8 -> (N, 10) float32

This module imports numpy and scipy only (no jax, flax or TensorFlow), so it runs wherever those
two do; it also defines the file format, which the exporter writes through :func:`pack` and
:func:`save`. ``python -m qsparse.deploy FILE`` checks a file and prints what it holds.

**The file.** Entries (numpy arrays, keys below):

* ``header.json``: uint8 bytes of a JSON object (``format``, ``version``, ``dtype``, ``input``,
  ``num_classes``, ``ops``, ``arrays``, ``provenance``, ``sha256``). ``sha256`` is the SHA-256
  of the header without that field (canonical JSON) followed by every other entry (key, dtype,
  shape, bytes, in key order), so any damage is detected and named.
* ``<layer>/values``, ``<layer>/positions``, ``<layer>/bias`` for each layer op of ``ops``.

``input`` is the preprocessing: pixels (uint8, ``shape`` = (H, W, C)) are divided by ``scale``
(255), then per channel ``(x - mean) / std``, all in float32 (as :func:`qsparse.augment.normalize`).
``ops`` is the architecture, run in order on ``(batch, H, W, C)`` arrays:

* ``{"op": "encode", "encoding": e}``: quaternion input encoding, ``e`` in :data:`ENCODINGS`
  (``rgb_gray``: (R, G, B, gray); ``rgb_pure``: (0, R, G, B); ``gray_pure``: (0, x, x, x);
  ``none``), channels then component-blocked ``[r | i | j | k]``.
* ``{"op": "conv", "kind": "real" | "quat", "name", "kernel_shape", "strides", "padding",
  "storage"}``: a convolution (``SAME`` padding, stride 1) plus bias. Real kernels are HWIO;
  quaternion kernels are component kernels ``(4, kh, kw, c_in/4, c_out/4)`` acting on
  block-layout channels through the Hamilton product (weight on the left).
* ``{"op": "dense", "kind": "real" | "quat", "name", "kernel_shape", "storage"}``: ``x @ W + b``
  (real ``(n_in, n_out)``) or ``W ⊗ x + b`` (quaternion ``(4, n_in/4, n_out/4)``).
* ``{"op": "relu"}``, ``{"op": "maxpool2x2"}`` (2x2 windows, stride 2, odd edges dropped),
  ``{"op": "flatten", "layout": "flat" | "blocked"}`` (``flat``: a reshape in (H, W, C) order;
  ``blocked``: ``[all r | all i | all j | all k]`` for quaternion features).

**Storage of a kernel** (``storage``: ``layout``, ``positions``, ``count``, ``bytes``, ...), the
smallest in bytes (:func:`choose_storage`) of:

* ``layout`` ``element``: one position per stored real value, over the kernel array itself
  (quaternion kernels: over ``(4, ...)``, the component axis included); ``values`` ``(count,)``.
* ``layout`` ``qblock`` (quaternion kernels): one position per stored quaternion, over
  ``kernel_shape[1:]``; ``values`` ``(count, 4)`` holds its (r, i, j, k). A quaternion partly
  pruned (element grouping) is stored whole, its pruned components as zeros.
* ``positions`` ``dense``: every position, no ``positions`` entry; ``bitmask``: ``positions`` is
  ``numpy.packbits`` of the C-order boolean grid (big bit order, ``ceil(n / 8)`` bytes);
  ``indices``: ``positions`` holds the ascending C-order flat indices in the smallest unsigned
  type that holds ``n - 1`` (``index_dtype``).

Values are ``dtype`` (header): ``float32`` (``<f4``), ``float16`` (``<f2``) or ``bfloat16``
(``<u2``: the upper 16 bits of the float32, rounded to nearest even). Biases are always float32.

**Runtime.** Dense layers run sparse by default (``load(..., kernels="csr")``, scipy): a real
kernel as CSR, a quaternion kernel as CSR of its real block matrix (each stored component placed
4 times, signed by the Hamilton table). ``kernels="bsr"`` runs a quaternion kernel stored as
``qblock`` as BSR instead, one 4x4 block per stored quaternion (the Hamilton left matrix of its
four values; features reordered quaternion by quaternion); ``kernels="dense"`` rebuilds every
kernel whole. Convolutions run dense (kernels rebuilt from the stored values), as 9 shifted
matrix products. All arithmetic is float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "qsparse-deploy"
VERSION = 1
HEADER = "header.json"
DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
ENCODINGS = ("rgb_gray", "rgb_pure", "gray_pure", "none")
KERNELS = ("csr", "bsr", "dense")
LUMA = (0.2989, 0.587, 0.114)  # torchvision's Grayscale weights, as qsparse.quaternion

# HAMILTON[c, a, b]: the coefficient of w_c * x_b in (w ⊗ x)_a (qsparse.quaternion.HAMILTON,
# copied so that this module needs no jax).
HAMILTON = np.zeros((4, 4, 4), np.float32)
for _c, _a, _b, _s in [
    (0, 0, 0, 1),
    (1, 0, 1, -1),
    (2, 0, 2, -1),
    (3, 0, 3, -1),
    (1, 1, 0, 1),
    (0, 1, 1, 1),
    (3, 1, 2, -1),
    (2, 1, 3, 1),
    (2, 2, 0, 1),
    (3, 2, 1, 1),
    (0, 2, 2, 1),
    (1, 2, 3, -1),
    (3, 3, 0, 1),
    (2, 3, 1, -1),
    (1, 3, 2, 1),
    (0, 3, 3, 1),
]:
    HAMILTON[_c, _a, _b] = _s
# (input component b, output component a, weight component c, sign): the 16 non-zeros.
_TABLE = tuple(
    (b, a, c, int(HAMILTON[c, a, b]))
    for b in range(4)
    for a in range(4)
    for c in range(4)
    if HAMILTON[c, a, b]
)


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


def storage_candidates(mask: np.ndarray, quaternion: bool, itemsize: int) -> list[dict]:
    """Every way to store a kernel with this mask (``itemsize`` bytes per value), with its bytes.

    Real kernels: ``element`` positions. Quaternion kernels (component axis 0): ``qblock`` (one
    position per quaternion with any component alive, four values each) and ``element``.
    """
    mask = np.asarray(mask, bool)
    out = []
    if quaternion:
        out += _candidates(mask.any(axis=0), "qblock", 4 * itemsize)[1:]  # qblock/dense = element
    return out + _candidates(mask, "element", itemsize)


def choose_storage(mask: np.ndarray, quaternion: bool, itemsize: int) -> dict:
    """The candidate of :func:`storage_candidates` with the fewest bytes (the first on a tie)."""
    return min(storage_candidates(mask, quaternion, itemsize), key=lambda s: s["bytes"])


def encode_kernel(
    kernel: np.ndarray, mask: np.ndarray, quaternion: bool, dtype: str = "float32"
) -> tuple[dict, dict[str, np.ndarray]]:
    """(storage, {"values", "positions"?}): the kernel's surviving values, smallest storage."""
    kernel = np.asarray(kernel, np.float32)
    mask = np.asarray(mask, bool)
    if kernel.shape != mask.shape:
        raise ValueError(f"kernel {kernel.shape} and mask {mask.shape} differ in shape")
    if quaternion and (kernel.ndim < 3 or kernel.shape[0] != 4):
        raise ValueError(f"a quaternion kernel has 4 components on axis 0, got {kernel.shape}")
    storage = choose_storage(mask, quaternion, np.dtype(DTYPES[dtype]).itemsize)
    storage.update(alive=int(np.count_nonzero(mask)), total=int(mask.size))
    kernel = np.where(mask, kernel, np.float32(0))
    if storage["layout"] == "qblock":
        grid = mask.any(axis=0)
        values = np.moveaxis(kernel, 0, -1)[grid]  # (count, 4)
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

    Positions index ``kernel_shape`` (``element``) or ``kernel_shape[1:]`` (``qblock``, values
    ``(count, 4)``). Raises ValueError saying what does not fit.
    """
    layout, kind, count = storage["layout"], storage["positions"], storage["count"]
    grid = tuple(kernel_shape[1:]) if layout == "qblock" else tuple(kernel_shape)
    n = int(np.prod(grid))
    if layout not in ("element", "qblock") or kind not in ("dense", "bitmask", "indices"):
        raise ValueError(f"unknown storage {layout}/{kind}")
    values = arrays["values"]
    want = (count, 4) if layout == "qblock" else (count,)
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
    if storage["layout"] == "qblock":
        grid = np.zeros((int(np.prod(kernel_shape[1:])), 4), np.float32)
        grid[slice(None) if positions is None else positions] = values
        return np.moveaxis(grid.reshape(*kernel_shape[1:], 4), -1, 0)
    flat = np.zeros(int(np.prod(kernel_shape)), np.float32)
    flat[slice(None) if positions is None else positions] = values
    return flat.reshape(kernel_shape)


def left_matrix(qkernel: np.ndarray) -> np.ndarray:
    """A component kernel ``(4, ..., n_in, n_out)`` as its real block kernel
    ``(..., 4 n_in, 4 n_out)`` on block-layout features (``qsparse.quaternion.left_matrix``)."""
    *lead, n_in, n_out = qkernel.shape[1:]
    real = np.empty((*lead, 4, n_in, 4, n_out), np.float32)
    for b, a, c, s in _TABLE:
        real[..., b, :, a, :] = qkernel[c] if s > 0 else -qkernel[c]
    return real.reshape(*lead, 4 * n_in, 4 * n_out)


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
    """Write :func:`pack`'s entries to ``path`` atomically (a temporary file, then a rename);
    an existing ``path`` is kept unless ``overwrite``. Returns the file's size in bytes."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (overwrite it explicitly)")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of an export file, every entry checked against the header's SHA-256;
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
    if header.get("version") != VERSION:
        raise ExportFileError(
            f"export file {path} has format version {header.get('version')!r}; this qsparse "
            f"reads version {VERSION}"
        )
    if header.get("sha256") != _digest(header, entries):
        raise ExportFileError(f"export file {path} is damaged: its content fails its SHA-256")
    return header, entries


def load(path: str | os.PathLike, *, kernels: str = "csr") -> Model:
    """The model of an export file, ready to :meth:`Model.predict`.

    ``kernels`` says how dense layers compute (convolutions are always dense): ``csr`` (sparse
    real matrices, a quaternion kernel as its real block matrix), ``bsr`` (as ``csr``, but a
    quaternion kernel stored as quaternion blocks as 4x4 Hamilton blocks) or ``dense`` (the
    kernels rebuilt whole, BLAS matrix products).
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not valid; choose one of {list(KERNELS)}")
    header, arrays = read(path)
    try:
        return Model(header, arrays, kernels=kernels)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ExportFileError(f"export file {path}: {type(e).__name__}: {e}") from None


# -- the runtime ---------------------------------------------------------------------------------


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0))


def _maxpool2x2(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _flatten(layout: str):
    if layout == "flat":
        return lambda x: x.reshape(x.shape[0], -1)
    if layout == "blocked":
        return lambda x: (
            x.reshape(*x.shape[:-1], 4, x.shape[-1] // 4)
            .transpose(0, x.ndim - 1, *range(1, x.ndim - 1), x.ndim)
            .reshape(x.shape[0], -1)
        )
    raise ValueError(f"unknown flatten layout {layout!r}")


def _encode(name: str):
    def gray(x):
        g = np.float32(LUMA[0]) * x[..., 0:1]
        g = g + np.float32(LUMA[1]) * x[..., 1:2]
        return g + np.float32(LUMA[2]) * x[..., 2:3]

    def channels(x, n):
        if x.shape[-1] != n:
            raise ValueError(f"encoding {name!r} needs {n} input channel(s), got {x.shape[-1]}")
        return x

    if name == "rgb_gray":
        return lambda x: np.concatenate([channels(x, 3), gray(x)], axis=-1)
    if name == "rgb_pure":
        return lambda x: np.concatenate([np.zeros_like(x[..., :1]), channels(x, 3)], axis=-1)
    if name == "gray_pure":
        return lambda x: np.concatenate([np.zeros_like(x), *[channels(x, 1)] * 3], axis=-1)
    if name == "none":
        return lambda x: x
    raise ValueError(f"unknown encoding {name!r}; valid: {list(ENCODINGS)}")


class _Layer:
    """A conv or dense op: its kernel decoded, its bias, and how it computes."""

    def __init__(self, op: dict, arrays: dict[str, np.ndarray], dtype: str, kernels: str):
        name, kind = op["name"], op["kind"]
        if kind not in ("real", "quat"):
            raise ValueError(f"{name}: unknown kind {kind!r}")
        self.name, self.kind, self.op = name, kind, op["op"]
        self.storage = op["storage"]
        shape = tuple(op["kernel_shape"])
        parts = {
            k: arrays[f"{name}/{k}"] for k in ("values", "positions") if f"{name}/{k}" in arrays
        }
        try:
            positions, values = decode_kernel(self.storage, shape, parts, dtype)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        if kind == "real" and self.storage["layout"] != "element":
            raise ValueError(f"layer {name}: a real kernel stored as {self.storage['layout']}")
        self.bias = np.asarray(arrays[f"{name}/bias"], np.float32)
        n_out = shape[-1] * (4 if kind == "quat" else 1)
        if self.bias.shape != (n_out,):
            raise ValueError(f"layer {name}: bias of shape {self.bias.shape}, expected ({n_out},)")
        self.shape = shape
        dense = dense_kernel(self.storage, shape, positions, values)
        if self.op == "conv":
            if len(shape) != (5 if kind == "quat" else 4):
                raise ValueError(f"layer {name}: conv kernel of shape {shape}")
            if op.get("padding", "SAME") != "SAME" or tuple(op.get("strides", (1, 1))) != (1, 1):
                raise ValueError(f"layer {name}: only SAME padding and stride 1 are supported")
            self.kernel = left_matrix(dense) if kind == "quat" else dense  # (kh, kw, in, out)
            self.forward = self._conv
        elif self.op == "dense":
            if len(shape) != (3 if kind == "quat" else 2):
                raise ValueError(f"layer {name}: dense kernel of shape {shape}")
            if kernels == "dense":
                self.kernel = left_matrix(dense) if kind == "quat" else dense
                self.forward = self._matmul
            else:
                self.forward = self._sparse_setup(positions, values, kernels == "bsr")
        else:
            raise ValueError(f"unknown layer op {self.op!r}")

    # dense layers

    def _matmul(self, x):
        return x @ self.kernel + self.bias

    def _sparse_setup(self, positions, values, blocks: bool):
        """The sparse product of this dense layer: CSR of the real kernel, or of a quaternion
        kernel's real block matrix; with ``blocks``, a quaternion kernel stored as quaternion
        blocks runs as a BSR matrix of 4x4 Hamilton blocks instead."""
        from scipy import sparse

        shape = self.shape
        layout = self.storage["layout"]
        if positions is None:  # stored dense: every position
            grid = shape[1:] if layout == "qblock" else shape
            positions = np.arange(int(np.prod(grid)))
        if layout == "qblock" and not blocks:  # the blocks' components as elements
            n = int(np.prod(shape[1:]))
            positions = np.concatenate([c * n + positions for c in range(4)])
            values, layout = values.T.ravel(), "element"
        if self.kind == "real":
            n_in, n_out = shape
            i, o = np.divmod(positions, n_out)
            wt = sparse.csr_array((values, (o, i)), shape=(n_out, n_in), dtype=np.float32)
            return lambda x: (wt @ x.T).T + self.bias
        _, q_in, q_out = shape
        if layout == "element":
            # every stored component c at (i, o) appears 4 times in the real block matrix
            c, rest = np.divmod(positions, q_in * q_out)
            i, o = np.divmod(rest, q_out)
            rows, cols, vals = [], [], []
            for b, a, cc, s in _TABLE:
                sel = c == cc
                rows.append(a * q_out + o[sel])
                cols.append(b * q_in + i[sel])
                vals.append(values[sel] if s > 0 else -values[sel])
            wt = sparse.csr_array(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                shape=(4 * q_out, 4 * q_in),
                dtype=np.float32,
            )
            return lambda x: (wt @ x.T).T + self.bias
        # qblock: block (o, i) of W^T, on features ordered quaternion by quaternion
        # (x_q[4 i + b] = x[b q_in + i]), is T[a, b] = sign * w[c] for the Hamilton table
        i, o = np.divmod(positions, q_out)
        order = np.lexsort((i, o))
        i, o, values = i[order], o[order], values[order]
        blocks = np.empty((len(values), 4, 4), np.float32)
        for b, a, c, s in _TABLE:
            blocks[:, a, b] = values[:, c] if s > 0 else -values[:, c]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(o, minlength=q_out))])
        wt = sparse.bsr_array(
            (blocks, i, indptr), shape=(4 * q_out, 4 * q_in), blocksize=(4, 4), dtype=np.float32
        )

        def forward(x):
            xq = x.reshape(-1, 4, q_in).transpose(0, 2, 1).reshape(-1, 4 * q_in)
            y = (wt @ xq.T).T  # (batch, 4 q_out) quaternion by quaternion
            return y.reshape(-1, q_out, 4).transpose(0, 2, 1).reshape(-1, 4 * q_out) + self.bias

        return forward

    # convolutions

    def _conv(self, x):
        """SAME 3x3 (any odd kernel) convolution, stride 1, as a sum of shifted products."""
        kh, kw, c_in, c_out = self.kernel.shape
        if x.shape[-1] != c_in:
            raise ValueError(f"layer {self.name}: input has {x.shape[-1]} channels, not {c_in}")
        n, h, w, _ = x.shape
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        xp = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
        y = np.zeros((n * h * w, c_out), np.float32)
        for dy in range(kh):
            for dx in range(kw):
                patch = xp[:, dy : dy + h, dx : dx + w].reshape(-1, c_in)
                y += patch @ self.kernel[dy, dx]
        return y.reshape(n, h, w, c_out) + self.bias


class Model:
    """An exported model: :meth:`predict` maps raw images to logits with numpy (and scipy)."""

    def __init__(self, header: dict, arrays: dict[str, np.ndarray], *, kernels: str = "csr"):
        if kernels not in KERNELS:
            raise ValueError(f"kernels={kernels!r} is not valid; choose one of {list(KERNELS)}")
        self.header = header
        self.dtype = header["dtype"]
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        inp = header["input"]
        self.input_shape = tuple(int(s) for s in inp["shape"])
        self.num_classes = int(header["num_classes"])
        self._scale = np.float32(inp["scale"])
        self._mean = np.asarray(inp["mean"], np.float32)
        self._std = np.asarray(inp["std"], np.float32)
        if self._mean.shape != (self.input_shape[-1],) or self._std.shape != self._mean.shape:
            raise ValueError(f"mean/std do not match the {self.input_shape[-1]} input channels")
        self.layers: list[_Layer] = []
        self._steps = []
        for op in header["ops"]:
            kind = op["op"]
            if kind in ("conv", "dense"):
                layer = _Layer(op, arrays, self.dtype, kernels)
                self.layers.append(layer)
                self._steps.append(layer.forward)
            elif kind == "relu":
                self._steps.append(_relu)
            elif kind == "maxpool2x2":
                self._steps.append(_maxpool2x2)
            elif kind == "flatten":
                self._steps.append(_flatten(op["layout"]))
            elif kind == "encode":
                self._steps.append(_encode(op["encoding"]))
            else:
                raise ValueError(f"unknown op {kind!r}")

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Raw pixels (uint8, or floats in [0, 255]) -> normalised float32, per channel."""
        images = np.asarray(images)
        if images.ndim == len(self.input_shape) and self.input_shape[-1] == 1:
            images = images[..., None]  # (N, H, W) grayscale
        if images.shape[1:] != self.input_shape:
            raise ValueError(
                f"images of shape {images.shape}; the model takes (N, {self.input_shape})"
            )
        x = images.astype(np.float32) / self._scale
        return (x - self._mean) / self._std

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits ``(N, num_classes)`` float32 of raw ``(N, H, W, C)`` images."""
        x = self.preprocess(images)
        out = [self._forward(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        if not out:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        for step in self._steps:
            x = step(x)
        return x

    def describe(self) -> str:
        """What the file holds: provenance, one line per layer (storage, density, bytes)."""
        h = self.header
        prov = h.get("provenance", {})
        lines = [
            f"{FORMAT} v{h['version']}, values {self.dtype}, input {list(self.input_shape)}, "
            f"{self.num_classes} classes",
            "provenance: " + ", ".join(f"{k}={prov[k]}" for k in sorted(prov) if k != "config"),
        ]
        total = 0
        for layer in self.layers:
            s = layer.storage
            total += s["bytes"]
            lines.append(
                f"  {layer.name:10s} {layer.op:5s} {layer.kind:4s} {str(list(layer.shape)):22s} "
                f"{s['layout']}/{s['positions']}: {s['count']} stored, "
                f"{s['alive']}/{s['total']} weights alive, {s['bytes']} bytes"
            )
        lines.append(f"kernel bytes {total}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m qsparse.deploy FILE...``: check each export file and describe it; a file
    that cannot be read is one ``error:`` line and status 2."""
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a.startswith("-") for a in args):
        sys.stderr.write("error: usage: python -m qsparse.deploy EXPORT_FILE...\n")
        return 2
    for path in args:
        try:
            model = load(path)
        except ExportFileError as e:
            sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
            return 2
        print(f"{path}: {Path(path).stat().st_size} bytes")
        print(model.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
