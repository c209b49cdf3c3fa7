"""A stored layer's real matrix, dense or sparse, from its kernel and its algebra (numpy, scipy).

A component kernel ``(n, ..., n_in, n_out)`` acts on component-blocked features through its
real block kernel ``(..., n * n_in, n * n_out)``, as :mod:`qsparse.hyper` builds it in JAX:
block (input component ``b``, output component ``a``) is ``sum_c A[c, b, a] w_c`` for structure
constants ``A`` (an algebra's fixed table, or a PHM layer's learned rules), and for the hashed
kind the stored weights are read ``n`` times each at the positions
:func:`qsparse.algebras.tied_positions` fixes by the layer's seed.

The sparse products are of ``W^T`` as a scipy matrix, applied as ``(W^T x^T)^T``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from qsparse.algebras import Algebra, tied_positions

Forward = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Structure:
    """How a component kernel becomes real: structure constants ``algebra.table`` (a file's
    algebra, or a PHM layer's rules as an algebra of their own), or ``None`` and ``hash_seed``
    for the hashed kind's tying of ``n`` components."""

    n: int
    algebra: Algebra | None = None
    hash_seed: int = 0

    def tied(self, size: int) -> np.ndarray:
        """The hashed kind's real position -> stored position, for a kernel of ``size``."""
        return tied_positions(size * self.n, self.n, self.hash_seed)


def real_kernel(structure: Structure | None, kernel: np.ndarray) -> np.ndarray:
    """The real kernel of a stored dense ``kernel`` (returned as is for a real layer, None).

    Tables whose blocks are single signed components go through
    :meth:`qsparse.algebras.Algebra.left_matrix` (numpy), others through an einsum."""
    if structure is None:
        return kernel
    n = structure.n
    *lead, n_in, n_out = kernel.shape[1:]
    if structure.algebra is None:
        return kernel.reshape(-1)[structure.tied(kernel.size)].reshape(*lead, n * n_in, n * n_out)
    if structure.algebra.signed_blocks:
        return structure.algebra.left_matrix(kernel, xp=np)
    real = np.einsum("cba,c...io->...biao", structure.algebra.table, kernel)
    return real.reshape(*lead, n * n_in, n * n_out).astype(np.float32)


def _csr(wt_shape, rows, cols, vals) -> Forward:
    from scipy import sparse

    wt = sparse.csr_array((vals, (rows, cols)), shape=wt_shape, dtype=np.float32)
    return lambda x: (wt @ x.T).T


def csr_product(structure: Structure | None, shape, positions, values) -> Forward:
    """The product with a dense layer's kernel of ``shape`` stored as element ``positions`` (flat
    C-order) and ``values``, as CSR of its real matrix: each stored value placed once per block
    its component enters (with that block's structure constant), or per tied copy."""
    if structure is None:
        n_in, n_out = shape
        i, o = np.divmod(positions, n_out)
        return _csr((n_out, n_in), o, i, values)
    n, q_in, q_out = shape
    if structure.algebra is None:
        copies = np.argsort(structure.tied(int(np.prod(shape))), kind="stable").reshape(-1, n)
        i, o = np.divmod(copies[positions].ravel(), n * q_out)
        return _csr((n * q_out, n * q_in), o, i, np.repeat(values, n))
    c, rest = np.divmod(positions, q_in * q_out)
    i, o = np.divmod(rest, q_out)
    rows, cols, vals = [], [], []
    table = structure.algebra.table
    for cc, b, a in zip(*np.nonzero(table), strict=True):
        sel = c == cc
        rows.append(a * q_out + o[sel])
        cols.append(b * q_in + i[sel])
        vals.append(table[cc, b, a] * values[sel])
    return _csr((n * q_out, n * q_in), *map(np.concatenate, (rows, cols, vals)))


def bsr_product(structure: Structure, shape, positions, values) -> Forward:
    """The product with a dense layer's kernel stored as ``nblock`` (``values`` ``(count, n)``)
    as a BSR matrix: block (o, i) of ``W^T``, on features ordered number by number
    (``x_n[n i + b] = x[b q_in + i]``), is the ``n x n`` real matrix of stored number (i, o)."""
    from scipy import sparse

    n, q_in, q_out = shape
    i, o = np.divmod(positions, q_out)
    order = np.lexsort((i, o))
    i, o, values = i[order], o[order], values[order]
    blocks = np.einsum("cba,kc->kab", structure.algebra.table, values).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(o, minlength=q_out))])
    wt = sparse.bsr_array(
        (blocks, i, indptr), shape=(n * q_out, n * q_in), blocksize=(n, n), dtype=np.float32
    )

    def forward(x):
        xn = x.reshape(-1, n, q_in).transpose(0, 2, 1).reshape(-1, n * q_in)
        y = (wt @ xn.T).T  # (batch, n q_out) number by number
        return y.reshape(-1, q_out, n).transpose(0, 2, 1).reshape(-1, n * q_out)

    return forward


def element_positions(storage: dict, shape, positions, values):
    """(flat positions over ``shape``, values) of a stored kernel, any layout (``dense``
    storage: every position; ``nblock``: each block's components as elements)."""
    layout = storage["layout"]
    if positions is None:
        grid = shape[1:] if layout == "nblock" else shape
        positions = np.arange(int(np.prod(grid)))
    if layout == "nblock":
        size = int(np.prod(shape[1:]))
        positions = np.concatenate([c * size + positions for c in range(shape[0])])
        values = values.T.ravel()
    return positions, values
