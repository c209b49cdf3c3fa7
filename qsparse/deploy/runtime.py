"""The numpy runtime of an export file: its layers and :class:`Model` (numpy; scipy for sparse).

The header's ops (:mod:`qsparse.ops`) run in order; encodings, max-pool, the flatten layouts and
the input normalisation are the array code the JAX models run too. A layer of any algebra
computes with the real matrix :mod:`qsparse.deploy.matrices` builds from what the file stores
(its algebra's table, the layer's PHM rules, or the hashed tying's seed), so a file runs where
its algebra was never registered. How each layer computes (``kernels``: ``csr``, ``bsr``,
``dense``) is described in ``docs/deployment.md`` and shown by :meth:`Model.describe`.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from qsparse import ops
from qsparse.algebras import KINDS, Algebra
from qsparse.deploy.format import (
    DTYPES,
    FORMAT,
    KERNELS,
    ExportFileError,
    decode_kernel,
    dense_kernel,
    read,
)
from qsparse.deploy.matrices import (
    Forward,
    Structure,
    bsr_product,
    csr_product,
    element_positions,
    real_kernel,
)


def load(path: str | os.PathLike, *, kernels: str = "csr") -> Model:
    """The model of an export file, ready to :meth:`Model.predict`.

    ``kernels`` says how dense layers compute (convolutions are always dense): ``csr`` (sparse
    real matrices, a component kernel as its real block matrix), ``bsr`` (as ``csr``, but a
    kernel of an algebra with structure constants stored as ``nblock`` as one ``n x n`` block
    per stored number) or ``dense`` (the kernels rebuilt whole, BLAS matrix products).
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


# -- layers and the model -----------------------------------------------------------------------


def structure(op: ops.Dense | ops.Conv, entry: dict, algebras: dict, arrays: dict):
    """The :class:`~qsparse.deploy.matrices.Structure` of a layer (None for a real one) from the
    header's ``algebras`` entry of its kind: the stored table, the layer's ``phm_rules``, or its
    ``hash_seed``."""
    if op.kind == "real":
        return None
    if op.kind not in algebras:
        raise ValueError(f"algebra {op.kind!r} is not among the file's algebras {list(algebras)}")
    spec, n = algebras[op.kind], entry["kernel_shape"][0]
    if spec["n"] != n:
        raise ValueError(f"algebra {op.kind!r} has n={spec['n']}, the kernel {n} components")
    if spec["kind"] == "hashed":
        return Structure(n, hash_seed=int(op.hash_seed))
    if spec["kind"] == "phm":
        table = arrays.get(f"{op.name}/phm_rules")
        if table is None:
            raise ValueError("its phm_rules are missing")
    elif spec["kind"] == "table":
        table = np.asarray(spec["table"], np.float32)
    else:
        raise ValueError(f"algebra {op.kind!r} of kind {spec['kind']!r}; valid: {list(KINDS)}")
    table = np.asarray(table, np.float32)
    if table.shape != (n, n, n) or not np.all(np.isfinite(table)):
        raise ValueError(f"structure constants of shape {table.shape}, expected {(n,) * 3}")
    components = tuple(f"e{c}" for c in range(n))
    return Structure(n, Algebra(f"{op.kind} of {op.name}", components, table.copy()))


class _Layer:
    """A conv or dense op: its kernel decoded, its bias, and how it computes (``path``)."""

    def __init__(self, op: ops.Dense | ops.Conv, entry: dict, header: dict, arrays: dict, kernels):
        name, kind = op.name, op.kind
        self.name, self.kind, self.op = name, kind, op.op
        self.storage = entry["storage"]
        self.shape = shape = tuple(entry["kernel_shape"])
        parts = {
            k: arrays[f"{name}/{k}"] for k in ("values", "positions") if f"{name}/{k}" in arrays
        }
        try:
            positions, values = decode_kernel(self.storage, shape, parts, header["dtype"])
            self.structure = structure(op, entry, header.get("algebras", {}), arrays)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        if kind == "real" and self.storage["layout"] != "element":
            raise ValueError(f"layer {name}: a real kernel stored as {self.storage['layout']}")
        self.bias = np.asarray(arrays[f"{name}/bias"], np.float32)
        n_out = shape[-1] * (1 if kind == "real" else shape[0])
        if self.bias.shape != (n_out,):
            raise ValueError(f"layer {name}: bias of shape {self.bias.shape}, expected ({n_out},)")
        rank = (4 if isinstance(op, ops.Conv) else 2) + (kind != "real")
        if len(shape) != rank:
            raise ValueError(f"layer {name}: {op.op} kernel of shape {shape}")
        if isinstance(op, ops.Conv) and (op.padding != "SAME" or op.strides != (1, 1)):
            raise ValueError(f"layer {name}: only SAME padding and stride 1 are supported")
        self.path = self._path(op, kernels)
        if self.path != "dense":
            product = self._product(positions, values)
            self.forward = lambda x: product(x) + self.bias
            return
        dense = dense_kernel(self.storage, shape, positions, values)
        self.kernel = real_kernel(self.structure, dense)
        self.forward = self._conv if isinstance(op, ops.Conv) else self._matmul

    def _path(self, op, kernels: str) -> str:
        """``dense`` for convolutions and ``kernels="dense"``; ``bsr`` for ``nblock`` storage
        of a layer with structure constants; ``csr`` otherwise."""
        if isinstance(op, ops.Conv) or kernels == "dense":
            return "dense"
        blocks = self.storage["layout"] == "nblock"
        if kernels == "bsr" and blocks and self.structure.algebra is not None:
            return "bsr"
        return "csr"

    def _product(self, positions, values) -> Forward:
        """The sparse product (bias not added) of a dense op by :attr:`path`."""
        if self.path == "bsr":
            if positions is None:  # stored dense: every block
                positions = np.arange(int(np.prod(self.shape[1:])))
            return bsr_product(self.structure, self.shape, positions, values)
        positions, values = element_positions(self.storage, self.shape, positions, values)
        return csr_product(self.structure, self.shape, positions, values)

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
                self.layers.append(_Layer(op, entry, header, arrays, kernels))
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
        """What the file holds: provenance, its algebras, one line per layer (storage, density,
        bytes, and how it computes: ``csr``, ``bsr`` or ``dense``)."""
        h = self.header
        prov = h.get("provenance", {})
        lines = [
            f"{FORMAT} v{h['version']}, values {self.dtype}, input {list(self.input_shape)}, "
            f"{self.num_classes} classes",
            "provenance: " + ", ".join(f"{k}={prov[k]}" for k in sorted(prov) if k != "config"),
        ]
        kinds = {layer.kind for layer in self.layers} - {"real"}
        specs = h.get("algebras", {})
        lines += [f"algebra {k}: {specs[k]['kind']}, n={specs[k]['n']}" for k in sorted(kinds)]
        total = 0
        for layer in self.layers:
            s = layer.storage
            total += s["bytes"]
            lines.append(
                f"  {layer.name:12s} {layer.op:5s} {layer.kind:9s} {str(list(layer.shape)):22s} "
                f"{s['layout']}/{s['positions']}: {s['count']} stored, "
                f"{s['alive']}/{s['total']} weights alive, {s['bytes']} bytes, {layer.path}"
            )
        lines.append(f"kernel bytes {total}")
        return "\n".join(lines)
