"""The algebras qsparse computes in, as numpy tables: importable without jax.

An algebra of dimension ``n`` is given by its structure constants ``A[i, j, k]``, the coefficient
of ``e_k`` in the product of basis elements ``e_i e_j``, so that ``(p q)_k = sum_ij A[i, j, k]
p_i q_j``. The JAX layers (:mod:`qsparse.quaternion`), the numpy runtime (:mod:`qsparse.deploy`)
and the analysis (:mod:`qsparse.results`) all read the quaternion table from here, so nothing of
it is copied across the jax/numpy line.

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


@dataclasses.dataclass(frozen=True, eq=False)
class Algebra:
    """An algebra: its ``name``, its ``components`` (names of the coordinates, real part first)
    and its structure constants ``table`` (``A[i, j, k]``, float32, shape ``(n, n, n)``)."""

    name: str
    components: tuple[str, ...]
    table: np.ndarray

    def __post_init__(self):
        n = len(self.components)
        if self.table.shape != (n, n, n):
            raise ValueError(f"algebra {self.name}: table {self.table.shape}, expected {(n,) * 3}")
        self.table.setflags(write=False)

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
    name="quaternion",
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
