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
  says, with their signs;
* :func:`block_matmul`: 4-D numbers stored whole, each number's 16 block entries in registers;
* :func:`csr_matvec`, :func:`block_matvec`, :func:`chain_matvec`: one column on one core.

Without numba (:data:`AVAILABLE` false) nothing here compiles and the runtime takes scipy's
products instead. numba compiles each kernel on its first call and caches it on disk.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

WIDE = ",-prefer-256-bit"  # LLVM's tuning flag that caps vectors at 256 bits, turned off


def host_features():
    """The host CPU's features as LLVM, which also generates XLA's and numba's code, reads them
    (a mapping from names such as ``avx512f`` to flags; empty where LLVM cannot read them)."""
    try:
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_features()
    except (ImportError, RuntimeError):  # RuntimeError: a host whose features LLVM cannot read
        return {}


def _wide_vectors() -> None:
    """Ask numba, before it starts, for 512-bit vectors on a CPU with AVX-512: LLVM's tuning for
    these CPUs stops at 256 bits, and with 512 the planes convolutions ran 1.5x faster on one
    core (Conv-4's, at 10 % of the weights, batch 64; the dense-layer kernels no slower). numba
    fixes its CPU features when imported, for the whole process, so this only acts when numba
    is not imported yet and the user has chosen nothing (``NUMBA_CPU_NAME`` and
    ``NUMBA_CPU_FEATURES`` unset): then ``NUMBA_CPU_FEATURES`` is the host's with ``WIDE``."""
    if "numba" in sys.modules or {"NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"} & set(os.environ):
        return
    features = host_features()
    if features.get("avx512f"):
        os.environ["NUMBA_CPU_FEATURES"] = features.flatten() + WIDE


_wide_vectors()


def _pack_neighbours() -> None:
    """LLVM's SLP vectoriser on, which numba leaves off (``NUMBA_SLP_VECTORIZE``) unless the
    user has chosen: it packs the four sums of a quaternion block into one vector, where the
    loop vectoriser has no loop to take (a 784-300 quaternion layer at 13 %, one image: 3.9
    against 6.9 us). The batched kernels' inner loops compile to the same instructions either
    way. numba reads the variable at each compilation, so this acts even where numba is
    imported already, on the functions compiled from then on, in the whole process."""
    os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")


_pack_neighbours()

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
    serial = _jit()  # one core: no threads to wake, for work smaller than waking them costs
else:
    prange = range

    def compiled(fn):
        """Without numba the kernels stay plain Python, and the runtime never calls them."""
        return fn

    serial = compiled


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


@contextlib.contextmanager
def one_thread():
    """numba's parallel kernels on the calling thread alone while inside (numba's setting is per
    thread; the previous one comes back on leaving)."""
    if not AVAILABLE:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def engine() -> str:
    """What runs the sparse products now, in words (for ``Model.describe``)."""
    if AVAILABLE:
        return f"numba on {numba.get_num_threads()} thread(s)"
    return "scipy, one thread (numba is not installed or hidden)"


@compiled
def csr_matmul(indptr, cols, values, bias, x, relu):
    """``y[r] = bias[r] + sum_k values[k] x[cols[k]]`` over row ``r``'s entries
    ``indptr[r]:indptr[r + 1]``, then ``max(y, 0)`` where ``relu``; ``x`` ``(K, B)`` C-contiguous
    (float32, or raw uint8 pixels), ``y`` ``(rows, B)`` float32. Entries go four at a time: one
    pass over ``y[r]`` per four rows of ``x`` (measured 25-35 % faster than one at a time)."""
    rows, width = indptr.size - 1, x.shape[1]
    y = np.empty((rows, width), np.float32)
    for r in prange(rows):
        yr = y[r]
        yr[:] = bias[r]
        k, end = indptr[r], indptr[r + 1]
        while k + 4 <= end:
            v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
            x0, x1, x2, x3 = x[cols[k]], x[cols[k + 1]], x[cols[k + 2]], x[cols[k + 3]]
            for t in range(width):  # whole rows: a loop over the width vectorises
                yr[t] += v0 * x0[t] + v1 * x1[t] + v2 * x2[t] + v3 * x3[t]
            k += 4
        for j in range(k, end):
            v, xr = values[j], x[cols[j]]
            for t in range(width):
                yr[t] += v * xr[t]
        if relu:
            for t in range(width):
                yr[t] = max(yr[t], np.float32(0))
    return y


@serial
def csr_matvec(indptr, cols, values, bias, x, relu):
    """:func:`csr_matmul` of one column ``x`` ``(K, 1)`` on one core: each row's sum in four
    running sums (one chain of dependent adds would wait on each add's latency)."""
    rows = indptr.size - 1
    y = np.empty((rows, 1), np.float32)
    for r in range(rows):
        s0, s1, s2, s3 = bias[r], np.float32(0), np.float32(0), np.float32(0)
        k, end = indptr[r], indptr[r + 1]
        while k + 4 <= end:
            s0 += values[k] * x[cols[k], 0]
            s1 += values[k + 1] * x[cols[k + 1], 0]
            s2 += values[k + 2] * x[cols[k + 2], 0]
            s3 += values[k + 3] * x[cols[k + 3], 0]
            k += 4
        for j in range(k, end):
            s0 += values[j] * x[cols[j], 0]
        s = (s0 + s1) + (s2 + s3)
        y[r, 0] = max(s, np.float32(0)) if relu else s
    return y


@serial
def block_matvec(indptr, bases, blocks, in_stride, bias, x, relu):
    """One column ``x`` ``(K, 1)`` through numbers stored whole, on one core: number ``k`` of
    output number ``o`` is the ``n x n`` real block ``blocks[k]`` (``[a, b]``: input component
    ``b`` to output component ``a``) on inputs ``bases[k] + b in_stride``; output ``a q_out +
    o``. Its ``n`` inputs are loaded once for ``n^2`` multiply-adds (a quaternion: 4 loads, 16
    multiply-adds, where CSR of the real matrix loads an index and an input for each)."""
    q_out, n = indptr.size - 1, blocks.shape[1]
    y = np.empty((n * q_out, 1), np.float32)
    acc = np.empty(n, np.float32)
    xs = np.empty(n, np.float32)
    for o in range(q_out):
        if n == 4:  # unrolled: the sums and inputs in registers
            s0, s1 = bias[o], bias[q_out + o]
            s2, s3 = bias[2 * q_out + o], bias[3 * q_out + o]
            for k in range(indptr[o], indptr[o + 1]):
                base, w = bases[k], blocks[k]
                x0, x1 = x[base, 0], x[base + in_stride, 0]
                x2, x3 = x[base + 2 * in_stride, 0], x[base + 3 * in_stride, 0]
                s0 += w[0, 0] * x0
                s1 += w[1, 0] * x0
                s2 += w[2, 0] * x0
                s3 += w[3, 0] * x0
                s0 += w[0, 1] * x1
                s1 += w[1, 1] * x1
                s2 += w[2, 1] * x1
                s3 += w[3, 1] * x1
                s0 += w[0, 2] * x2
                s1 += w[1, 2] * x2
                s2 += w[2, 2] * x2
                s3 += w[3, 2] * x2
                s0 += w[0, 3] * x3
                s1 += w[1, 3] * x3
                s2 += w[2, 3] * x3
                s3 += w[3, 3] * x3
            if relu:
                s0, s1 = max(s0, np.float32(0)), max(s1, np.float32(0))
                s2, s3 = max(s2, np.float32(0)), max(s3, np.float32(0))
            y[o, 0], y[q_out + o, 0], y[2 * q_out + o, 0], y[3 * q_out + o, 0] = s0, s1, s2, s3
            continue
        for a in range(n):
            acc[a] = bias[a * q_out + o]
        for k in range(indptr[o], indptr[o + 1]):
            for b in range(n):
                xs[b] = x[bases[k] + b * in_stride, 0]
            block = blocks[k]
            for a in range(n):
                s = acc[a]
                for b in range(n):
                    s += block[a, b] * xs[b]
                acc[a] = s
        for a in range(n):
            y[a * q_out + o, 0] = max(acc[a], np.float32(0)) if relu else acc[a]
    return y


@compiled
def block_matmul(indptr, bases, blocks, in_stride, bias, x, relu):
    """:func:`block_matvec` of 4-D numbers on columns ``x`` ``(K, B)``, split across cores by
    output number: each stored number's 16 block entries held in registers while its four input
    rows pass once, four output rows accumulated (a row's loop over columns vectorises). Where
    :func:`hyper_matmul` passes over the columns once per block entry, this passes once per
    number: 4x fewer loads and stores of the outputs, and the fixed cost per number small
    enough for a few columns."""
    q_out, width = indptr.size - 1, x.shape[1]
    y = np.empty((4 * q_out, width), np.float32)
    for o in prange(q_out):
        y0, y1, y2, y3 = y[o], y[q_out + o], y[2 * q_out + o], y[3 * q_out + o]
        y0[:], y1[:] = bias[o], bias[q_out + o]
        y2[:], y3[:] = bias[2 * q_out + o], bias[3 * q_out + o]
        for k in range(indptr[o], indptr[o + 1]):
            base, w = bases[k], blocks[k]
            x0, x1 = x[base], x[base + in_stride]
            x2, x3 = x[base + 2 * in_stride], x[base + 3 * in_stride]
            w00, w01, w02, w03 = w[0, 0], w[0, 1], w[0, 2], w[0, 3]
            w10, w11, w12, w13 = w[1, 0], w[1, 1], w[1, 2], w[1, 3]
            w20, w21, w22, w23 = w[2, 0], w[2, 1], w[2, 2], w[2, 3]
            w30, w31, w32, w33 = w[3, 0], w[3, 1], w[3, 2], w[3, 3]
            for t in range(width):
                a0, a1, a2, a3 = x0[t], x1[t], x2[t], x3[t]
                y0[t] += w00 * a0 + w01 * a1 + w02 * a2 + w03 * a3
                y1[t] += w10 * a0 + w11 * a1 + w12 * a2 + w13 * a3
                y2[t] += w20 * a0 + w21 * a1 + w22 * a2 + w23 * a3
                y3[t] += w30 * a0 + w31 * a1 + w32 * a2 + w33 * a3
        if relu:
            for t in range(width):
                y0[t], y1[t] = max(y0[t], np.float32(0)), max(y1[t], np.float32(0))
                y2[t], y3[t] = max(y2[t], np.float32(0)), max(y3[t], np.float32(0))
    return y


@serial
def chain_matvec(x, indptr, index, values, bias, layers, relu):
    """Layers one after another on one column ``x`` ``(K,)`` float32, in one call (each numba
    call costs ~1.5 us, as much as a small layer's work). ``layers[l] = (r0, r1, n, stride,
    v0, b0)``: layer ``l`` is rows ``r0:r1`` of one ``indptr`` over all layers' entries; entry
    ``k``'s value, or ``n x n`` block (``[a, b]``: input component ``b`` to output component
    ``a``), starts at ``values[v0 + k n^2]``; its bias at ``bias[b0]``; ``max(y, 0)`` after it
    where ``relu[l]``. ``n = 1``: CSR, row ``r`` an output and ``index[k]`` its input, four
    running sums a row as :func:`csr_matvec`; else numbers stored whole (n = 2 and 4 unrolled) as
    :func:`block_matvec`: row ``r0 + o`` output number ``o`` (components at ``a (r1 - r0) +
    o``), ``index[k]`` its input number (components at ``index[k] + b stride``)."""
    for layer in range(layers.shape[0]):
        r0, r1, n, stride, v0, b0 = layers[layer]
        rows = r1 - r0
        y = np.empty(n * rows, np.float32)
        if n == 1:
            vals, rl = values[v0:], relu[layer]  # vals[k]: entry k's value
            for r in range(r0, r1):
                s0, s1, s2, s3 = bias[b0 + r - r0], np.float32(0), np.float32(0), np.float32(0)
                k, end = indptr[r], indptr[r + 1]
                while k + 4 <= end:
                    s0 += vals[k] * x[index[k]]
                    s1 += vals[k + 1] * x[index[k + 1]]
                    s2 += vals[k + 2] * x[index[k + 2]]
                    s3 += vals[k + 3] * x[index[k + 3]]
                    k += 4
                for j in range(k, end):
                    s0 += vals[j] * x[index[j]]
                s = (s0 + s1) + (s2 + s3)
                y[r - r0] = max(s, np.float32(0)) if rl else s
        elif n == 4:  # unrolled: the sums and inputs in registers
            e0 = indptr[r0]
            blocks = values[v0 + 16 * e0 : v0 + 16 * indptr[r1]].reshape(-1, 16)
            step = np.uint32(stride)  # unsigned: numba skips the wrap-around of negative indices
            for o in range(rows):
                s0, s1 = bias[b0 + o], bias[b0 + rows + o]
                s2, s3 = bias[b0 + 2 * rows + o], bias[b0 + 3 * rows + o]
                for k in range(indptr[r0 + o], indptr[r0 + o + 1]):
                    base, w = index[k], blocks[k - e0]
                    x0, x1 = x[base], x[base + step]
                    x2, x3 = x[base + 2 * step], x[base + 3 * step]
                    s0 += w[0] * x0 + w[1] * x1 + w[2] * x2 + w[3] * x3
                    s1 += w[4] * x0 + w[5] * x1 + w[6] * x2 + w[7] * x3
                    s2 += w[8] * x0 + w[9] * x1 + w[10] * x2 + w[11] * x3
                    s3 += w[12] * x0 + w[13] * x1 + w[14] * x2 + w[15] * x3
                y[o], y[rows + o], y[2 * rows + o], y[3 * rows + o] = s0, s1, s2, s3
        elif n == 2:  # unrolled as n = 4 (the general loop below ran complex layers 5x slower)
            e0 = indptr[r0]
            blocks = values[v0 + 4 * e0 : v0 + 4 * indptr[r1]].reshape(-1, 4)
            step = np.uint32(stride)
            for o in range(rows):
                s0, s1 = bias[b0 + o], bias[b0 + rows + o]
                for k in range(indptr[r0 + o], indptr[r0 + o + 1]):
                    base, w = index[k], blocks[k - e0]
                    x0, x1 = x[base], x[base + step]
                    s0 += w[0] * x0 + w[1] * x1
                    s1 += w[2] * x0 + w[3] * x1
                y[o], y[rows + o] = s0, s1
        else:
            for o in range(rows):
                for a in range(n):
                    s = bias[b0 + a * rows + o]
                    for k in range(indptr[r0 + o], indptr[r0 + o + 1]):
                        w = v0 + n * (n * k + a)
                        for b in range(n):
                            s += values[w + b] * x[index[k] + b * stride]
                    y[a * rows + o] = s
        if relu[layer] and n > 1:
            for i in range(y.size):
                y[i] = max(y[i], np.float32(0))
        x = y
    return x


@compiled
def hyper_matmul(indptr, bases, comps, values, terms, signs, in_stride, bias, x, relu):
    """Component kernels of a table of single signed components: entry ``k`` of output number
    ``o`` stores components ``comps[k, m]`` with values ``values[k, m]`` (``m < values.shape[1]``:
    all ``n`` of a number stored whole, or one); component ``c`` adds
    ``s values[k, m] x[bases[k] + b in_stride]`` to ``y[a q_out + o]`` for each block
    ``(b, a) = terms[c, j]``, ``s = signs[c, j]``, that it enters (signs 0 pad a component
    entering fewer blocks), then ``max(y, 0)`` where ``relu``. A quaternion stored whole: 4
    values loaded, 16 multiply-adds."""
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
        if relu:
            for a in range(n):
                ya = y[a * q_out + o]
                for t in range(width):
                    ya[t] = max(ya[t], np.float32(0))
    return y


_M32, _M16, _M8 = (np.uint64(m) for m in (0xFFFFFFFF, 0x0000FFFF0000FFFF, 0x00FF00FF00FF00FF))
_S32, _S16, _S8 = np.uint64(32), np.uint64(16), np.uint64(8)


@compiled
def _transpose_bytes(rows):
    """The 8x8 byte blocks of ``rows`` ``(B, K / 8)`` uint64 (B a multiple of 8) transposed: the
    result ``(K, B / 8)`` uint64 viewed as bytes is ``rows.view(uint8).T``. Each block is eight
    words swapped in three rounds of masked shifts (32-, 16-, 8-bit halves), where a byte-wise
    transpose makes one load and one store per byte (measured: 18 us against numpy's 72 us for
    256 x 784 bytes on 2 threads). Cores split the output rows, so no two write one cache line."""
    b8, words = rows.shape[0] // 8, rows.shape[1]
    out = np.empty((words * 8, b8), np.uint64)
    for j in prange(words):
        for bb in range(b8):
            r = rows[bb * 8 : bb * 8 + 8, j]
            w0, w1, w2, w3, w4, w5, w6, w7 = r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]
            t = ((w0 >> _S32) ^ w4) & _M32
            w4, w0 = w4 ^ t, w0 ^ (t << _S32)
            t = ((w1 >> _S32) ^ w5) & _M32
            w5, w1 = w5 ^ t, w1 ^ (t << _S32)
            t = ((w2 >> _S32) ^ w6) & _M32
            w6, w2 = w6 ^ t, w2 ^ (t << _S32)
            t = ((w3 >> _S32) ^ w7) & _M32
            w7, w3 = w7 ^ t, w3 ^ (t << _S32)
            t = ((w0 >> _S16) ^ w2) & _M16
            w2, w0 = w2 ^ t, w0 ^ (t << _S16)
            t = ((w1 >> _S16) ^ w3) & _M16
            w3, w1 = w3 ^ t, w1 ^ (t << _S16)
            t = ((w4 >> _S16) ^ w6) & _M16
            w6, w4 = w6 ^ t, w4 ^ (t << _S16)
            t = ((w5 >> _S16) ^ w7) & _M16
            w7, w5 = w7 ^ t, w5 ^ (t << _S16)
            t = ((w0 >> _S8) ^ w1) & _M8
            w1, w0 = w1 ^ t, w0 ^ (t << _S8)
            t = ((w2 >> _S8) ^ w3) & _M8
            w3, w2 = w3 ^ t, w2 ^ (t << _S8)
            t = ((w4 >> _S8) ^ w5) & _M8
            w5, w4 = w5 ^ t, w4 ^ (t << _S8)
            t = ((w6 >> _S8) ^ w7) & _M8
            w7, w6 = w7 ^ t, w6 ^ (t << _S8)
            o = out[j * 8 : j * 8 + 8, bb]
            o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7] = w0, w1, w2, w3, w4, w5, w6, w7
    return out


def byte_columns(images: np.ndarray) -> np.ndarray:
    """``images.T`` (C-contiguous) of uint8 ``images`` ``(B, K)``: raw pixels laid out as a
    dense layer's columns (numba; shapes padded to multiples of 8 inside). One image comes as
    float32 (its one column is a reshape; a matrix-vector kernel reads floats ~20 % faster)."""
    n, k = images.shape
    if n == 1:
        return images.reshape(k, 1).astype(np.float32)
    rows = np.ascontiguousarray(images)
    if n % 8 or k % 8:
        rows = np.zeros((-(-n // 8) * 8, -(-k // 8) * 8), np.uint8)
        rows[:n, :k] = images
    columns = _transpose_bytes(rows.view(np.uint64)).view(np.uint8)
    return np.ascontiguousarray(columns[:k, :n])  # a copy only where padded


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
