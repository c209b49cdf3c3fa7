"""Hypercomplex weights for any algebra of :mod:`qsparse.algebras`, as pure jax functions.

A layer stores one component kernel ``hkernel`` of shape ``(n, ..., n_in, n_out)`` (``n`` the
algebra's dimension, ``n_in``/``n_out`` counted in hypercomplex units) and computes with the real
block kernel ``(..., n * n_in, n * n_out)`` on component-blocked features, as the quaternion
layers do. How the real kernel is built depends on the algebra's kind:

* ``table``: block (input ``b``, output ``a``) is ``sum_c A[c, b, a] w_c`` with the algebra's
  fixed structure constants ``A``;
* ``phm``: the same with structure constants the layer learns (``phm_rules``, shape
  ``(n, n, n)``). In Zhang et al.'s notation ``W = sum_i A_i kron S_i`` with
  ``A_i = phm_rules[i].T`` (output, input) and ``S_i = hkernel[i]``. Dense PHM layers compute
  the same product without building it (:func:`phm_dense`);
* ``hashed``: no algebra; the real kernel reads the ``hkernel`` entries (a quarter of the real
  count for ``n = 4``), each exactly ``n`` times, at positions fixed by a seed
  (:func:`qsparse.algebras.tied_positions`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qsparse import initializers
from qsparse.algebras import QUATERNION, Algebra, tied_positions

PHM_INITS = ("zhang", "hamilton")
CRITERIA = {"htorch": 0.5, "he": 2.0}
"""Target gain ``Var(y_a) / Var(x)`` of each real output unit at initialisation: ``htorch`` is
the quaternion layers' default (hTorch's σ = 1/sqrt(8 fan_in)), ``he`` He et al.'s."""


def table_kernel(table: jax.Array, kernel: jax.Array, groups: int = 1) -> jax.Array:
    """The real block kernel of ``kernel`` ``(n, ..., n_in, n_out)`` under structure constants
    ``table`` ``(n, n, n)``: ``real[..., (b, i), (g, a, o)] = sum_c table[c, b, a] w[c, ..., i,
    g, o]``, output channels group-major with ``groups > 1`` as
    :func:`qsparse.quaternion.left_matrix`. Works for blocks that mix components and for a learned
    (traced) table."""
    n = kernel.shape[0]
    *lead, n_in, n_out = kernel.shape[1:]
    w = kernel.reshape(n, *lead, n_in, groups, n_out // groups)
    real = jnp.einsum("cba,c...igo->...bigao", table.astype(kernel.dtype), w)
    return real.reshape(*lead, n * n_in, n * n_out)


def _mix(rules: jax.Array, parts: jax.Array) -> jax.Array:
    """``y[B, a, o] = sum_{b, c} rules[c, b, a] parts[B, b, c, o]`` as n² scaled slices added:
    XLA fuses it into one pass over ``parts``, where an einsum transposed ``parts`` first."""
    n = parts.shape[1]
    pairs = [(b, c) for b in range(n) for c in range(n)]
    terms = [[rules[c, b, a] * parts[:, b, c] for b, c in pairs] for a in range(n)]
    return jnp.stack([sum(t) for t in terms], axis=1)


def _unmix(rules: jax.Array, dy: jax.Array) -> jax.Array:
    """The cotangent of ``parts`` under :func:`_mix`: ``sum_a rules[c, b, a] dy[B, a, o]``."""
    n = dy.shape[1]
    rows = [[sum(rules[c, b, a] * dy[:, a] for a in range(n)) for c in range(n)] for b in range(n)]
    return jnp.stack([jnp.stack(r, axis=1) for r in rows], axis=1)


def _phm_parts(x, hkernel, precision):
    n, n_in, n_out = hkernel.shape
    side_by_side = jnp.concatenate(list(hkernel), axis=1)  # (i, (c, o)); by transpose: slower
    parts = jnp.dot(x.reshape(-1, n_in), side_by_side, precision=precision)
    return parts.reshape(-1, n, n, n_out), side_by_side  # (B, b, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def phm_dense(
    x: jax.Array, rules: jax.Array, hkernel: jax.Array, precision: Any = None
) -> jax.Array:
    """``x @ table_kernel(rules, hkernel)`` without the real kernel: every input component
    meets every component kernel in one matmul of the real layer's size (the component kernels
    laid side by side, ``(n_in, n * n_out)``, so the matmul is a plain one), then the rules mix
    the ``n x n`` products into the ``n`` output components. At the models' batch this costs
    far less than expanding the kernel through the traced rules, whose einsum and gradient
    (reductions over the whole real kernel) cost about as much as the matmul on CPU. The
    gradient is written out (:func:`_phm_dense_bwd`) so that XLA keeps the mixing elementwise
    (docs/performance.md)."""
    return _phm_dense_fwd(x, rules, hkernel, precision)[0]


def _phm_dense_fwd(x, rules, hkernel, precision):
    n, _, n_out = hkernel.shape
    parts, side_by_side = _phm_parts(x, hkernel, precision)
    y = _mix(rules.astype(parts.dtype), parts).reshape(*x.shape[:-1], n * n_out)
    return y, (x, rules, side_by_side, parts)


def _phm_dense_bwd(precision, residuals, dy):
    """Cotangents of :func:`phm_dense`: the input and the side-by-side kernels through the
    cotangent of the products (two matmuls of the layer's size), the rules from the products
    themselves (``sum_{B, o} dy[B, a, o] parts[B, b, c, o]``)."""
    x, rules, side_by_side, parts = residuals
    n, n_in = rules.shape[0], side_by_side.shape[0]
    dy = dy.reshape(parts.shape[0], n, -1)
    d_parts = _unmix(rules.astype(dy.dtype), dy).reshape(-1, side_by_side.shape[1])
    rows = x.reshape(-1, n_in)
    d_side = jnp.dot(rows.T, d_parts, precision=precision)
    dx = jnp.dot(d_parts, side_by_side.T, precision=precision).reshape(x.shape)
    d_rules = jnp.einsum("Bao,Bbco->cba", dy, parts, precision=precision)
    # one transpose, where split and stack were five ops (LeNet-300-100's step 1.19 -> 1.15x quat's)
    d_kernel = d_side.reshape(n_in, n, -1).transpose(1, 0, 2).astype(side_by_side.dtype)
    return dx.astype(x.dtype), d_rules.astype(rules.dtype), d_kernel


phm_dense.defvjp(_phm_dense_fwd, _phm_dense_bwd)


def dense(
    algebra: Algebra,
    inputs: jax.Array,
    hkernel: jax.Array,
    *,
    phm_rules: jax.Array | None = None,
    seed: int = 0,
    precision: Any = None,
) -> jax.Array:
    """A dense layer's ``inputs @ real kernel`` (no bias), what the linen and NNX
    ``HyperDense`` compute: PHM through :func:`phm_dense`, every other kind through its
    :func:`real_kernel`."""
    if algebra.kind == "phm":
        return phm_dense(inputs, phm_rules, hkernel, precision)
    return jnp.dot(inputs, real_kernel(algebra, hkernel, seed=seed), precision=precision)


def hashed_kernel(hkernel: jax.Array, seed: int) -> jax.Array:
    """The ``hashed`` kind's real kernel ``(..., n * n_in, n * n_out)`` from ``hkernel``
    ``(n, ..., n_in, n_out)``: each stored entry used ``n`` times at seed-fixed positions."""
    n = hkernel.shape[0]
    *lead, n_in, n_out = hkernel.shape[1:]
    index = tied_positions(hkernel.size * n, n, seed)
    return hkernel.reshape(-1)[index].reshape(*lead, n * n_in, n * n_out)


def real_kernel(
    algebra: Algebra,
    hkernel: jax.Array,
    *,
    phm_rules: jax.Array | None = None,
    seed: int = 0,
    groups: int = 1,
) -> jax.Array:
    """The real block kernel a layer of ``algebra`` computes with (see the module docstring).

    Tables whose blocks are single signed components (quaternions, complex, tessarines, ...) are
    expanded by stacking, :meth:`qsparse.algebras.Algebra.left_matrix`, which for ``quat`` is
    :func:`qsparse.quaternion.left_matrix` bit for bit; other tables go through the einsum."""
    if algebra.kind == "phm":
        return table_kernel(phm_rules, hkernel, groups)
    if algebra.kind == "hashed":
        if groups != 1:
            raise ValueError(f"algebra {algebra.name}: feature_group_count must be 1, got {groups}")
        return hashed_kernel(hkernel, seed)
    if algebra.signed_blocks:
        return algebra.left_matrix(hkernel, groups, xp=jnp)
    return table_kernel(jnp.asarray(algebra.table), hkernel, groups)


def block_gain(algebra: Algebra) -> float:
    """``g = max_a sum_{b,c} A[c, b, a]^2``: how many unit-variance weight components feed one
    real output per hypercomplex input (``n`` for the hashed kind, whose real weights are the
    stored ones; ``n * n * E[A^2] = 1`` for PHM's random rules, ``n`` for its Hamilton start)."""
    if algebra.kind == "hashed":
        return float(algebra.n)
    if algebra.kind == "phm":
        raise ValueError(f"algebra {algebra.name}: the gain depends on phm_init; use phm_gain")
    return float(np.max(np.sum(np.square(algebra.table.astype(np.float64)), axis=(0, 1))))


def phm_gain(n: int, phm_init: str) -> float:
    """:func:`block_gain` of PHM rules drawn by :func:`phm_rules_init`."""
    check_phm_init(phm_init)
    return 1.0 if phm_init == "zhang" else float(n)


def fan_in(shape: tuple, criterion: str) -> int:
    """Fan-in in hypercomplex units times the receptive field of ``(n, ..., n_in, n_out)``;
    ``htorch`` counts a square window by its side, as :func:`qsparse.initializers.htorch_fan_in`
    (the paper's models' convention), ``he`` by its area."""
    sides = shape[1:-2]
    if criterion == "htorch" and len(sides) > 1 and len(set(sides)) == 1:
        return shape[-2] * sides[0]
    return shape[-2] * math.prod(sides)


def init(algebra: Algebra, criterion: str = "htorch", phm_init: str = "zhang"):
    """The variance-preserving kernel initialiser of a layer of ``algebra``.

    The ``n`` components of each weight are i.i.d. ``N(0, σ²)`` with
    ``σ² = gain / (g · fan_in)``, so each real output unit has ``Var(y_a) = gain · Var(x)``:
    ``gain`` is 1/2 for ``htorch`` and 2 for ``he`` (:data:`CRITERIA`), ``g`` is
    :func:`block_gain` and ``fan_in`` :func:`fan_in`. For the quaternions
    (``g = 4``, σ² = 1/(8 fan_in) under ``htorch``) the law is hTorch's polar one with that σ,
    :func:`qsparse.initializers.htorch` itself, so a ``quat`` layer starts exactly where
    :class:`qsparse.layers.QDense` does.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {list(CRITERIA)}")
    if algebra is QUATERNION and criterion == "htorch":
        return initializers.htorch()
    if algebra.kind == "phm":
        g = phm_gain(algebra.n, phm_init)
    else:
        g = block_gain(algebra)

    def draw(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
        std = math.sqrt(CRITERIA[criterion] / (g * fan_in(shape, criterion)))
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return draw


def check_phm_init(phm_init: str) -> None:
    if phm_init not in PHM_INITS:
        raise ValueError(f"unknown phm_init {phm_init!r}; valid: {list(PHM_INITS)}")


def phm_rules_init(phm_init: str = "zhang"):
    """Initialiser of PHM's rules ``(n, n, n)``: ``zhang`` Glorot-uniform on the whole tensor as
    the PyTorch PHM layers draw it (fans ``n * n``, bound ``sqrt(3) / n``); ``hamilton`` the
    quaternion table (n = 4 only), so the layer starts as a quaternion layer."""
    check_phm_init(phm_init)

    def draw(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
        n = shape[0]
        if phm_init == "hamilton":
            if n != 4:
                raise ValueError(f"phm_init='hamilton' needs n=4, got n={n}; valid: ['zhang']")
            return jnp.asarray(QUATERNION.table, dtype)
        bound = math.sqrt(3.0) / n
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return draw
