"""Device-side preprocessing, pure JAX, used inside compiled code.

:func:`normalize` and :func:`augment` (random crop with zero padding + horizontal flip, the CIFAR
recipe of the paper). ``augment`` takes one PRNG key *per example*, so the transform of example
``b`` depends only on ``(keys[b], images[b])`` and a batch split across devices reproduces the
single-device result exactly. Kept apart from :mod:`qsparse.data` so that training needs no
tensorflow-datasets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qsparse import ops


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """``(images / 255 - mean) / std`` in float32, per channel (last axis), as a jax array.

    ``images`` hold pixel values in ``[0, 255]`` (uint8 or float); ``mean``/``std`` are in
    ``[0, 1]`` units as in :data:`qsparse.data.DATASETS`, matching torchvision's ``ToTensor`` +
    ``Normalize``. The numpy runtime runs the same code (:func:`qsparse.ops.normalize`).
    """
    return ops.normalize(images, mean, std, xp=jnp)


def sample_augmentation(keys: jax.Array, *, padding: int = 4) -> tuple[jax.Array, jax.Array]:
    """Per-example crop offsets ``(B, 2)`` in ``[0, 2 * padding]`` and flip flags ``(B,)``.

    ``keys`` is a ``(B,)`` array of typed PRNG keys (``jax.random.key``/``jax.random.split``);
    example ``b``'s parameters depend on ``keys[b]`` alone.
    """
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) or keys.ndim != 1:
        raise TypeError(
            "keys must be a (B,) array of typed PRNG keys (jax.random.key), got "
            f"{keys.dtype}{keys.shape}"
        )

    def one(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        crop_key, flip_key = jax.random.split(key)
        return jax.random.randint(crop_key, (2,), 0, 2 * padding + 1), jax.random.bernoulli(
            flip_key
        )

    return jax.vmap(one)(keys)


def crop_and_flip(
    images: jax.Array, offsets: jax.Array, flips: jax.Array, *, padding: int = 4
) -> jax.Array:
    """Zero-pad ``images`` (B, H, W, C) by ``padding`` pixels, crop H×W at ``offsets``, flip.

    Deterministic given its arguments; dtype and shape are preserved. ``offsets[b] = (dy, dx)``
    picks the crop's top-left corner in the padded image; ``flips[b]`` mirrors left-right.
    """

    def one(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
        h, w, c = image.shape
        padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
        crop = jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(images, offsets, flips)


def augment(keys: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
    """Random crop with ``padding``-pixel zero padding + random horizontal flip, per example.

    ``keys`` is a ``(B,)`` array of typed PRNG keys, one per image (e.g.
    ``jax.random.split(key, B)``), so the result for example ``b`` depends only on
    ``(keys[b], images[b])``: any split of the batch, with the matching split of ``keys``,
    reproduces the whole-batch result. Apply it to raw pixels, *before* :func:`normalize`, so the
    padding is black as with torchvision's ``RandomCrop(padding=4)``. Works on uint8 or float
    ``(B, H, W, C)`` images and inside ``jit``/``vmap``/``shard_map``.
    """
    offsets, flips = sample_augmentation(keys, padding=padding)
    return crop_and_flip(images, offsets, flips, padding=padding)
