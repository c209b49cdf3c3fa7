"""Compiled sparse products for the runtime (numba, optional): ``y = W^T x + b`` on column batches.

Activations are held as ``(features, columns)``: a batch of dense-layer inputs, or a
convolution's image patches (:func:`im2col`, one column per output position), so that each
stored weight multiplies one contiguous row of ``x`` and the loop over columns vectorises. The
work is split across cores by output row (``prange``); a row's loop runs over all the columns at
once (measured: loops over tiles of columns, with computed bounds, did not vectorise and ran
ten times slower).

* :func:`csr_matmul`: CSR of a real matrix (real layers; PHM and hashed layers' real matrices);
* :func:`hyper_matmul`: component kernels of a table whose blocks are single signed components
  (:attr:`qsparse.algebras.Algebra.signed_blocks`): a number stored whole (``n`` values, one
  index) expands to its ``n x n`` signed block from the table (quaternion: 4 loaded values feed
  16 multiply-adds per column); an element-stored component feeds the ``n`` outputs its table
  says, with their signs.

Without numba (:data:`AVAILABLE` false) nothing here compiles and the runtime takes scipy's
products instead. numba compiles each kernel on its first call and caches it on disk.
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
except ImportError:  # the optional extra is absent: the runtime falls back to scipy
    numba = None

AVAILABLE = numba is not None

if AVAILABLE:
    prange = numba.prange

    def _jit(**options):
        """numba's ``njit``, its machine code cached on disk where a cache folder is writable
        (else compiled once per process)."""

        def wrap(fn):
            try:
                return numba.njit(cache=True, fastmath={"contract"}, **options)(fn)
            except RuntimeError:  # numba: "cannot cache function ...: no locator available"
                return numba.njit(fastmath={"contract"}, **options)(fn)

        return wrap

    compiled = _jit(parallel=True)
else:
    prange = range

    def compiled(fn):
        """Without numba the kernels stay plain Python, and the runtime never calls them."""
        return fn


def set_threads(threads: int | None) -> int:
    """Use ``threads`` cores for the kernels (None: all of them); returns the number in use."""
    cores = numba.config.NUMBA_NUM_THREADS if AVAILABLE else os.cpu_count() or 1
    if threads is None:
        threads = cores
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= cores:
        raise ValueError(f"threads={threads!r} is not valid; choose 1 to {cores} (or None: all)")
    if AVAILABLE:
        numba.set_num_threads(threads)
    return threads


def engine() -> str:
    """What runs the sparse products now, in words (for ``Model.describe``)."""
    if AVAILABLE:
        return f"numba on {numba.get_num_threads()} thread(s)"
    return "scipy, one thread (numba is not installed or hidden)"


@compiled
def csr_matmul(indptr, cols, values, bias, x):
    """``y[r] = bias[r] + sum_k values[k] x[cols[k]]`` over row ``r``'s entries
    ``indptr[r]:indptr[r + 1]``; ``x`` ``(K, B)`` C-contiguous float32, ``y`` ``(rows, B)``."""
    rows, width = indptr.size - 1, x.shape[1]
    y = np.empty((rows, width), np.float32)
    for r in prange(rows):
        yr = y[r]
        yr[:] = bias[r]
        for k in range(indptr[r], indptr[r + 1]):
            v, xr = values[k], x[cols[k]]
            for t in range(width):  # whole rows: a loop over the width vectorises
                yr[t] += v * xr[t]
    return y


@compiled
def hyper_matmul(indptr, bases, comps, values, terms, signs, in_stride, bias, x):
    """Component kernels of a table of single signed components: entry ``k`` of output number
    ``o`` stores components ``comps[k, m]`` with values ``values[k, m]`` (``m < values.shape[1]``:
    all ``n`` of a number stored whole, or one); component ``c`` adds
    ``s values[k, m] x[bases[k] + b in_stride]`` to ``y[a q_out + o]`` for each block
    ``(b, a) = terms[c, j]``, ``s = signs[c, j]``, that it enters (signs 0 pad a component
    entering fewer blocks). A quaternion stored whole: 4 values loaded, 16 multiply-adds."""
    n, q_out, width = terms.shape[0], indptr.size - 1, x.shape[1]
    y = np.empty((n * q_out, width), np.float32)
    for o in prange(q_out):
        for a in range(n):
            y[a * q_out + o] = bias[a * q_out + o]
        for k in range(indptr[o], indptr[o + 1]):
            for m in range(values.shape[1]):
                c = comps[k, m]
                for j in range(terms.shape[1]):
                    v = signs[c, j] * values[k, m]
                    if v == 0:
                        continue
                    xr = x[bases[k] + terms[c, j, 0] * in_stride]
                    yr = y[terms[c, j, 1] * q_out + o]
                    for t in range(width):
                        yr[t] += v * xr[t]
    return y


def im2col(x: np.ndarray, kh: int, kw: int, pads=None, strides=(1, 1)) -> np.ndarray:
    """The patches of a convolution of NHWC ``x``, with the batch contiguous: ``(kh kw C, N H'
    W')``, row ``(dy kw + dx) C + c``, column ``(n, h', w')`` in C order. ``pads``: zeros
    ``((top, bottom), (left, right))``, default SAME (the odd one after); ``strides`` (sh, sw)."""
    n, _, _, c = x.shape
    (pt, pb), (pl, pr) = pads or (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
    sh, sw = strides
    xt = np.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    h, w = (xt.shape[2] - kh) // sh + 1, (xt.shape[3] - kw) // sw + 1
    patches = np.empty((kh * kw, c, n, h, w), np.float32)
    for dy in range(kh):
        for dx in range(kw):
            patches[dy * kw + dx] = xt[
                :, :, dy : dy + sh * (h - 1) + 1 : sh, dx : dx + sw * (w - 1) + 1 : sw
            ]
    return patches.reshape(kh * kw * c, n * h * w)
