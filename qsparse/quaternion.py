"""Quaternion algebra as pure functions.

Conventions used across qsparse:

* A quaternion array has its four components ``(r, i, j, k)`` on a leading
  axis of size 4: ``q[0]`` is the real part, ``q[1:]`` the imaginary parts.
* Activations use the *component-blocked* feature layout of hTorch and
  Parcollet et al.: a real feature axis of size ``4 * n`` holds
  ``[r_1..r_n | i_1..i_n | j_1..j_n | k_1..k_n]``.
* A layer stores its kernel with the component axis first (``(4, ..., in, out)``)
  and computes ``W ⊗ x`` (weight on the left) through the real block matrix::

      [[r, -i, -j, -k],
       [i,  r, -k,  j],
       [j,  k,  r, -i],
       [k, -j,  i,  r]]

  whose rows are output components and columns input components.

The tables live in :mod:`qsparse.algebras` and the array code shared with the numpy runtime in
:mod:`qsparse.ops` (both importable without jax); this module applies them to jax arrays.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from qsparse import ops
from qsparse.algebras import QUATERNION

COMPONENTS = QUATERNION.components

# HAMILTON[c, a, b] is the coefficient of p_c * q_b in (p ⊗ q)_a: the structure constants of
# qsparse.algebras.QUATERNION (A[c, b, a]) with the output axis second.
HAMILTON = np.ascontiguousarray(QUATERNION.table.transpose(0, 2, 1))


def hamilton_product(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
    """Hamilton product ``p ⊗ q`` of quaternion arrays (component axis 0, broadcasting)."""
    return jnp.einsum("cab,c...,b...->a...", HAMILTON, p, q)


def conjugate(q: jnp.ndarray) -> jnp.ndarray:
    return q * jnp.array([1.0, -1.0, -1.0, -1.0], q.dtype).reshape((4,) + (1,) * (q.ndim - 1))


def norm(q: jnp.ndarray) -> jnp.ndarray:
    """Euclidean norm |q| over the component axis."""
    return jnp.sqrt(jnp.sum(jnp.square(q), axis=0))


def left_matrix(kernel: jnp.ndarray, groups: int = 1) -> jnp.ndarray:
    """Expand a component kernel ``(4, ..., n_in, n_out)`` to the real block kernel
    ``(..., 4 * n_in, 4 * n_out)`` acting on component-blocked features.

    ``x_real @ left_matrix(w)`` equals ``W ⊗ x`` for every (input, output) pair. With
    ``groups > 1`` (grouped convolution, ``n_in`` counted per group) the output channels are
    ordered group-major, ``(group, component, unit)``, as a grouped real convolution expects.

    The blocks are signed copies of the components, placed by stacking. The components are
    taken with ``split``, whose transpose is one ``concatenate``: the gradient then fuses into one
    loop (indexing ``w[c]`` would transpose to 16 separate pads), which makes it cheaper than the
    equivalent einsum with :data:`HAMILTON`.
    """
    return QUATERNION.left_matrix(kernel, groups, xp=jnp)


def to_components(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """Split a component-blocked feature axis into a leading component axis of size 4."""
    return ops.to_components(x, axis, xp=jnp)


def from_components(q: jnp.ndarray) -> jnp.ndarray:
    """Inverse of :func:`to_components` for ``axis=-1``."""
    return ops.from_components(q, xp=jnp)


def blocked_flatten(x: jnp.ndarray) -> jnp.ndarray:
    """:func:`qsparse.ops.blocked_flatten`: ``[all r | all i | all j | all k]`` per example."""
    return ops.blocked_flatten(x, 4, xp=jnp)


def split_activation(fn, x: jnp.ndarray) -> jnp.ndarray:
    """Apply ``fn`` to each quaternion component separately (hTorch's split activations).

    For element-wise functions (ReLU, tanh, ...) this equals ``fn(x)`` on block-layout
    features, so the models simply call ``nn.relu``; this helper exists for functions that
    mix entries along the feature axis (softmax, normalisations).
    """
    q = to_components(x)
    return from_components(jnp.stack([fn(q[c]) for c in range(4)]))


# Input encodings, real images (..., H, W, C) -> component-blocked channels: those of
# qsparse.ops on jax arrays.
ENCODINGS = {name: functools.partial(fn, xp=jnp) for name, fn in ops.ENCODINGS.items()}
encode_rgb_gray, encode_rgb_pure, encode_gray_pure, encode_none = ENCODINGS.values()


def get_encoding(name: str):
    try:
        return ENCODINGS[name]
    except KeyError:
        raise ValueError(f"unknown input encoding {name!r}; valid: {sorted(ENCODINGS)}") from None


def default_encoding(channels: int) -> str:
    """The paper's choice for RGB, Parcollet's for grayscale, pass-through otherwise."""
    return {3: "rgb_gray", 1: "gray_pure"}.get(channels, "none")
