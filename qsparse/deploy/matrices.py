"""A stored layer's real matrix, dense or sparse, from its kernel and its algebra.

A component kernel ``(n, ..., n_in, n_out)`` acts on component-blocked features through its
real block kernel ``(..., n * n_in, n * n_out)``, as :mod:`qsparse.hyper` builds it in JAX:
block (input component ``b``, output component ``a``) is ``sum_c A[c, b, a] w_c`` for structure
constants ``A`` (an algebra's fixed table, or a PHM layer's learned rules), and for the hashed
kind the stored weights are read ``n`` times each at the positions
:func:`qsparse.algebras.tied_positions` fixes by the layer's seed.

The sparse products are of ``W^T`` with columns ``x`` ``(K, B)`` (a batch of features laid out
with the batch contiguous, or a convolution's image patches): numba's kernels
(:mod:`qsparse.deploy.kernels`) where numba imports, scipy's sparse matrices otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from qsparse.algebras import Algebra, tied_positions
from qsparse.deploy import kernels

Forward = Callable[..., np.ndarray]  # (x, relu=False) -> y: relu applies max(y, 0) in place


def relu_in_place(y: np.ndarray, relu: bool) -> np.ndarray:
    """``max(y, 0)`` written over ``y`` where ``relu`` (a layer's ReLU, no array of its own)."""
    return np.maximum(y, np.float32(0), out=y) if relu else y


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


def real_shape(structure: Structure | None, shape) -> tuple[int, int]:
    """``(M, K)`` of ``W^T`` for a dense kernel or a convolution's (one row per output channel,
    one column per patch row, as :func:`qsparse.deploy.kernels.im2col` orders them)."""
    if structure is None:
        return shape[-1], int(np.prod(shape[:-1]))
    n = structure.n
    return n * shape[-1], n * int(np.prod(shape[1:-1]))


def number_coords(flat: np.ndarray, n: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """(output number ``o``, input row of component 0) of flat positions over a component
    kernel's grid ``shape[1:]`` ``(..., q_in, q_out)``: the number at patch position ``p``,
    input ``i`` reads rows ``p n q_in + b q_in + i`` for its components ``b``."""
    q_in, q_out = shape[-2], shape[-1]
    r, o = np.divmod(flat, q_out)
    p, i = np.divmod(r, q_in)
    return o, p * n * q_in + i


def real_entries(structure: Structure | None, shape, positions, values):
    """(rows, columns, values) of ``W^T``'s nonzeros for a kernel of ``shape`` stored as element
    ``positions`` (flat C-order) and ``values``: each stored value placed once per block its
    component enters (with that block's structure constant), or per tied copy."""
    if structure is None:
        cols, rows = np.divmod(positions, shape[-1])
        return rows, cols, values
    n, q_in, q_out = structure.n, shape[-2], shape[-1]
    size = int(np.prod(shape[1:]))
    if structure.algebra is None:
        copies = np.argsort(structure.tied(n * size), kind="stable").reshape(-1, n)
        cols, rows = np.divmod(copies[positions].ravel(), n * q_out)
        return rows, cols, np.repeat(values, n)
    c, rest = np.divmod(positions, size)
    o, base = number_coords(rest, n, shape)
    rows, cols, vals = [], [], []
    table = structure.algebra.table
    for cc, b, a in zip(*np.nonzero(table), strict=True):
        sel = c == cc
        rows.append(a * q_out + o[sel])
        cols.append(base[sel] + b * q_in)
        vals.append(table[cc, b, a] * values[sel])
    return tuple(map(np.concatenate, (rows, cols, vals)))


def by_row(rows: np.ndarray, n_rows: int, *columns: np.ndarray):
    """(indptr, each of ``columns`` reordered by row): entries grouped as CSR groups them."""
    order = np.argsort(rows, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    return (indptr.astype(np.int64), *(np.ascontiguousarray(c[order]) for c in columns))


def csr_product(structure: Structure | None, shape, positions, values, bias) -> tuple[Forward, int]:
    """(``x -> W^T x + bias`` on columns ``x`` ``(K, B)``, multiply-adds per column) through CSR
    of the real matrix (element positions): numba's kernel where it imports, scipy's otherwise."""
    rows, cols, vals = real_entries(structure, shape, positions, values)
    m, k = real_shape(structure, shape)
    if kernels.AVAILABLE:
        # unsigned indices: numba skips the wrap-around of negative ones (matvec ~20 % faster)
        indptr, cols, vals = by_row(rows, m, cols.astype(np.uint32), vals.astype(np.float32))

        def forward(x, relu=False):
            x = np.ascontiguousarray(x)  # rows of x read as contiguous vectors
            kernel = kernels.csr_matvec if x.shape[1] == 1 else kernels.csr_matmul
            return kernel(indptr, cols, vals, bias, x, relu)

        forward.csr = indptr, cols, vals, bias  # for kernels.chain_matvec
        return forward, len(vals)
    from scipy import sparse

    wt = sparse.csr_array((vals, (rows, cols)), shape=(m, k), dtype=np.float32)
    return (lambda x, relu=False: relu_in_place(wt @ x + bias[:, None], relu)), len(vals)


def _signed_terms(algebra: Algebra) -> tuple[np.ndarray, np.ndarray]:
    """(``terms[c, j] = (b, a)``, ``signs[c, j]``): the blocks component ``c`` enters, padded
    with sign 0 where a component enters fewer than another."""
    per = [[(b, a, s) for b, a, cc, s in algebra.left_terms if cc == c] for c in range(algebra.n)]
    terms = np.zeros((algebra.n, max(map(len, per)), 2), np.int64)
    signs = np.zeros(terms.shape[:2], np.float32)
    for c, blocks in enumerate(per):
        for j, (b, a, s) in enumerate(blocks):
            terms[c, j], signs[c, j] = (b, a), s
    return terms, signs


def hyper_product(structure: Structure, shape, positions, values, comps, bias):
    """(``W^T x + bias``, multiply-adds) through numba's kernel for a table of single signed
    components: ``positions`` over ``shape[1:]``, ``values`` ``(count, m)`` the stored
    components ``comps`` (``(count,)``: one each) or, ``comps`` None, all ``n`` of a number."""
    terms, signs = _signed_terms(structure.algebra)
    o, base = number_coords(positions, structure.n, shape)
    if comps is None:  # whole numbers: one index, n values
        indptr, base, values = by_row(o, shape[-1], base.astype(np.int64), values)
        comps = np.broadcast_to(np.arange(structure.n), values.shape)  # no memory per number
    else:
        indptr, base, comps, values = by_row(o, shape[-1], base.astype(np.int64), comps, values)
        comps, values = comps[:, None], values[:, None]
    q_in, macs = shape[-2], int(np.count_nonzero(signs[comps]))

    def forward(x, relu=False):
        x = np.ascontiguousarray(x)  # rows of x read as contiguous vectors
        return kernels.hyper_matmul(indptr, base, comps, values, terms, signs, q_in, bias, x, relu)

    return forward, macs


def number_blocks(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The real ``n x n`` block ``[k, a, b]`` (input component ``b`` to output ``a``) of each
    stored number ``values[k]`` under structure constants ``table``."""
    return np.einsum("cba,kc->kab", table, values).astype(np.float32)


def block_product(structure: Structure, shape, positions, values, bias) -> Forward:
    """``W^T x + bias`` on one column ``x`` ``(K, 1)`` for a kernel stored as ``nblock``
    (``values`` ``(count, n)``): numba's :func:`~qsparse.deploy.kernels.block_matvec` on each
    stored number's real block; for n = 4 on any number of columns too
    (:func:`~qsparse.deploy.kernels.block_matmul`)."""
    o, base = number_coords(positions, structure.n, shape)
    blocks = number_blocks(structure.algebra.table, values)
    # unsigned indices: numba skips the wrap-around of negative ones
    indptr, base, blocks = by_row(o, shape[-1], base.astype(np.uint64), blocks)
    q_in = np.uint64(shape[-2])

    def forward(x, relu=False):
        x = np.ascontiguousarray(x)
        if x.shape[1] == 1:
            return kernels.block_matvec(indptr, base, blocks, q_in, bias, x, relu)
        if structure.n != 4:
            raise ValueError(f"numbers of {structure.n} components: one column only")
        return kernels.block_matmul(indptr, base, blocks, q_in, bias, x, relu)

    forward.blocks = indptr, base, blocks, q_in, bias  # for kernels.chain_matvec
    return forward


def bsr_product(structure: Structure, shape, positions, values, bias) -> tuple[Forward, int]:
    """(``W^T x + bias``, multiply-adds) for a kernel stored as ``nblock`` (``values``
    ``(count, n)``), one ``n x n`` block per stored number: numba's register-expanded block for
    a table of single signed components (n = 4: :func:`block_product`, each number's 16
    entries in registers for all columns, 2.8x :func:`hyper_product` at 256 columns and 4-7x
    at up to 16, a quaternion layer at 13.8 %), else scipy's BSR on features number by
    number."""
    n, q_out = structure.n, shape[-1]
    algebra = structure.algebra
    if kernels.AVAILABLE and algebra.signed_blocks:
        if n == 4:
            return block_product(structure, shape, positions, values, bias), values.size * n
        return hyper_product(structure, shape, positions, values, None, bias)
    from scipy import sparse

    m, k = real_shape(structure, shape)
    i, o = np.divmod(positions, q_out)  # block column i: patch position and input number
    indptr, i, values = by_row(o, q_out, i, values)
    blocks = number_blocks(algebra.table, values)
    wt = sparse.bsr_array((blocks, i, indptr), shape=(m, k), blocksize=(n, n), dtype=np.float32)

    def forward(x, relu=False):
        xn = x.reshape(-1, n, shape[-2], x.shape[1]).transpose(0, 2, 1, 3).reshape(k, -1)
        y = wt @ xn  # (n q_out, B), number by number
        y = y.reshape(q_out, n, -1).transpose(1, 0, 2).reshape(m, -1) + bias[:, None]
        return relu_in_place(y, relu)

    return forward, values.size * n


def component_product(structure: Structure, shape, positions, values, bias) -> tuple[Forward, int]:
    """(``W^T x + bias``, multiply-adds) for an element-stored component kernel of a table of
    single signed components (numba only): each stored component feeds its blocks' outputs."""
    c, rest = np.divmod(positions, int(np.prod(shape[1:])))
    return hyper_product(structure, shape, rest, values, c, bias)


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


def chain_arguments(products: list, relu: list[bool]) -> tuple | None:
    """The arguments after ``x`` of :func:`~qsparse.deploy.kernels.chain_matvec` that run
    ``products`` (one-column products of :func:`csr_product` or :func:`block_product`, as
    their ``csr`` or ``blocks`` attribute holds them) one after another, ``max(y, 0)`` after
    product ``l`` where ``relu[l]``; None if one of them is neither."""
    parts = []
    for f in products:
        if hasattr(f, "csr"):
            indptr, index, values, bias = f.csr
            parts.append((indptr, index, values, bias, 1, 0))
        elif hasattr(f, "blocks"):
            indptr, index, blocks, stride, bias = f.blocks
            parts.append((indptr, index, blocks.reshape(-1), bias, blocks.shape[1], stride))
        else:
            return None
    rows = entries = vals = biases = 0
    indptrs, layers = [], []
    for indptr, index, values, bias, n, stride in parts:
        indptrs.append(indptr[:-1] + entries)
        # v0: entry k's value (or block) starts at v0 + k n^2, k counted over every layer
        layers.append((rows, rows + len(indptr) - 1, n, stride, vals - n * n * entries, biases))
        rows, entries = rows + len(indptr) - 1, entries + len(index)
        vals, biases = vals + len(values), biases + len(bias)
    indptr = np.concatenate([*indptrs, np.array([entries], np.int64)])
    index, values, bias = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
    table = np.array(layers, np.int64)
    return indptr, index.astype(np.uint32), values, bias, table, np.array(relu, bool)
