"""The numpy runtime of an export file: its layers and :class:`Model` (sparse products: numba's
kernels where installed, scipy's otherwise).

The header's ops (:mod:`qsparse.ops`) run in order (a residual op: its two op lists, added);
encodings, the pools, the flatten layouts and the input normalisation are the array code the JAX
models run too, a batch norm op its stored affine map (:mod:`qsparse.deploy.batchnorm`). A layer
of any algebra computes with the real matrix :mod:`qsparse.deploy.matrices` builds from what the
file stores (its algebra's table, the layer's PHM rules, or the hashed tying's seed), so a file
runs where its algebra was never registered. How each layer computes (``kernels``: ``auto``,
``csr``, ``bsr``, ``dense``; ``auto`` by the cost rule :func:`sparse_wins`) is described in
``docs/deployment.md`` and shown by :meth:`Model.describe`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from qsparse import ops
from qsparse.algebras import KINDS, Algebra
from qsparse.deploy import batchnorm as bn_lib
from qsparse.deploy import kernels as kernels_lib
from qsparse.deploy import planes as planes_lib
from qsparse.deploy.format import DTYPES, FORMAT, ExportFileError, decode_kernel, dense_kernel, read
from qsparse.deploy.kernels import im2col
from qsparse.deploy.matrices import (
    Forward,
    Structure,
    block_product,
    bsr_product,
    chain_arguments,
    component_product,
    csr_product,
    element_positions,
    real_entries,
    real_kernel,
    real_shape,
    relu_in_place,
)

KERNELS = ("auto", "csr", "bsr", "dense")  # how layers compute: load(path, kernels=...)


def load(path: str | os.PathLike, *, kernels: str = "auto", threads: int | None = None) -> Model:
    """The model of an export file, ready to :meth:`Model.predict`.

    ``kernels`` says how layers (dense and convolutions) compute: ``auto`` (per layer and batch,
    dense BLAS or the sparse kernel below, by :func:`sparse_wins`), ``csr`` (CSR of the real
    matrix), ``bsr`` (a kernel of an algebra with structure constants stored as ``nblock``: one
    ``n x n`` block per stored number; element-stored kernels of a table of single signed
    components: each stored component feeding its ``n`` outputs; others ``csr``) or ``dense``
    (the kernels rebuilt whole, BLAS). The sparse products are numba's where it imports
    (``threads`` cores, None: all), scipy's otherwise.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not valid; choose one of {list(KERNELS)}")
    kernels_lib.set_threads(threads)
    header, arrays = read(path)
    try:
        return Model(header, arrays, kernels=kernels)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ExportFileError(f"export file {path}: {type(e).__name__}: {e}") from None


def _relu(x):
    if isinstance(x, planes_lib.Planes):  # the rings stay zero
        return dataclasses.replace(x, data=np.maximum(x.data, np.float32(0)))
    return np.maximum(x, np.float32(0))


def _max_pool(x):
    if isinstance(x, planes_lib.Planes):
        return planes_lib.max_pool(x)
    return ops.max_pool_2x2(x)


# Layouts of the activations between steps: ``rows`` (batch first: NHWC, or (batch, features)),
# ``columns`` ((features, batch), the batch contiguous: dense layers' sparse and BLAS products),
# ``planes`` (:class:`qsparse.deploy.planes.Planes`: direct sparse convolutions).
ROWS, COLUMNS, PLANES = "rows", "columns", "planes"


def _convert(x, have: str, want: str):
    """``x`` from layout ``have`` to ``want``."""
    if have == PLANES:
        x, have = planes_lib.from_planes(x), ROWS
    if have == want:
        return x
    if want == PLANES:
        return planes_lib.to_planes(x)
    return np.ascontiguousarray(x.T)  # rows <-> columns


def _run(steps: list, x, layout: str = ROWS, visit: Callable | None = None) -> np.ndarray:
    """Steps in order, each given ``x`` in the layout it takes (``(step, layout)``; None: any),
    ``x`` converted where that changes; ``layout``: how ``x`` comes. The result as rows.
    ``visit(step, x)``, where given, sees each step's input before it runs."""
    for step, wants in steps:
        if wants == PLANES and layout == ROWS and len(x) < DIRECT_MIN_BATCH:
            wants = ROWS  # few images: the dense convolution costs less than laying out planes
        if wants is not None and wants != layout:
            x, layout = _convert(x, layout, wants), wants
        if visit is not None:
            visit(step, x)
        x = step(x)
    return _convert(x, layout, ROWS)


def _residual(body: list, shortcut: list, x: np.ndarray) -> np.ndarray:
    """The :class:`~qsparse.ops.Residual` op: both branches on ``x``, added."""
    return _run(body, x) + _run(shortcut, x)


def _step(op: ops.Op) -> Forward:
    """The array function of an op without weights."""
    if isinstance(op, ops.Relu):
        return _relu
    if isinstance(op, ops.MaxPool2x2):
        return _max_pool
    if isinstance(op, ops.Flatten):
        return functools.partial(ops.flatten, layout=op.layout, n=op.n)
    if isinstance(op, ops.AvgPool):
        return ops.avg_pool
    return functools.partial(ops.ENCODINGS[op.encoding], n=op.n)


# -- layers and the model -----------------------------------------------------------------------


def _one_column(product: tuple[Forward, int], matvec: Forward) -> tuple[Forward, int]:
    """``product`` (and its multiply-adds) on many columns, ``matvec`` on one (numba's
    one-core matrix-vector kernels: :func:`~qsparse.deploy.kernels.csr_matvec`,
    :func:`~qsparse.deploy.kernels.block_matvec`)."""
    many = product[0]

    def forward(x, relu=False):
        return (matvec if x.shape[1] == 1 else many)(x, relu)

    for arrays in ("csr", "blocks"):  # for kernels.chain_matvec
        if hasattr(matvec, arrays):
            setattr(forward, arrays, getattr(matvec, arrays))
    return forward, product[1]


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


# -- dispatch: dense BLAS or a sparse kernel, per layer and number of columns ------------------
# A sparse product runs its multiply-adds at a lower rate than BLAS runs a dense product's, so it
# wins below a break-even density (its multiply-adds / the dense product's), one for each band of
# columns: one (numba's one-core matrix-vector kernels and the one-image chain), a few (2 to
# MANY_COLUMNS - 1: the many-column kernels, whose start-up, numba's threads woken, costs as much as
# a small dense product) and many. A dense layer has one column per image; a convolution one per
# output position of each image. Measured with experiments.bench_deploy on LeNet-300-100
# (results/bench_deploy_cpu.md on the development machine; batches 1-256 at 2-90 % on the AMD EPYC):
# CSR (numba) wins from 20 % down at 256 columns, from 7-8 % at one and at 2-15 (level at 2-4
# columns near 5-10 %); scipy's from 5 % at 256 and 2 % at one. Numbers stored whole, n = 4
# (block_matvec, the chain, block_matmul: a block's 16 entries in registers, its sums packed in
# vectors by the SLP vectoriser): one column beats BLAS up to 70 % (0.016-0.026 ms against
# 0.034-0.06 at 30 %, 0.022-0.039 at 50 %, level at 90 %); 2-4 columns level near 14 %, 8 ahead at
# 30 %; 16 ahead at 30 % (0.111 against 0.155 ms) and level at 50 %; 64 and 256 ahead up to 70 %.
# Other n and element-stored components (hyper_matmul, which passes over the columns once per
# block entry): at 2-4 columns level at 2 % (complex), behind at 5 %; 16 behind at 10 %; 256 level
# near 20 %; one column (the chain, n = 2 unrolled; CSR for components) as CSR or better (complex:
# 2x BLAS at 10 %, level at 30 %).
MANY_COLUMNS = 16
BREAK_EVEN = {  # rule: break-even density at (1 column, 2 to MANY_COLUMNS - 1, MANY_COLUMNS on)
    "numba": (0.08, 0.06, 0.15),  # CSR
    "hyper": (0.08, 0.02, 0.15),  # components stored alone (one column: CSR)
    "blocks": (0.2, 0.02, 0.1),  # numbers stored whole, n other than 4
    "blocks4": (0.5, 0.1, 0.4),  # n = 4 (quaternion, tessarine, Klein four)
    "scipy": (0.03, 0.03, 0.06),
}


def band(columns: int) -> int:
    """The :data:`BREAK_EVEN` band of ``columns`` columns: 0 (one), 1 (a few), 2 (many)."""
    return 0 if columns == 1 else 1 if columns < MANY_COLUMNS else 2


# A convolution on planes (qsparse.deploy.planes: 3x3 or smaller, stride 1, SAME, numba) beats the
# dense one below this density; others stay dense with auto (im2col's copies cost more than the
# skipped multiply-adds in every measurement, results/bench_deploy_conv4_cpu.md). Against the
# dense patches product (_Layer._conv), each Conv-4 layer alone on the AMD EPYC: at batch 64
# planes win at 30 % in every layer and break even near 45 %; at batch 16 the 16x16 layers break
# even between 20 and 30 %, the 32x32 ones near 45 %.
DIRECT_BREAK_EVEN = 0.3
DIRECT_MIN_BATCH = 8  # fewer images: dense, planes' tiles then are too few to split across cores
# OpenBLAS runs a product of fewer multiply-adds than this on the calling thread alone (its
# SMP_THRESHOLD_MIN x GEMM_MULTITHREAD_THRESHOLD): only larger ones wake the threads that spin.
BLAS_THREADED = 65536 * 4
# A layer that auto runs by BLAS at one column (or at every batch) still joins the one-image
# chain where its dense product is smaller than this (LeNet-300-100's 100x10 output layer: the
# quaternion model at 13.8 % of its weights took 20 us an image with that layer by BLAS and 12-14
# us in the chain).
CHAIN_DENSE_MAX = 4096
DESCRIBED_BATCH = 256  # describe() names the mixing batch sizes up to this one
PATCH_BYTES = 1 << 20  # a dense convolution's patches per BLAS product (1 MiB: fastest of 1-16)
# A dense convolution of at most this many taps (kh kw C: 3x3 on up to 4 channels, a first
# convolution) goes on planes at any density where the next convolution is on them
# (Model._few_taps_follow_planes): on one channel at full density planes took 1.7 ms (64 images
# of 28x28, 64 outputs, 2 cores) where BLAS's patches product and laying its output out as planes
# took 1.6 + 2.1 ms; and BLAS's threads then leave numba both cores (Model.mixes_engines).
FEW_TAPS = 36


def sparse_wins(density: float, columns: int, rule: str) -> bool:
    """The cost rule: a sparse product of ``density`` on ``columns`` columns beats dense BLAS."""
    return density < BREAK_EVEN[rule][band(columns)]


class _Layer:
    """A conv or dense op: its kernel decoded, its bias, and how it computes (``path``; with
    ``kernels="auto"`` dense BLAS instead where :func:`sparse_wins` says no). ``hw``: a
    convolution's input (H, W); :attr:`hw` its output's."""

    def __init__(self, op, entry: dict, header: dict, arrays: dict, kernels: str, hw=None):
        self.name, self.kind, self.op, self.folded = op.name, op.kind, op.op, ""
        self.storage, self.shape = entry["storage"], tuple(entry["kernel_shape"])
        self.conv, self.columns = isinstance(op, ops.Conv), 1  # columns per image
        name, shape = self.name, self.shape
        if self.conv:
            self._geometry(op, hw)
        parts = {
            k: arrays[f"{name}/{k}"] for k in ("values", "positions") if f"{name}/{k}" in arrays
        }
        try:
            positions, values = decode_kernel(self.storage, shape, parts, header["dtype"])
            self.structure = structure(op, entry, header.get("algebras", {}), arrays)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        self._check(op, arrays)
        self.small = np.prod(real_shape(self.structure, shape)) < CHAIN_DENSE_MAX
        self.choice, self.path = kernels, self._path(kernels)
        self.engine, self.density, self.relu = "blas", 1.0, False
        self._stored, self._raw, self.direct = (positions, values), None, False
        if self.path != "dense" and self._direct(kernels):
            pass  # a direct sparse convolution on planes
        elif self.path != "dense":
            self._sparse, macs = self._product(positions, values, self.bias)
            self.density = macs / float(np.prod(real_shape(self.structure, shape)))
            wins = [sparse_wins(self.density, c, self.rule) for c in self._reachable()]
            # a small layer keeps its sparse product for the one-image chain (CHAIN_DENSE_MAX)
            small = self.engine == "numba" and self.small
            # convolutions not on planes: im2col's copies cost more than the sparse product saved
            # in every measurement (results/bench_deploy_conv4_cpu.md), so auto keeps them dense
            if kernels == "auto" and (self.conv or not (any(wins) or small)):
                self.path, self._sparse = "dense", None  # dense at every batch
        if self.path == "dense" or kernels == "auto":
            dense = dense_kernel(self.storage, shape, positions, values)
            self.kernel = real_kernel(self.structure, dense)
            if not self.conv:
                self._kt = np.ascontiguousarray(self.kernel.T)
        dense = self.path == "dense"
        auto = kernels == "auto" and not dense
        self._dense = tuple(  # per band of columns (band()): decided once, not per call
            dense or (auto and not self.direct and not sparse_wins(self.density, c, self.rule))
            for c in (1, 2, MANY_COLUMNS)
        )

    def _direct(self, kernels: str) -> bool:
        """Whether the layer is a convolution computed directly on planes
        (:mod:`qsparse.deploy.planes`: ``auto``, numba, a geometry planes take, under
        :data:`DIRECT_BREAK_EVEN`); sets it up if so."""
        if not (self.conv and kernels == "auto" and kernels_lib.AVAILABLE):
            return False
        if not planes_lib.supported(self.shape, self.pads, self.strides):
            return False
        entries = self._real_entries()
        if len(entries[2]) >= DIRECT_BREAK_EVEN * np.prod(real_shape(self.structure, self.shape)):
            return False
        self._on_planes(entries)
        return True

    def _real_entries(self) -> tuple:
        positions, values = element_positions(self.storage, self.shape, *self._stored)
        return real_entries(self.structure, self.shape, positions, values)

    def _on_planes(self, entries: tuple) -> None:
        rows, cols, vals = entries
        m, k = real_shape(self.structure, self.shape)
        self.direct, self.path, self.engine = True, "direct", "numba"
        self.density = len(vals) / float(m * k)
        self._taps = planes_lib.taps(rows, cols, vals, self.shape, self.hw[1], self.c_in, m)

    @property
    def few_taps(self) -> bool:
        """A dense convolution ``auto`` may put on planes at any density (:data:`FEW_TAPS`, a
        geometry planes take, numba): :meth:`Model._few_taps_follow_planes`."""
        if not (self.conv and self.path == "dense" and self.choice == "auto"):
            return False
        few = np.prod(self.shape[-4:-2]) * self.c_in <= FEW_TAPS and kernels_lib.AVAILABLE
        return few and planes_lib.supported(self.shape, self.pads, self.strides)

    def to_planes(self) -> None:
        """Run on planes at any batch that lays them out (:data:`DIRECT_MIN_BATCH`)."""
        self._on_planes(self._real_entries())
        self._dense = (False, False, False)

    def _check(self, op, arrays: dict) -> None:
        name, shape, kind = self.name, self.shape, self.kind
        if kind == "real" and self.storage["layout"] != "element":
            raise ValueError(f"layer {name}: a real kernel stored as {self.storage['layout']}")
        n_out = shape[-1] * (1 if kind == "real" else shape[0])
        has_bias = getattr(op, "bias", True)
        self.bias = np.asarray(arrays[f"{name}/bias"] if has_bias else np.zeros(n_out), np.float32)
        if self.bias.shape != (n_out,):
            raise ValueError(f"layer {name}: bias of shape {self.bias.shape}, expected ({n_out},)")
        self.c_in = shape[-2] * (1 if kind == "real" else shape[0])  # real features, channels
        if len(shape) != (4 if self.conv else 2) + (kind != "real"):
            raise ValueError(f"layer {name}: {op.op} kernel of shape {shape}")

    def _geometry(self, op: ops.Conv, hw) -> None:
        """Zeros, strides, the output's (H, W) and the columns per image of a convolution."""
        self.folded = op.folded
        self.pads, self.strides = ops.conv_pads(op, *self.shape[-4:-2]), tuple(op.strides)
        kh, kw = self.shape[-4:-2]
        (pt, pb), (pl, pr) = self.pads
        sh, sw = self.strides
        self.hw = ((hw[0] + pt + pb - kh) // sh + 1, (hw[1] + pl + pr - kw) // sw + 1)
        if min(self.hw) < 1 or min(self.strides) < 1:
            raise ValueError(f"layer {self.name}: strides {op.strides} on (H, W) {hw}")
        self.columns = self.hw[0] * self.hw[1]

    def _path(self, kernels: str) -> str:
        """``dense`` for ``kernels="dense"``; ``bsr`` for ``nblock`` storage of a layer with
        structure constants; ``hyper`` for element storage of a table of single signed
        components (numba; ``auto`` or ``bsr``); ``csr`` otherwise (``auto`` may still choose
        dense BLAS, :func:`sparse_wins`)."""
        if kernels == "dense":
            return "dense"
        algebra = self.structure and self.structure.algebra
        if kernels == "csr" or algebra is None:
            return "csr"
        signed = algebra.signed_blocks and kernels_lib.AVAILABLE
        if self.storage["layout"] == "nblock":
            return "bsr" if kernels == "bsr" or signed else "csr"
        return "hyper" if signed else "csr"

    def _product(self, positions, values, bias) -> tuple[Forward, int]:
        """The sparse product on columns (``bias`` added) by :attr:`path`, and its multiply-adds
        per column; sets :attr:`engine` (``numba`` or ``scipy``)."""
        s, shape = self.structure, self.shape
        numba = kernels_lib.AVAILABLE
        self.engine = "numba" if numba else "scipy"
        if self.path == "bsr":
            if positions is None:  # stored dense: every block
                positions = np.arange(int(np.prod(shape[1:])))
            self.engine = "numba" if numba and s.algebra.signed_blocks else "scipy"
            product = bsr_product(s, shape, positions, values, bias)
            if self.engine == "scipy" or hasattr(product[0], "blocks"):  # n = 4: one kernel pair
                return product
            return _one_column(product, block_product(s, shape, positions, values, bias))
        positions, values = element_positions(self.storage, shape, positions, values)
        if self.path == "hyper":  # one column: CSR (the kernel's loops over columns cost more)
            matvec = csr_product(s, shape, positions, values, bias)[0]
            return _one_column(component_product(s, shape, positions, values, bias), matvec)
        return csr_product(s, shape, positions, values, bias)

    def fold_input(self, a: np.float32, b: np.float32) -> None:
        """A second sparse product, :meth:`forward_raw`'s, for raw uint8 columns ``u`` of a
        dense layer whose input is ``u a + b``: ``W^T (u a + b) = (a W)^T u + b W^T 1``, the
        scale folded into the stored values and the shift into the bias (numba's kernels read
        the bytes directly: no float copy of the images)."""
        if self.path == "dense" or self.engine != "numba" or self.conv:
            return
        positions, values = self._stored
        shift = self._sparse(np.ones((self.c_in, 1), np.float32))[:, 0] - self.bias
        bias = (self.bias + b * shift).astype(np.float32)
        self._raw = self._product(positions, (values * a).astype(np.float32), bias)[0]

    def takes_bytes(self, columns: int) -> bool:
        """Whether :meth:`forward_raw` runs for a call on ``columns`` columns."""
        return self._raw is not None and not self.uses_dense(columns)

    def forward_raw(self, u: np.ndarray) -> np.ndarray:
        """:meth:`forward` of the normalised pixels, from raw uint8 columns (:meth:`fold_input`)."""
        return self._raw(u, relu=self.relu)

    @property
    def rule(self) -> str:
        """The :data:`BREAK_EVEN` entry that decides the layer: its engine's, or ``blocks``
        (``blocks4`` for n = 4) for numbers stored whole under numba (one column:
        :func:`~qsparse.deploy.kernels.block_matvec` or the chain, their sums packed in
        vectors)."""
        if self.path == "bsr" and self.engine == "numba":
            return "blocks4" if self.structure.n == 4 else "blocks"
        return "hyper" if self.path == "hyper" else self.engine

    def uses_dense(self, columns: int) -> bool:
        """Whether a call on ``columns`` columns runs dense BLAS (the path, or ``auto``'s rule)."""
        return self._dense[band(columns)]

    def set_dense(self, b: int, dense: bool) -> None:
        """Dense BLAS (or not) in band ``b`` of :func:`band`, whatever the cost rule said: the
        model's decisions for its small layers (:class:`Model`)."""
        self._dense = (*self._dense[:b], dense, *self._dense[b + 1 :])

    def _reachable(self) -> list[int]:
        """A column count in each band a batch can reach (one image: :attr:`columns`)."""
        return sorted({self.columns, 2 * self.columns, max(MANY_COLUMNS, self.columns)})

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Columns ``(K, B)`` -> ``(M, B)`` for a dense op; NHWC -> NHWC for a convolution; the
        ReLU that follows applied in place where :attr:`relu` (by the sparse kernels as they
        write each row)."""
        if self.direct and not isinstance(x, planes_lib.Planes):
            return relu_in_place(self._conv(x), self.relu)  # few images: dense (_run)
        if self.direct:
            if x.data.shape[0] != self.c_in:
                raise ValueError(f"layer {self.name}: {x.data.shape[0]} channels, not {self.c_in}")
            return planes_lib.conv(self._taps, self.bias, x, self.relu)
        features = x.shape[-1] if self.conv else x.shape[0]
        if features != self.c_in:  # the kernels index x unchecked
            raise ValueError(f"layer {self.name}: input has {features} features, not {self.c_in}")
        if not self.conv:
            if self.uses_dense(x.shape[1]):
                return relu_in_place(self._kt @ x + self.bias[:, None], self.relu)
            return self._sparse(x, relu=self.relu)
        n, (h, w) = x.shape[0], self.hw
        if self.uses_dense(n * h * w):
            return relu_in_place(self._conv(x), self.relu)
        y = self._sparse(im2col(x, *self.shape[-4:-2], self.pads, self.strides), relu=self.relu)
        return y.reshape(-1, n, h, w).transpose(1, 2, 3, 0)

    def _conv(self, x):
        """The dense convolution (:attr:`pads`, :attr:`strides`): a few images at a time, their
        patches ``(positions, kh kw c_in)`` (:data:`PATCH_BYTES` of them) times the kernel in one
        BLAS product. A sum of ``kh kw`` shifted products, each with only ``c_in`` terms, ran
        1.3-2.4x slower on 64-128 channels and ~20x on a 1-3 channel input (Conv-4, Conv-2)."""
        kh, kw, c_in, c_out = self.kernel.shape
        n, (h, w), (sh, sw) = x.shape[0], self.hw, self.strides
        xp = np.pad(x, ((0, 0), *self.pads, (0, 0)))
        kernel = self.kernel.reshape(kh * kw * c_in, c_out)
        y = np.empty((n, h, w, c_out), np.float32)
        step = max(1, PATCH_BYTES // (4 * h * w * kernel.shape[0]))
        for s in range(0, n, step):
            xs = xp[s : s + step]
            patches = np.empty((len(xs), h, w, kh, kw, c_in), np.float32)
            for dy in range(kh):
                for dx in range(kw):
                    patches[:, :, :, dy, dx] = xs[
                        :, dy : dy + sh * (h - 1) + 1 : sh, dx : dx + sw * (w - 1) + 1 : sw
                    ]
            np.matmul(
                patches.reshape(-1, kernel.shape[0]), kernel, out=y[s : s + step].reshape(-1, c_out)
            )
        y += self.bias
        return y

    def why(self) -> str:
        """What computes the layer and, with ``kernels="auto"``, why (:meth:`Model.describe`)."""
        if self.choice != "auto":
            return self.engine
        density = f"auto: {self.density:.1%} of the dense multiply-adds"
        if self.direct and self.density >= DIRECT_BREAK_EVEN:
            return f"{density}, {FEW_TAPS} taps or fewer before a convolution on planes: numba"
        if self.direct:
            return f"{density}, under {DIRECT_BREAK_EVEN:.0%}: numba"
        rates = BREAK_EVEN[self.rule]
        reachable = self._reachable()
        if self.path == "dense":
            reason = None
            if self.conv:
                reason = f"a convolution over {DIRECT_BREAK_EVEN:.0%}, or one planes do not take"
            over = max(rates[band(c)] for c in reachable)
            return f"{density}, {reason or f'over {over:.0%}'}: blas"
        dense = [self.uses_dense(c) for c in reachable]
        if all(dense):  # over every band's break-even, or a small layer beside BLAS ones
            over = max(rates[band(c)] for c in reachable)
            reason = f"over {over:.0%}" if self.density >= over else "beside layers run by BLAS"
            return f"{density}, {reason}: blas, or numba in a one-image chain"
        if not any(dense):  # under every band's break-even, or a small layer beside numba ones
            under = min(rates[band(c)] for c in reachable)
            reason = f"under {under:.0%}" if self.density < under else "beside layers run by numba"
            return f"{density}, {reason}: {self.engine}"
        images = [-(-c // self.columns) for c in reachable]  # each band's first batch
        starts = [i for i, d in enumerate(dense) if i == 0 or d != dense[i - 1]]
        text = []
        for j, i in enumerate(starts):
            first = images[i]
            last = images[starts[j + 1]] - 1 if j + 1 < len(starts) else None
            batches = f"batch {first}" if last == first else f"batches {first}-{last}"
            text.append(f"{'blas' if dense[i] else self.engine} at {batches}")
        text[-1] = text[-1].rsplit(" at ", 1)[0] + f" from batch {images[starts[-1]]}"
        return f"{density}: " + ", ".join(text)


class Model:
    """An exported model: :meth:`predict` maps raw images to logits (numpy; numba or scipy)."""

    def __init__(self, header: dict, arrays: dict[str, np.ndarray], *, kernels: str = "auto"):
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
        self.engine = kernels_lib.engine()  # what runs the sparse products, as loaded
        self.layers: list[_Layer] = []
        self.norms: list[bn_lib.Norm] = []
        self._steps, _ = self._build(header["ops"], arrays, kernels, self.input_shape[:2])
        self._raw_steps = self._flattens_before_a_dense_layer(header["ops"])
        if self._raw_steps:
            a, b = self._affine(self._scale)
            self.layers[0].fold_input(a, b)
        if kernels == "auto":
            self._small_layers_follow_blas()
            self._few_taps_follow_planes()
            self._small_layers_follow_numba()
        self._chain = self._one_image_chain()
        self._mixed: dict[int, bool] = {}  # mixes_engines, by batch size

    def _small_layers_follow_blas(self) -> None:
        """In a band of columns where a dense model's other layers run by BLAS, its small
        layers (under :data:`CHAIN_DENSE_MAX` multiply-adds) do too: their numba call and the
        switch between engines cost more than they save (the complex LeNet-300-100 at 3.5 %,
        2-8 images, its 100x10 output layer by numba: 0.047 against 0.039 ms)."""
        if any(layer.conv for layer in self.layers):
            return
        for b, columns in enumerate((1, 2, MANY_COLUMNS)):
            if any(layer.uses_dense(columns) and not layer.small for layer in self.layers):
                for layer in self.layers:
                    if layer.small:
                        layer.set_dense(b, True)

    def _small_layers_follow_numba(self) -> None:
        """In a model with convolutions on planes, a small dense layer (under
        :data:`CHAIN_DENSE_MAX` multiply-adds) runs its sparse product in a band of columns where
        the other dense layers run theirs: by BLAS it would be the call's one threaded BLAS
        product, and numba would then get one core (:meth:`mixes_engines`; a trained Conv-4's
        10-class output layer at 15 %, from 103 images)."""
        if not any(layer.direct for layer in self.layers):
            return
        dense = [layer for layer in self.layers if not layer.conv]
        for b, columns in enumerate((1, 2, MANY_COLUMNS)):
            if any(layer.uses_dense(columns) for layer in dense if not layer.small):
                continue
            for layer in dense:
                if layer.small and getattr(layer, "_sparse", None) is not None:
                    layer.set_dense(b, False)

    def _few_taps_follow_planes(self) -> None:
        """A dense convolution of few taps (:attr:`_Layer.few_taps`) whose output reaches a
        convolution on planes through ReLUs and pools alone goes on planes too: its output
        then needs no layout of its own, and no BLAS product is left beside numba's kernels
        (a trained Conv-4 at 1.2 % of its weights, its first convolution at 85 %, batch 64:
        22 against 46 ms)."""
        steps = self._steps
        for i, (step, _) in enumerate(steps):
            layer = getattr(step, "__self__", None)
            if not (isinstance(layer, _Layer) and layer.few_taps):
                continue
            # the next step that takes a layout (ReLUs and pools take any)
            after = next((nxt for nxt, wants in steps[i + 1 :] if wants is not None), None)
            following = getattr(after, "__self__", None)
            if isinstance(following, _Layer) and following.direct:
                layer.to_planes()
                steps[i] = (step, PLANES)

    def _one_image_chain(self) -> tuple | None:
        """The arguments of :func:`~qsparse.deploy.kernels.chain_matvec` after the image where
        one raw image runs every layer in one call: a model of raw reshapes, then dense layers
        only (ReLUs inside them), each with numba's one-column kernel (CSR, or numbers stored
        whole), the first on raw pixels (:meth:`_Layer.fold_input`). A layer ``auto`` computes
        by BLAS below :data:`MANY_COLUMNS` columns joins too where its sparse product exists and
        its dense one is under :data:`CHAIN_DENSE_MAX` multiply-adds (then BLAS's edge is the
        call it saves, and the chain saves it as well). None otherwise."""
        rest, layers = self._steps[self._raw_steps :], self.layers
        if not self._raw_steps or len(rest) != len(layers) or layers[0]._raw is None:
            return None
        if any(step != layer.forward or layer.conv for (step, _), layer in zip(rest, layers)):
            return None
        for layer in layers:
            if layer.uses_dense(1) and layer.kernel.size >= CHAIN_DENSE_MAX:
                return None
        products = [layers[0]._raw] + [getattr(layer, "_sparse", None) for layer in layers[1:]]
        return chain_arguments(products, [layer.relu for layer in layers])

    def _flattens_before_a_dense_layer(self, entries: list) -> int:
        """How many leading steps are reshapes of the raw image before a dense layer, where all
        channels share one normalisation (MNIST-shaped models such as LeNet-300-100): the image
        is then normalised as it is laid out in columns for that layer, two passes over it (a
        scaling transposed copy, a shift in place) where normalising, then transposing, took
        five. 0 where that does not apply."""
        shared = np.all(self._mean == self._mean[0]) and np.all(self._std == self._std[0])
        ops_ = [ops.from_json(e) for e in entries]
        k = next((i for i, op in enumerate(ops_) if not isinstance(op, ops.Flatten)), 0)
        return k if shared and k and isinstance(ops_[k], ops.Dense) else 0

    def _build(self, entries: list, arrays: dict, kernels: str, hw: tuple) -> tuple[list, tuple]:
        """The steps of ``entries`` on images of ``hw`` (H, W), and the (H, W) they end with:
        ``(step, the layout it takes)`` pairs (:data:`ROWS`, :data:`COLUMNS`, :data:`PLANES`;
        None: any)."""
        steps: list[tuple[Forward, str | None]] = []
        for entry in entries:
            op = ops.from_json(entry)
            last = steps[-1][0] if steps else None
            if isinstance(op, ops.Relu) and self.layers and last == self.layers[-1].forward:
                self.layers[-1].relu = True  # on the layer's output, in place: no pass of its own
                continue
            if isinstance(op, ops.Dense | ops.Conv):
                conv = isinstance(op, ops.Conv)
                self.layers.append(_Layer(op, entry, self.header, arrays, kernels, hw))
                hw = self.layers[-1].hw if conv else hw
                layer = self.layers[-1]
                steps.append((layer.forward, PLANES if layer.direct else ROWS if conv else COLUMNS))
            elif isinstance(op, ops.BatchNorm):
                self.norms.append(bn_lib.Norm(op, arrays))
                steps.append((self.norms[-1].forward, ROWS))
            elif isinstance(op, ops.Residual):
                body, hw_body = self._build(entry["body"], arrays, kernels, hw)
                short, hw = self._build(entry.get("shortcut", []), arrays, kernels, hw)
                if hw_body != hw:
                    raise ValueError(f"a residual's body ends at {hw_body}, its shortcut at {hw}")
                steps.append((functools.partial(_residual, body, short), ROWS))
            else:
                hw = (hw[0] // 2, hw[1] // 2) if isinstance(op, ops.MaxPool2x2) else hw
                anywhere = isinstance(op, ops.Relu | ops.MaxPool2x2)
                steps.append((_step(op), None if anywhere else ROWS))
        return steps, hw

    def preprocess(self, images: np.ndarray, scale: float | None = None) -> np.ndarray:
        """Raw uint8 pixels (or floats in ``[0, scale]``: ``scale`` says what white is, 255 or
        1.0) -> normalised float32, per channel. Floats without ``scale`` are refused
        (TypeError): images already scaled to [0, 1] would give wrong logits silently."""
        images, white = self._checked(images, scale)
        return ops.normalize(images, self._mean, self._std, white)

    def _checked(self, images: np.ndarray, scale: float | None) -> tuple[np.ndarray, float]:
        """``images`` as ``(N, *input_shape)`` and the value of white, or the refusals of
        :meth:`preprocess`."""
        images = np.asarray(images)
        if scale is None and images.dtype != np.uint8:
            raise TypeError(
                f"images are {images.dtype}; give raw uint8 pixels, or floats with scale= (the "
                "value of white: 255 for pixels in [0, 255], 1.0 for [0, 1])"
            )
        if images.ndim == len(self.input_shape) and self.input_shape[-1] == 1:
            images = images[..., None]  # (N, H, W) grayscale
        if images.shape[1:] != self.input_shape:
            raise ValueError(
                f"images of shape {images.shape}; the model takes (N, {self.input_shape})"
            )
        return images, self._scale if scale is None else float(scale)

    def predict(
        self, images: np.ndarray, batch_size: int = 256, *, scale: float | None = None
    ) -> np.ndarray:
        """Logits ``(N, num_classes)`` float32 of raw ``(N, H, W, C)`` uint8 images (floats:
        with ``scale``, :meth:`preprocess`)."""
        if self._raw_steps:
            images, white = self._checked(images, scale)
            forward = functools.partial(self._forward_raw, white=white)
        else:
            images, forward = self.preprocess(images, scale), self._forward
        if 0 < len(images) <= batch_size:
            with self._threads(len(images)):
                return forward(images).astype(np.float32, copy=False)
        out = []
        for s in range(0, len(images), batch_size):
            chunk = images[s : s + batch_size]
            with self._threads(len(chunk)):
                out.append(forward(chunk))
        if not out:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return _run(self._steps, x)

    def layer_calls(self, images: np.ndarray) -> list[tuple[_Layer, Any, Callable[[], Any]]]:
        """Each layer of the model's top level (not those inside residual blocks), the input one
        :meth:`predict` of ``images`` gives it (in the layout its path takes; a copy of its own)
        and a call that computes the layer alone on it: for benchmarks. The first layer gets
        normalised floats, where ``predict`` may fold the normalisation into it."""
        calls, n = [], len(images)

        def visit(step, x):
            layer = getattr(step, "__self__", None)
            if not isinstance(layer, _Layer):
                return
            planes = isinstance(x, planes_lib.Planes)
            x = dataclasses.replace(x, data=x.data.copy()) if planes else x.copy()

            def call(step=step, x=x):
                with self._threads(n):  # as predict runs it
                    return step(x)

            calls.append((layer, x, call))

        with self._threads(n):
            _run(self._steps, self.preprocess(images), visit=visit)
        return calls

    def mixes_engines(self, n: int) -> bool:
        """Whether a call on ``n`` images runs both BLAS products large enough for BLAS's threads
        (:data:`BLAS_THREADED`) and numba's parallel kernels (some layers under their
        break-even, others over it). It then runs numba on one thread: OpenBLAS's threads keep
        spinning for a while after each product, and numba's, started next, fought them for the
        cores (LeNet-300-100 at 10 % of its weights, batch 256, 2 cores: 14-16 ms, against 0.37
        ms with BLAS on one thread and 0.41 ms with numba on one)."""
        if n not in self._mixed:
            if len(self._mixed) > 64:  # batch sizes seen; a handful in practice
                self._mixed.clear()
            self._mixed[n] = self._mixes(n)
        return self._mixed[n]

    def _mixes(self, n: int) -> bool:
        blas = numba = False
        for layer in self.layers:
            columns = n * layer.columns
            dense = layer.uses_dense(columns) or (layer.direct and n < DIRECT_MIN_BATCH)
            m, k = real_shape(layer.structure, layer.shape)
            blas |= dense and columns * m * k >= BLAS_THREADED
            numba |= not dense and layer.engine == "numba" and (columns > 1 or layer.conv)
        return blas and numba

    def _threads(self, n: int):
        return kernels_lib.one_thread() if self.mixes_engines(n) else contextlib.nullcontext()

    def _forward_raw(self, images: np.ndarray, white: float) -> np.ndarray:
        """:meth:`_forward` of raw images through the leading reshapes, normalised while laid
        out as the first dense layer's columns (``x a + b``, ``a = 1 / (white std)``, ``b =
        -mean / std``)."""
        k, first = self._raw_steps, self.layers[0]
        x = _run(self._steps[:k], images)
        folded = x.dtype == np.uint8 and white == self._scale  # the first layer's fold holds
        if folded and len(x) == 1 and self._chain is not None:
            return kernels_lib.chain_matvec(x.reshape(-1).astype(np.float32), *self._chain)[None]
        if folded and first.takes_bytes(len(x)):
            y = first.forward_raw(kernels_lib.byte_columns(x))
            return _run(self._steps[k + 1 :], y, COLUMNS)
        a, b = self._affine(white)
        columns = np.multiply(x.T, a, dtype=np.float32, order="C")
        columns += b
        return _run(self._steps[k:], columns, COLUMNS)

    def _affine(self, white: float) -> tuple[np.float32, np.float32]:
        """(a, b): the normalised pixels are ``x a + b`` (every channel alike)."""
        a = np.float32(1.0) / (np.float32(white) * self._std[0])
        return a, np.float32(-self._mean[0] / self._std[0])

    def describe(self) -> str:
        """What the file holds: provenance, its algebras, one line per layer (storage, density,
        bytes, what computes it and why, and its path: ``csr``, ``bsr``, ``hyper`` or ``dense``)."""
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
                f"{s['alive']}/{s['total']} weights alive, {s['bytes']} bytes, {layer.why()}, "
                f"{layer.path}" + (f", batch norm {layer.folded} folded in" if layer.folded else "")
            )
        lines += [f"  {m.name:12s} batchnorm {m.form}, n={m.n}, its own op" for m in self.norms]
        if self._chain is not None:
            lines.append("one raw image: every layer sparse, in one call (chain_matvec, one core)")
        lines.append(f"kernel bytes {total}; sparse products: {self.engine}")
        runs = []  # [first, last] batch sizes up to DESCRIBED_BATCH that mix
        for n in range(1, DESCRIBED_BATCH + 1):
            if self._mixes(n):
                if runs and runs[-1][1] == n - 1:
                    runs[-1][1] = n
                else:
                    runs.append([n, n])
        if runs:
            sizes = ", ".join(
                f"{a}+" if b == DESCRIBED_BATCH else (f"{a}-{b}" if b > a else str(a))
                for a, b in runs
            )
            lines.append(f"batches of {sizes} images mix BLAS and numba: numba on one thread")
        return "\n".join(lines)
