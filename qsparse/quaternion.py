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
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

COMPONENTS = ("r", "i", "j", "k")

# HAMILTON[c, a, b] is the coefficient of p_c * q_b in (p ⊗ q)_a. It is the whole
# multiplication table, so every other operation below is derived from it.
HAMILTON = np.zeros((4, 4, 4), np.float32)
for _c, _a, _b, _s in [
    (0, 0, 0, 1),
    (1, 0, 1, -1),
    (2, 0, 2, -1),
    (3, 0, 3, -1),
    (1, 1, 0, 1),
    (0, 1, 1, 1),
    (3, 1, 2, -1),
    (2, 1, 3, 1),
    (2, 2, 0, 1),
    (3, 2, 1, 1),
    (0, 2, 2, 1),
    (1, 2, 3, -1),
    (3, 3, 0, 1),
    (2, 3, 1, -1),
    (1, 3, 2, 1),
    (0, 3, 3, 1),
]:
    HAMILTON[_c, _a, _b] = _s


def hamilton_product(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
    """Hamilton product ``p ⊗ q`` of quaternion arrays (component axis 0, broadcasting)."""
    return jnp.einsum("cab,c...,b...->a...", HAMILTON, p, q)


def conjugate(q: jnp.ndarray) -> jnp.ndarray:
    return q * jnp.array([1.0, -1.0, -1.0, -1.0], q.dtype).reshape((4,) + (1,) * (q.ndim - 1))


def norm(q: jnp.ndarray) -> jnp.ndarray:
    """Euclidean norm |q| over the component axis."""
    return jnp.sqrt(jnp.sum(jnp.square(q), axis=0))


# _LEFT_BLOCKS[b][a] = (c, sign): block (input component b, output component a) of the real
# kernel is sign * w[c], read off HAMILTON (exactly one c per (a, b)).
_LEFT_BLOCKS = tuple(
    tuple(
        next((c, int(HAMILTON[c, a, b])) for c in range(4) if HAMILTON[c, a, b]) for a in range(4)
    )
    for b in range(4)
)


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
    *lead, n_in, n_out = kernel.shape[1:]
    w = kernel.reshape(4, *lead, n_in, groups, n_out // groups)
    comps = [part.reshape(w.shape[1:]) for part in jnp.split(w, 4, axis=0)]
    block = lambda c, sign: comps[c] if sign > 0 else -comps[c]  # noqa: E731
    # real[..., b, i, g, a, o] = sign(a, b) * w[c(a, b), ..., i, g, o]
    real = jnp.stack(
        [jnp.stack([block(*_LEFT_BLOCKS[b][a]) for a in range(4)], axis=-2) for b in range(4)],
        axis=-5,
    )
    return real.reshape(*lead, 4 * n_in, 4 * n_out)


def to_components(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """Split a component-blocked feature axis into a leading component axis of size 4."""
    x = jnp.moveaxis(x, axis, -1)
    if x.shape[-1] % 4:
        raise ValueError(f"feature axis of size {x.shape[-1]} is not a multiple of 4")
    x = x.reshape(*x.shape[:-1], 4, x.shape[-1] // 4)
    return jnp.moveaxis(x, -2, 0)


def from_components(q: jnp.ndarray) -> jnp.ndarray:
    """Inverse of :func:`to_components` for ``axis=-1``."""
    return jnp.moveaxis(q, 0, -2).reshape(*q.shape[1:-1], 4 * q.shape[-1])


def blocked_flatten(x: jnp.ndarray) -> jnp.ndarray:
    """Flatten ``(batch, ..., 4 * c)`` activations to ``(batch, 4 * prod(...) * c)``, block layout.

    A plain reshape would interleave components per pixel; a quaternion dense layer after a
    quaternion conv needs ``[all r | all i | all j | all k]`` (what NCHW flattening gives in
    the paper's PyTorch code).
    """
    q = to_components(x)  # (4, batch, ..., c)
    q = q.reshape(4, q.shape[1], -1)
    return jnp.moveaxis(q, 0, 1).reshape(q.shape[1], -1)


def split_activation(fn, x: jnp.ndarray) -> jnp.ndarray:
    """Apply ``fn`` to each quaternion component separately (hTorch's split activations).

    For element-wise functions (ReLU, tanh, ...) this equals ``fn(x)`` on block-layout
    features, so the models simply call ``nn.relu``; this helper exists for functions that
    mix entries along the feature axis (softmax, normalisations).
    """
    q = to_components(x)
    return from_components(jnp.stack([fn(q[c]) for c in range(4)]))


# ---------------------------------------------------------------------------
# Input encodings: real images (..., H, W, C) -> component-blocked channels.
# ---------------------------------------------------------------------------

# torchvision's Grayscale weights (ITU-R 601-2 luma), as used by the paper's code.
_LUMA = (0.2989, 0.587, 0.114)


def _gray(rgb: jnp.ndarray) -> jnp.ndarray:
    return sum(w * rgb[..., c : c + 1] for c, w in enumerate(_LUMA))


def _check_channels(x: jnp.ndarray, channels: int, name: str) -> None:
    if x.shape[-1] != channels:
        raise ValueError(f"encoding '{name}' needs {channels} input channel(s), got {x.shape[-1]}")


def encode_rgb_gray(x: jnp.ndarray) -> jnp.ndarray:
    """(R, G, B) -> r=R, i=G, j=B, k=gray: the paper's CIFAR encoding (gray of the normalised
    image)."""
    _check_channels(x, 3, "rgb_gray")
    return jnp.concatenate([x, _gray(x)], axis=-1)


def encode_rgb_pure(x: jnp.ndarray) -> jnp.ndarray:
    """(R, G, B) -> the pure quaternion 0 + R i + G j + B k."""
    _check_channels(x, 3, "rgb_pure")
    return jnp.concatenate([jnp.zeros_like(x[..., :1]), x], axis=-1)


def encode_gray_pure(x: jnp.ndarray) -> jnp.ndarray:
    """Grayscale x -> 0 + x i + x j + x k (Parcollet's advice for one-channel images)."""
    _check_channels(x, 1, "gray_pure")
    return jnp.concatenate([jnp.zeros_like(x), x, x, x], axis=-1)


def encode_none(x: jnp.ndarray) -> jnp.ndarray:
    """Channels are already component-blocked (their count must be a multiple of 4)."""
    if x.shape[-1] % 4:
        raise ValueError(
            f"encoding 'none' needs a channel count divisible by 4, got {x.shape[-1]}; "
            f"choose one of {sorted(ENCODINGS)}"
        )
    return x


ENCODINGS = {
    "rgb_gray": encode_rgb_gray,
    "rgb_pure": encode_rgb_pure,
    "gray_pure": encode_gray_pure,
    "none": encode_none,
}


def get_encoding(name: str):
    try:
        return ENCODINGS[name]
    except KeyError:
        raise ValueError(f"unknown input encoding {name!r}; valid: {sorted(ENCODINGS)}") from None


def default_encoding(channels: int) -> str:
    """The paper's choice for RGB, Parcollet's for grayscale, pass-through otherwise."""
    return {3: "rgb_gray", 1: "gray_pure"}.get(channels, "none")
