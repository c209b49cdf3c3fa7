"""Direct sparse convolutions (numba): activations as channel planes with a ring of zeros.

A 3x3 (or smaller, odd) stride-1 ``SAME`` convolution of a pruned kernel needs no image patches:
with every channel's images laid out one after another, each padded by one pixel of zeros
(:class:`Planes`: ``(C, margin + length + margin)``, positions ``(n, h + 2, w + 2)`` in C order),
the input pixel under kernel tap ``(dy, dx)`` of output position ``q`` is at ``q + shift``,
``shift = (dy - 1)(w + 2) + (dx - 1)``, for every ``q`` alike. So a stored weight ``(dy, dx, c,
o)`` adds ``v x[c, q + shift]`` to ``y[o, q]`` for all positions at once: one contiguous
multiply-add per weight, where im2col first copies the input ``kh kw`` times. Outputs land on
the ring too; a mask zeroes them there, so the result is again :class:`Planes` and the next
convolution (or :func:`max_pool`) reads it as it is. The work runs over tiles of
:data:`TILE` positions, split across cores, each tile's outputs staying in cache while its
weights are applied.

The planes of one call are written into arrays kept for the next call of the same thread
(:func:`workspace`): a fresh array of this size is new memory the system must map page by page,
which took a quarter of a Conv-4 forward (batch 64) on the development machine.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import numpy as np

from qsparse.deploy.kernels import compiled, prange

TILE = 512  # positions per tile: a constant trip count (it vectorises); 256-2048 measured alike


@dataclasses.dataclass(frozen=True)
class Planes:
    """``data`` ``(C, margin + length + margin)`` float32: channel ``c``'s images at
    ``data[c, margin:margin + n (h + 2) (w + 2)]``, each padded by one pixel of zeros; zeros
    elsewhere (``length`` rounds the positions up to whole tiles, ``margin`` covers the
    furthest shift)."""

    data: np.ndarray
    n: int
    h: int
    w: int

    @property
    def margin(self) -> int:
        return margin(self.w)

    @property
    def length(self) -> int:
        return length(self.n, self.h, self.w)


def margin(w: int) -> int:
    return w + 3  # past the furthest shift, (w + 2) + 1


def length(n: int, h: int, w: int) -> int:
    return -(-n * (h + 2) * (w + 2) // TILE) * TILE


@functools.lru_cache(maxsize=16)
def interior(n: int, h: int, w: int) -> np.ndarray:
    """1.0 at the positions of image pixels, 0.0 on the rings and past the last image."""
    inside = np.zeros((n, h + 2, w + 2), np.float32)
    inside[:, 1:-1, 1:-1] = 1
    mask = np.zeros(length(n, h, w), np.float32)
    mask[: inside.size] = inside.ravel()
    return mask


_LOCAL = threading.local()
KEPT = 16  # arrays (roles and shapes) a thread keeps, the least recently used dropped first


def workspace(role: str, shape: tuple, zeros: bool, avoid: np.ndarray | None = None) -> np.ndarray:
    """A float32 array of ``shape`` for ``role``, the same one on later calls in this thread
    (``zeros``: zero when new, for planes whose interiors alone are written), never ``avoid``
    (a convolution's input: two alternate between convolutions of one shape). A thread keeps
    :data:`KEPT` of them, so models loaded one after another reuse them instead of piling up."""
    pool = _LOCAL.__dict__.setdefault("pool", collections.OrderedDict())
    arrays = pool.pop((role, shape), [])
    pool[(role, shape)] = arrays
    out = next((a for a in arrays if a is not avoid), None)
    if out is None:
        out = (np.zeros if zeros else np.empty)(shape, np.float32)
        arrays.append(out)
    while len(pool) > KEPT:
        pool.popitem(last=False)
    return out


def _shape(c: int, n: int, h: int, w: int) -> tuple:
    return c, 2 * margin(w) + length(n, h, w)


def supported(kernel_shape: tuple, pads, strides) -> bool:
    """Whether a convolution of this geometry runs on planes: an odd kernel of at most 3x3,
    stride 1, as many zeros on each side as its half-width (``SAME``)."""
    kh, kw = kernel_shape[-4:-2]
    return (
        kh % 2 == 1
        and kw % 2 == 1
        and max(kh, kw) <= 3
        and tuple(strides) == (1, 1)
        and tuple(map(tuple, pads)) == ((kh // 2,) * 2, (kw // 2,) * 2)
    )


def to_planes(x: np.ndarray) -> Planes:
    """NHWC float32 ``x`` as :class:`Planes`."""
    n, h, w, c = x.shape
    out = workspace("input", _shape(c, n, h, w), zeros=True)
    _to_planes(np.ascontiguousarray(x, np.float32), margin(w), out)
    return Planes(out, n, h, w)


def from_planes(p: Planes) -> np.ndarray:
    """:class:`Planes` as NHWC float32."""
    return _from_planes(p.data, p.n, p.h, p.w, p.margin)


def taps(rows, cols, values, kernel_shape: tuple, w: int, c_in: int, c_out: int):
    """A convolution's real entries (``rows`` output channel of ``c_out``, ``cols`` over ``(dy,
    dx, c)`` of ``c_in`` channels, as :func:`qsparse.deploy.matrices.real_entries` gives them)
    as :func:`conv` takes them: ``(indptr over output channels, input channel, shift on planes
    of width w, value)``."""
    kh, kw = kernel_shape[-4:-2]
    tap, channel = np.divmod(cols, c_in)
    dy, dx = np.divmod(tap, kw)
    shift = (dy - kh // 2) * (w + 2) + (dx - kw // 2)
    order = np.argsort(rows, kind="stable")
    counts = np.bincount(rows, minlength=c_out)
    return (
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        channel[order].astype(np.int64),
        shift[order].astype(np.int64),
        values[order].astype(np.float32),
    )


def conv(entries: tuple, bias: np.ndarray, p: Planes, relu: bool) -> Planes:
    """The convolution (:func:`taps` ``entries``) of planes ``p``, bias added, ReLU where
    ``relu``: planes of the same size."""
    indptr, channel, shift, values = entries
    mask = interior(p.n, p.h, p.w)
    out = workspace("conv", _shape(bias.size, p.n, p.h, p.w), zeros=False, avoid=p.data)
    _conv(indptr, channel, shift, values, bias, p.data, p.margin, mask, relu, out)
    return Planes(out, p.n, p.h, p.w)


def max_pool(p: Planes) -> Planes:
    """2x2 max-pool, stride 2 (VALID, the odd row or column dropped) of planes ``p``."""
    c, ho, wo = p.data.shape[0], p.h // 2, p.w // 2
    out = workspace("pool", _shape(c, p.n, ho, wo), zeros=True)
    _max_pool(p.data, p.n, p.h, p.w, p.margin, margin(wo), out)
    return Planes(out, p.n, ho, wo)


@compiled
def _to_planes(x, margin, out):
    """Writes the interior of ``out`` (its rings and margins are zero already)."""
    n, h, w, c = x.shape
    for i in prange(n):
        for r in range(h):
            base = margin + (i * (h + 2) + r + 1) * (w + 2) + 1
            for col in range(w):
                xr = x[i, r, col]
                for ch in range(c):
                    out[ch, base + col] = xr[ch]


@compiled
def _from_planes(data, n, h, w, margin):
    c = data.shape[0]
    out = np.empty((n, h, w, c), np.float32)
    for i in prange(n):
        for r in range(h):
            base = margin + (i * (h + 2) + r + 1) * (w + 2) + 1
            for col in range(w):
                orow = out[i, r, col]
                for ch in range(c):
                    orow[ch] = data[ch, base + col]
    return out


@compiled
def _conv(indptr, channel, shift, values, bias, x, margin, mask, relu, y):
    """``y[o, q] = mask[q] act(bias[o] + sum_k values[k] x[channel[k], q + shift[k]])`` over
    output channel ``o``'s entries, tile by tile (cores split the tiles); every entry of ``y``
    written."""
    outputs, size = indptr.size - 1, mask.size
    y[:, :margin] = 0
    y[:, margin + size :] = 0
    for tile in prange(size // TILE):
        q0 = margin + tile * TILE
        m = mask[tile * TILE : tile * TILE + TILE]
        for o in range(outputs):
            yt = y[o, q0 : q0 + TILE]
            b = bias[o]
            for t in range(TILE):
                yt[t] = b
            k, end = indptr[o], indptr[o + 1]
            while k + 8 <= end:  # eight taps per pass over the tile's outputs, then four
                v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
                v4, v5, v6, v7 = values[k + 4], values[k + 5], values[k + 6], values[k + 7]
                s0, s1, s2, s3 = (
                    q0 + shift[k],
                    q0 + shift[k + 1],
                    q0 + shift[k + 2],
                    q0 + shift[k + 3],
                )
                s4, s5, s6, s7 = (
                    q0 + shift[k + 4],
                    q0 + shift[k + 5],
                    q0 + shift[k + 6],
                    q0 + shift[k + 7],
                )
                x0 = x[channel[k], s0 : s0 + TILE]
                x1 = x[channel[k + 1], s1 : s1 + TILE]
                x2 = x[channel[k + 2], s2 : s2 + TILE]
                x3 = x[channel[k + 3], s3 : s3 + TILE]
                x4 = x[channel[k + 4], s4 : s4 + TILE]
                x5 = x[channel[k + 5], s5 : s5 + TILE]
                x6 = x[channel[k + 6], s6 : s6 + TILE]
                x7 = x[channel[k + 7], s7 : s7 + TILE]
                for t in range(TILE):
                    yt[t] += (v0 * x0[t] + v1 * x1[t] + v2 * x2[t] + v3 * x3[t]) + (
                        v4 * x4[t] + v5 * x5[t] + v6 * x6[t] + v7 * x7[t]
                    )
                k += 8
            while k + 4 <= end:
                v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
                s0, s1, s2, s3 = (
                    q0 + shift[k],
                    q0 + shift[k + 1],
                    q0 + shift[k + 2],
                    q0 + shift[k + 3],
                )
                x0 = x[channel[k], s0 : s0 + TILE]  # slices: indices from 0, no wrap-around
                x1 = x[channel[k + 1], s1 : s1 + TILE]
                x2 = x[channel[k + 2], s2 : s2 + TILE]
                x3 = x[channel[k + 3], s3 : s3 + TILE]
                for t in range(TILE):
                    yt[t] += v0 * x0[t] + v1 * x1[t] + v2 * x2[t] + v3 * x3[t]
                k += 4
            for j in range(k, end):
                v, s = values[j], q0 + shift[j]
                xt = x[channel[j], s : s + TILE]
                for t in range(TILE):
                    yt[t] += v * xt[t]
            if relu:
                for t in range(TILE):
                    yt[t] = max(yt[t], np.float32(0)) * m[t]
            else:
                for t in range(TILE):
                    yt[t] *= m[t]
    return y


@compiled
def _max_pool(x, n, h, w, margin_in, margin_out, out):
    """Writes the interior of ``out`` (its rings and margins are zero already)."""
    c, ho, wo = x.shape[0], h // 2, w // 2
    for ch in prange(c):
        xc, oc = x[ch], out[ch]
        for i in range(n):
            for r in range(ho):
                q = margin_in + (i * (h + 2) + 2 * r + 1) * (w + 2) + 1
                p = margin_out + (i * (ho + 2) + r + 1) * (wo + 2) + 1
                for col in range(wo):
                    a = max(xc[q + 2 * col], xc[q + 2 * col + 1])
                    b = max(xc[q + 2 * col + w + 2], xc[q + 2 * col + w + 3])
                    oc[p + col] = max(a, b)
    return out
