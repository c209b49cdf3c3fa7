"""The algebras qsparse computes in, as numpy tables: importable without jax.

An algebra of dimension ``n`` is given by its structure constants ``A[i, j, k]``, the coefficient
of ``e_k`` in the product of basis elements ``e_i e_j``, so that ``(p q)_k = sum_ij A[i, j, k]
p_i q_j``. The JAX layers (:mod:`qsparse.quaternion`), the numpy runtime (:mod:`qsparse.deploy`)
and the analysis (:mod:`qsparse.results`) all read the quaternion table from here, so nothing of
it is copied across the jax/numpy line.

The algebras are registered by name (:func:`get`, :func:`names`, :func:`register` for a user's
own table): ``real``, ``complex``, ``quat``, ``tessarine`` and ``klein4`` by their tables, and
``phm2``, ``phm4`` (structure constants each layer learns) and ``hashed4`` (tied real weights)
as kinds of their own, for :mod:`qsparse.hyper`'s layers.

A layer computes ``W x`` (weight on the left) through its real block matrix: block (input
component ``b``, output component ``a``) is ``sum_c A[c, b, a] w_c``. For the quaternions every
block is one signed component (:meth:`Algebra.left_blocks`)::

    [[r, -i, -j, -k],
     [i,  r, -k,  j],
     [j,  k,  r, -i],
     [k, -j,  i,  r]]   rows: output components, columns: input components
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from types import ModuleType

import numpy as np

# torchvision's Grayscale weights (ITU-R 601-2 luma) for (R, G, B), as the paper's code uses.
LUMA = (0.2989, 0.587, 0.114)


def structure_constants(units: Sequence[str], cayley: Sequence[Sequence[str]]) -> np.ndarray:
    """``A[i, j, k]`` from a Cayley table: ``cayley[i][j]`` names ``e_i e_j`` as a signed unit
    (``"k"``, ``"-1"``) or ``"0"``."""
    n = len(units)
    if len(cayley) != n or any(len(row) != n for row in cayley):
        raise ValueError(f"a Cayley table of {n} units needs {n} rows of {n} entries")
    table = np.zeros((n, n, n), np.float32)
    for i, row in enumerate(cayley):
        for j, entry in enumerate(row):
            if entry == "0":
                continue
            sign, unit = (-1, entry[1:]) if entry.startswith("-") else (1, entry)
            if unit not in units:
                raise ValueError(f"Cayley entry {entry!r} names no unit; valid: {list(units)}")
            table[i, j, units.index(unit)] = sign
    return table


KINDS = ("table", "phm", "hashed")


@dataclasses.dataclass(frozen=True, eq=False)
class Algebra:
    """An algebra: its ``name``, its ``components`` (names of the coordinates, real part first)
    and its structure constants ``table`` (``A[i, j, k]``, float32, shape ``(n, n, n)``).

    ``kind`` says how a layer builds its real weight: ``"table"`` from the fixed ``table``;
    ``"phm"`` from structure constants each layer learns (no fixed table, ``table`` is None);
    ``"hashed"`` by tying real weights in groups of ``n`` (no algebra, ``table`` is None).
    """

    name: str
    components: tuple[str, ...]
    table: np.ndarray | None
    kind: str = "table"

    def __post_init__(self):
        n = len(self.components)
        if self.kind not in KINDS:
            raise ValueError(f"algebra {self.name}: kind {self.kind!r}; valid: {list(KINDS)}")
        if (self.table is None) != (self.kind != "table"):
            raise ValueError(f"algebra {self.name}: a table belongs to kind 'table' only")
        if self.table is None:
            return
        if self.table.shape != (n, n, n):
            raise ValueError(f"algebra {self.name}: table {self.table.shape}, expected {(n,) * 3}")
        self.table.setflags(write=False)

    @functools.cached_property
    def is_associative(self) -> bool | None:
        """``(e_i e_j) e_l == e_i (e_j e_l)`` for all basis elements; None without a table."""
        if self.table is None:
            return None
        t = self.table.astype(np.float64)
        left = np.einsum("ijm,mlk->ijlk", t, t)
        right = np.einsum("jlm,imk->ijlk", t, t)
        return bool(np.allclose(left, right))

    @functools.cached_property
    def is_commutative(self) -> bool | None:
        """``e_i e_j == e_j e_i`` for all basis elements; None without a table."""
        if self.table is None:
            return None
        return bool(np.array_equal(self.table, self.table.transpose(1, 0, 2)))

    @property
    def n(self) -> int:
        """The dimension: how many real components an element has."""
        return len(self.components)

    def product(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``p q`` of arrays with the component axis first (numpy, broadcasting)."""
        return np.einsum("ijk,i...,j...->k...", self.table, p, q)

    @functools.cached_property
    def left_blocks(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """``left_blocks[b][a] = (c, sign)``: block (input ``b``, output ``a``) of the real matrix
        of a left factor ``w`` is ``sign * w_c``. ValueError for an algebra whose blocks mix
        components."""
        blocks = []
        for b in range(self.n):
            row = []
            for a in range(self.n):
                (cs,) = np.nonzero(self.table[:, b, a])
                if len(cs) != 1 or abs(self.table[cs[0], b, a]) != 1:
                    raise ValueError(
                        f"algebra {self.name}: block ({b}, {a}) is not one signed component"
                    )
                row.append((int(cs[0]), int(self.table[cs[0], b, a])))
            blocks.append(tuple(row))
        return tuple(blocks)

    @functools.cached_property
    def signed_blocks(self) -> bool:
        """Whether every block of the left matrix is one signed component (:attr:`left_blocks`
        exists): true of the quaternions, complex numbers, tessarines, Klein-four algebra."""
        if self.table is None:
            return False
        hits = np.count_nonzero(self.table, axis=0)
        return bool(np.all(hits == 1) and np.all(np.abs(self.table.sum(axis=0)) == 1))

    @property
    def left_terms(self) -> tuple[tuple[int, int, int, int], ...]:
        """The blocks as ``(b, a, c, sign)``, input component outermost."""
        return tuple((b, a, *self.left_blocks[b][a]) for b in range(self.n) for a in range(self.n))

    def left_matrix(self, kernel, groups: int = 1, *, xp: ModuleType = np):
        """A component kernel ``(n, ..., n_in, n_out)`` as the real block kernel
        ``(..., n * n_in, n * n_out)`` acting on component-blocked features (``xp``: numpy or
        jax.numpy).

        With ``groups > 1`` (grouped convolution, ``n_in`` counted per group) the output channels
        are ordered group-major, ``(group, component, unit)``. The blocks are signed copies of
        the components, taken with ``split`` and placed by stacking.
        """
        n = self.n
        *lead, n_in, n_out = kernel.shape[1:]
        w = kernel.reshape(n, *lead, n_in, groups, n_out // groups)
        comps = [part.reshape(w.shape[1:]) for part in xp.split(w, n, axis=0)]
        block = lambda c, sign: comps[c] if sign > 0 else -comps[c]  # noqa: E731
        # real[..., b, i, g, a, o] = sign(a, b) * w[c(a, b), ..., i, g, o]
        real = xp.stack(
            [
                xp.stack([block(*self.left_blocks[b][a]) for a in range(n)], axis=-2)
                for b in range(n)
            ],
            axis=-5,
        )
        return real.reshape(*lead, n * n_in, n * n_out)


QUATERNION = Algebra(
    name="quat",
    components=("r", "i", "j", "k"),
    table=structure_constants(
        ("1", "i", "j", "k"),
        (
            ("1", "i", "j", "k"),
            ("i", "-1", "k", "-j"),
            ("j", "-k", "-1", "i"),
            ("k", "j", "-i", "-1"),
        ),
    ),
)
COMPONENTS = QUATERNION.components


def _table_algebra(name: str, units: tuple[str, ...], cayley: tuple[tuple[str, ...], ...]):
    return Algebra(name, ("r", *units[1:]), structure_constants(units, cayley))


def _kind(name: str, n: int, kind: str) -> Algebra:
    return Algebra(name, tuple(f"e{c}" for c in range(n)), None, kind)


_REGISTRY: dict[str, Algebra] = {}


def names() -> list[str]:
    """The registered algebras' names, in registration order (built-ins first)."""
    return list(_REGISTRY)


def get(name: str | Algebra) -> Algebra:
    """The registered algebra called ``name`` (an :class:`Algebra` is returned as is)."""
    if isinstance(name, Algebra):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algebra {name!r}; valid: {names()}") from None


def register(algebra: Algebra) -> Algebra:
    """Add a user's algebra (e.g. ``Algebra("dual", ("r", "e"), structure_constants(...))``).

    Refuses a name already taken and a table that is not finite or leaves an output component
    unreachable (a layer would have a dead output block)."""
    if not isinstance(algebra, Algebra):
        raise TypeError(f"register takes an Algebra, got {type(algebra).__name__}")
    if algebra.name in _REGISTRY:
        raise ValueError(f"algebra {algebra.name!r} is already registered; taken: {names()}")
    if algebra.table is not None:
        if not np.all(np.isfinite(algebra.table)):
            raise ValueError(f"algebra {algebra.name!r}: table has non-finite entries")
        dead = [k for k in range(algebra.n) if not np.any(algebra.table[..., k])]
        if dead:
            raise ValueError(
                f"algebra {algebra.name!r}: no product reaches component(s) {dead}; "
                f"every one of {list(range(algebra.n))} must be reachable"
            )
    _REGISTRY[algebra.name] = algebra
    return algebra


REAL = register(_table_algebra("real", ("1",), (("1",),)))
COMPLEX = register(_table_algebra("complex", ("1", "i"), (("1", "i"), ("i", "-1"))))
register(QUATERNION)
# Tessarines (bicomplex numbers): i^2 = -1, j^2 = +1, k = ij = ji, so k^2 = -1; commutative.
TESSARINE = register(
    _table_algebra(
        "tessarine",
        ("1", "i", "j", "k"),
        (
            ("1", "i", "j", "k"),
            ("i", "-1", "k", "-j"),
            ("j", "k", "1", "i"),
            ("k", "-j", "i", "-1"),
        ),
    )
)
# The group algebra of the Klein four-group {1, a, b, c}: every element its own inverse, the
# product of two non-identity elements the third; all signs +.
KLEIN4 = register(
    _table_algebra(
        "klein4",
        ("1", "a", "b", "c"),
        (
            ("1", "a", "b", "c"),
            ("a", "1", "c", "b"),
            ("b", "c", "1", "a"),
            ("c", "b", "a", "1"),
        ),
    )
)
PHM2 = register(_kind("phm2", 2, "phm"))
PHM4 = register(_kind("phm4", 4, "phm"))
HASHED4 = register(_kind("hashed4", 4, "hashed"))


def tied_positions(size: int, n: int, seed: int) -> np.ndarray:
    """The ``hashed`` kind's tying: ``size`` real weights (a multiple of ``n``) read ``size // n``
    parameters, each exactly ``n`` times, at positions fixed by ``seed`` (int32 indices)."""
    if size % n:
        raise ValueError(f"tied_positions: size {size} is not a multiple of n={n}")
    order = np.random.default_rng(seed).permutation(size)
    return (order % (size // n)).astype(np.int32)
