"""Quaternion kernel initialisers: pure functions of a PRNG key.

Every initialiser here has the Flax signature ``init(key, shape, dtype) -> array`` for a
component kernel of shape ``(4, *receptive_field, n_in, n_out)``. Fans are counted in
quaternion units times the receptive field, as hTorch and Parcollet et al. do:
``fan_in = n_in * prod(receptive_field)``, with one exception that the paper inherited (below).

The three families differ by the law of one quaternion weight ``w``:

* ``htorch`` (what the paper used): polar form ``w = m (cos θ + u sin θ)`` with modulus
  ``m ~ σ·chi(4)``, phase ``θ ~ U(-π, π)`` and axis ``u`` a pure unit quaternion, with
  ``σ = 1/sqrt(8 fan_in)``. So ``E|w|² = 4σ² = 1 / (2 fan_in)``. The paper's conv models pass
  hTorch ``kernel_size=3``, an int, and hTorch takes the receptive field as
  ``np.prod(kernel_size) = 3``: a k×k (or k×k×k) kernel counts as k, not k², so the paper's
  quaternion conv weights are sqrt(k) larger than the formula says (sqrt(3) for 3×3).
  ``htorch`` reproduces that, so tickets start where the paper's did; ``htorch_consistent`` is
  the same law with the full receptive field. Dense kernels and 1-d convolutions are the same
  under both; a kernel whose sides differ (hTorch would have been given a tuple) counts its area
  under both.
* ``parcollet``: the same polar law with ``σ = 1/sqrt(2 fan_in)`` ("he", ``E|w|² = 2/fan_in``,
  He-consistent for every real output component) or ``σ = 1/sqrt(2 (fan_in + fan_out))``
  ("glorot"). Note the factor 4 in variance between ``htorch`` and ``parcollet_he``.
* ``isotropic``: ``w ~ σ N(0, I_4)`` with the He or Glorot σ above: same ``E|w|²`` as the
  polar law, but the energy is spread evenly over the four components (the polar law puts on
  average half of it in the real part).

The polar axis is drawn as both reference implementations draw it: components ``U(-1, 1)``,
then normalised.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, tuple, jnp.dtype], jax.Array]


def fans(shape: tuple) -> tuple[int, int]:
    """(fan_in, fan_out) in quaternion units × receptive field for a component kernel shape."""
    if len(shape) < 3 or shape[0] != 4:
        raise ValueError(f"a component kernel has shape (4, ..., n_in, n_out), got {shape}")
    receptive = int(np.prod(shape[1:-2])) if len(shape) > 3 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def htorch_fan_in(shape: tuple) -> int:
    """hTorch's fan-in for a kernel built with an int ``kernel_size``: the side, not the area."""
    fan_in, _ = fans(shape)
    sides = shape[1:-2]
    if len(sides) > 1 and len(set(sides)) == 1:
        return shape[-2] * sides[0]
    return fan_in


CRITERIA = ("glorot", "he", "htorch", "htorch_consistent")


def sigma(shape: tuple, criterion: str) -> float:
    """The σ of the polar (or isotropic) law under ``criterion`` (one of :data:`CRITERIA`)."""
    fan_in, fan_out = fans(shape)
    if criterion == "he":
        return 1.0 / math.sqrt(2.0 * fan_in)
    if criterion == "glorot":
        return 1.0 / math.sqrt(2.0 * (fan_in + fan_out))
    if criterion == "htorch":
        return 1.0 / math.sqrt(8.0 * htorch_fan_in(shape))
    if criterion == "htorch_consistent":
        return 1.0 / math.sqrt(8.0 * fan_in)
    raise ValueError(f"unknown criterion {criterion!r}; valid: {list(CRITERIA)}")


def _polar(key: jax.Array, shape: tuple, dtype, scale: float) -> jax.Array:
    # Drawn on the flattened receptive field and reshaped at the end: the same numbers bit for
    # bit (random bits are drawn flat, the rest is elementwise), but XLA:CPU compiles the sin
    # and cos of a flat array several times faster than of a 4-d one.
    k_mod, k_phase, k_axis = jax.random.split(key, 3)
    n = math.prod(shape[1:])
    # chi(4) as the norm of four standard normals: same law, and far cheaper to compile than
    # jax.random.chisquare's gamma sampler (a rejection loop).
    modulus = scale * jnp.sqrt(
        jnp.sum(jnp.square(jax.random.normal(k_mod, (4, n), jnp.float32)), axis=0)
    )
    phase = jax.random.uniform(k_phase, (n,), jnp.float32, -math.pi, math.pi)
    axis = jax.random.uniform(k_axis, (3, n), jnp.float32, -1.0, 1.0)
    axis = axis / jnp.sqrt(jnp.sum(axis**2, axis=0, keepdims=True) + 1e-12)
    real = modulus * jnp.cos(phase)
    imag = modulus * jnp.sin(phase) * axis
    return jnp.concatenate([real[None], imag], axis=0).reshape(shape).astype(dtype)


def htorch(criterion: str = "htorch") -> Initializer:
    """hTorch's default ("he" mode) polar initialiser, σ = 1/sqrt(8 fan_in).

    ``criterion="htorch"`` counts fan-in as the paper's models got it (kernel side, see the module
    docstring); ``"htorch_consistent"`` counts the whole receptive field.
    """
    if criterion not in ("htorch", "htorch_consistent"):
        raise ValueError(f"unknown criterion {criterion!r}; valid: ['htorch', 'htorch_consistent']")
    return lambda key, shape, dtype=jnp.float32: _polar(key, shape, dtype, sigma(shape, criterion))


def parcollet(criterion: str = "he") -> Initializer:
    """Parcollet et al.'s polar initialiser with the He or Glorot σ."""
    sigma((4, 1, 1), criterion)  # validate the name now, not at first use
    return lambda key, shape, dtype=jnp.float32: _polar(key, shape, dtype, sigma(shape, criterion))


def isotropic(criterion: str = "he") -> Initializer:
    """σ·N(0, I_4) per quaternion: the polar modulus law with a uniformly random direction."""
    sigma((4, 1, 1), criterion)

    def init(key, shape, dtype=jnp.float32):
        return (sigma(shape, criterion) * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


QUATERNION_INITS = {
    "htorch": htorch,
    "htorch_consistent": lambda: htorch("htorch_consistent"),
    "parcollet_he": lambda: parcollet("he"),
    "parcollet_glorot": lambda: parcollet("glorot"),
    "isotropic": lambda: isotropic("he"),
}


def get(name: str) -> Initializer:
    try:
        return QUATERNION_INITS[name]()
    except KeyError:
        raise ValueError(
            f"unknown quaternion init {name!r}; valid: {sorted(QUATERNION_INITS)}"
        ) from None


def expected_sq_norm(name: str, shape: tuple) -> float:
    """E|w|² of one quaternion weight under initialiser ``name`` (documented law, used by tests)."""
    criterion = {
        "htorch": "htorch",
        "htorch_consistent": "htorch_consistent",
        "parcollet_he": "he",
        "parcollet_glorot": "glorot",
        "isotropic": "he",
    }
    if name not in criterion:
        raise ValueError(f"unknown quaternion init {name!r}; valid: {sorted(criterion)}")
    return 4.0 * sigma(shape, criterion[name]) ** 2


# Real layers: PyTorch's default Linear/Conv init (Kaiming-uniform, a=sqrt(5)), i.e. weights and
# biases ~ U(±1/sqrt(fan_in)). The paper's real layers (and the real output layer of its quaternion
# models) were initialised this way.
torch_kernel = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias(fan_in: int) -> Initializer:
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )
