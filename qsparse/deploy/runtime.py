"""The numpy runtime of an export file: its layers and :class:`Model` (numpy; scipy for sparse).

The header's ops (:mod:`qsparse.ops`) run in order; encodings, max-pool, the flatten layouts and
the input normalisation are the array code the JAX models run too, and a quaternion kernel's
real block matrix comes from :data:`qsparse.algebras.QUATERNION`. How each layer computes
(``kernels``: ``csr``, ``bsr``, ``dense``) is described in ``docs/deployment.md``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np

from qsparse import ops
from qsparse.algebras import QUATERNION
from qsparse.deploy.format import (
    DTYPES,
    FORMAT,
    KERNELS,
    ExportFileError,
    decode_kernel,
    dense_kernel,
    read,
)

Forward = Callable[[np.ndarray], np.ndarray]


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


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0))


def _step(op: ops.Op) -> Forward:
    """The array function of an op without weights."""
    if isinstance(op, ops.Relu):
        return _relu
    if isinstance(op, ops.MaxPool2x2):
        return ops.max_pool_2x2
    if isinstance(op, ops.Flatten):
        return functools.partial(ops.flatten, layout=op.layout, n=op.n)
    return functools.partial(ops.ENCODINGS[op.encoding], n=op.n)


# -- sparse dense layers: W^T as a scipy matrix, applied as (W^T x^T)^T --------------------------


def _csr_real(shape, positions, values) -> Forward:
    from scipy import sparse

    n_in, n_out = shape
    i, o = np.divmod(positions, n_out)
    wt = sparse.csr_array((values, (o, i)), shape=(n_out, n_in), dtype=np.float32)
    return lambda x: (wt @ x.T).T


def _csr_quat(shape, positions, values) -> Forward:
    """Every stored component c at (i, o) placed in the real block matrix, once per block it
    signs."""
    from scipy import sparse

    _, q_in, q_out = shape
    c, rest = np.divmod(positions, q_in * q_out)
    i, o = np.divmod(rest, q_out)
    rows, cols, vals = [], [], []
    for b, a, cc, s in QUATERNION.left_terms:
        sel = c == cc
        rows.append(a * q_out + o[sel])
        cols.append(b * q_in + i[sel])
        vals.append(values[sel] if s > 0 else -values[sel])
    wt = sparse.csr_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(4 * q_out, 4 * q_in),
        dtype=np.float32,
    )
    return lambda x: (wt @ x.T).T


def _bsr_quat(shape, positions, values) -> Forward:
    """Block (o, i) of W^T, on features ordered quaternion by quaternion (``x_q[4 i + b] =
    x[b q_in + i]``), is the 4x4 real matrix of stored quaternion (i, o)."""
    from scipy import sparse

    _, q_in, q_out = shape
    i, o = np.divmod(positions, q_out)
    order = np.lexsort((i, o))
    i, o, values = i[order], o[order], values[order]
    blocks = np.empty((len(values), 4, 4), np.float32)
    for b, a, c, s in QUATERNION.left_terms:
        blocks[:, a, b] = values[:, c] if s > 0 else -values[:, c]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(o, minlength=q_out))])
    wt = sparse.bsr_array(
        (blocks, i, indptr), shape=(4 * q_out, 4 * q_in), blocksize=(4, 4), dtype=np.float32
    )

    def forward(x):
        xq = x.reshape(-1, 4, q_in).transpose(0, 2, 1).reshape(-1, 4 * q_in)
        y = (wt @ xq.T).T  # (batch, 4 q_out) quaternion by quaternion
        return y.reshape(-1, q_out, 4).transpose(0, 2, 1).reshape(-1, 4 * q_out)

    return forward


def _sparse(kind: str, storage: dict, shape, positions, values, blocks: bool) -> Forward:
    """The sparse product of a dense layer (bias not added): CSR of the real kernel, or of a
    quaternion kernel's real block matrix; with ``blocks``, a quaternion kernel stored as
    quaternion blocks runs as a BSR matrix of 4x4 Hamilton blocks instead."""
    layout = storage["layout"]
    if positions is None:  # stored dense: every position
        grid = shape[1:] if layout == "qblock" else shape
        positions = np.arange(int(np.prod(grid)))
    if kind == "real":
        return _csr_real(shape, positions, values)
    if layout == "qblock" and blocks:
        return _bsr_quat(shape, positions, values)
    if layout == "qblock":  # the blocks' components as elements
        n = int(np.prod(shape[1:]))
        positions = np.concatenate([c * n + positions for c in range(4)])
        values = values.T.ravel()
    return _csr_quat(shape, positions, values)


# -- layers and the model -----------------------------------------------------------------------


class _Layer:
    """A conv or dense op: its kernel decoded, its bias, and how it computes."""

    def __init__(self, op: ops.Dense | ops.Conv, entry: dict, arrays: dict, dtype: str, kernels):
        name, kind = op.name, op.kind
        self.name, self.kind, self.op = name, kind, op.op
        self.storage = entry["storage"]
        self.shape = shape = tuple(entry["kernel_shape"])
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
        rank = (4 if isinstance(op, ops.Conv) else 2) + (kind == "quat")
        if len(shape) != rank:
            raise ValueError(f"layer {name}: {op.op} kernel of shape {shape}")
        if isinstance(op, ops.Conv) and (op.padding != "SAME" or op.strides != (1, 1)):
            raise ValueError(f"layer {name}: only SAME padding and stride 1 are supported")
        if isinstance(op, ops.Dense) and kernels != "dense":
            product = _sparse(kind, self.storage, shape, positions, values, kernels == "bsr")
            self.forward = lambda x: product(x) + self.bias
            return
        dense = dense_kernel(self.storage, shape, positions, values)
        self.kernel = QUATERNION.left_matrix(dense) if kind == "quat" else dense
        self.forward = self._conv if isinstance(op, ops.Conv) else self._matmul

    def _matmul(self, x):
        return x @ self.kernel + self.bias

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
        self._scale = float(inp["scale"])
        self._mean = np.asarray(inp["mean"], np.float32)
        self._std = np.asarray(inp["std"], np.float32)
        if self._mean.shape != (self.input_shape[-1],) or self._std.shape != self._mean.shape:
            raise ValueError(f"mean/std do not match the {self.input_shape[-1]} input channels")
        self.layers: list[_Layer] = []
        self._steps: list[Forward] = []
        for entry in header["ops"]:
            op = ops.from_json(entry)
            if isinstance(op, ops.Dense | ops.Conv):
                self.layers.append(_Layer(op, entry, arrays, self.dtype, kernels))
                self._steps.append(self.layers[-1].forward)
            else:
                self._steps.append(_step(op))

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Raw pixels (uint8, or floats in [0, 255]) -> normalised float32, per channel."""
        images = np.asarray(images)
        if images.ndim == len(self.input_shape) and self.input_shape[-1] == 1:
            images = images[..., None]  # (N, H, W) grayscale
        if images.shape[1:] != self.input_shape:
            raise ValueError(
                f"images of shape {images.shape}; the model takes (N, {self.input_shape})"
            )
        return ops.normalize(images, self._mean, self._std, self._scale)

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
