"""Batch normalisation of hypercomplex features, in the three forms the literature uses.

Features are component-blocked as every qsparse layer's (:mod:`qsparse.quaternion`): a feature
axis of ``F = n C`` real units holds component 0 of the ``C`` channels, then component 1, and so
on. Statistics are taken over every axis but the last, so dense ``(B, F)`` and convolutional
``(B, H, W, F)`` activations are both handled. With ``d = x - mu`` (``mu`` the mean of each real
feature) the forms normalise:

* ``split``: each real feature on its own, ``x^ = d / sqrt(var + eps)``: a real batch norm over
  all ``n C`` features, what the quaternion ResNets of Mukhopadhyay et al. use. Learnable
  ``scale`` and ``bias`` per real feature.
* ``shared``: one variance per hypercomplex channel, the mean of its ``n`` component variances,
  ``s = E|d|^2 / n``, and ``x^ = d / sqrt(s + eps)``, so the normalised channel has unit shared
  variance: ``E|x^|^2 / n = 1``, each component unit variance on average, the scale of ``split``.
  (SpeechBrain's QBatchNorm divides by ``E|d|^2`` without ``/ n``, which starts each component
  ``sqrt(n)`` smaller.) Learnable ``scale`` per hypercomplex channel, ``bias`` per real feature.
* ``whiten`` (Trabelsi et al.; Gaudet and Maida): ``x^ = L^-1 d`` per channel, with ``L`` the
  lower Cholesky factor of the channel's ``n x n`` covariance plus ``eps I``, so ``x^`` has
  identity covariance. Learnable symmetric ``n x n`` ``gamma`` per channel, stored as its upper
  triangle (``n (n + 1) / 2`` numbers, row by row as ``numpy.triu_indices``) and initialised to
  ``0.5 I`` (output covariance ``0.25 I``); ``bias`` per real feature (a hypercomplex beta).

For ``n = 1`` (``real``) ``split`` and ``shared`` are the ordinary batch norm and ``whiten`` is
it with the scale started at 0.5. The ``hashed`` kind has no algebra whose components a shared
variance or covariance could describe, so it takes ``split`` only.

Running statistics (``mean``; ``var`` per feature or per channel; ``cov`` ``(C, n, n)``) follow
``new = momentum * old + (1 - momentum) * batch`` with the biased batch variance, as flax's
BatchNorm; the default ``momentum=0.9`` is PyTorch's ``momentum=0.1`` (flax's own default is
0.99).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsparse import algebras
from qsparse.algebras import Algebra

FORMS = ("split", "shared", "whiten")
Stats = tuple[jax.Array, jax.Array]


def forms(algebra: Algebra) -> tuple[str, ...]:
    """The forms that apply to ``algebra``: all three, ``split`` only for the hashed kind."""
    return ("split",) if algebra.kind == "hashed" else FORMS


def check(algebra: str | Algebra, form: str, features: int) -> tuple[Algebra, int]:
    """The algebra and the channel count ``C``; refuses a form that does not apply to the
    algebra and a feature count not a multiple of ``n``."""
    algebra = algebras.get(algebra)
    if form not in forms(algebra):
        raise ValueError(
            f"batch norm form {form!r} does not apply to algebra {algebra.name}; "
            f"valid: {list(forms(algebra))}"
        )
    if features % algebra.n:
        raise ValueError(
            f"HyperBatchNorm: {features} features are not a multiple of n={algebra.n} "
            f"(algebra {algebra.name}, component-blocked)"
        )
    return algebra, features // algebra.n


def _blocked(x: jax.Array, n: int) -> jax.Array:
    """``(..., n C)`` -> ``(..., n, C)``."""
    return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)


def _pmean(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def batch_stats(x: jax.Array, n: int, form: str, *, axis_name: str | None = None) -> Stats:
    """``(mean, second)``: the mean ``(F,)`` and the form's second moment of the centred batch,
    ``var`` ``(F,)`` (split), ``(C,)`` (shared) or ``cov`` ``(C, n, n)`` (whiten), biased, at least
    float32. With ``axis_name`` both are averaged over that mapped axis (equal shards)."""
    x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = _pmean(x.mean(axes), axis_name)
    d = x - mean
    if form == "whiten":
        db = _blocked(d, n).reshape(-1, n, d.shape[-1] // n)
        second = jnp.einsum("bac,bdc->cad", db, db) / db.shape[0]
    else:
        second = jnp.square(d).mean(axes)
        if form == "shared":
            second = _blocked(second, n).mean(0)
    return mean, _pmean(second, axis_name)


def whitening(cov: jax.Array, epsilon: float) -> jax.Array:
    """``L^-1`` ``(C, n, n)`` for ``L L^T = cov + eps I``, ``L`` lower triangular."""
    n = cov.shape[-1]
    eye = jnp.eye(n, dtype=cov.dtype)
    chol = jnp.linalg.cholesky(cov + epsilon * eye)
    return jax.scipy.linalg.solve_triangular(chol, jnp.broadcast_to(eye, cov.shape), lower=True)


def _per_channel(matrix: jax.Array, xb: jax.Array) -> jax.Array:
    """``matrix[c] @ x[..., :, c]`` for every channel ``c`` of blocked ``xb`` ``(..., n, C)``."""
    return jnp.einsum("cad,...dc->...ac", matrix, xb)


def normalize(x: jax.Array, n: int, form: str, stats: Stats, epsilon: float) -> jax.Array:
    """The normalised ``x^`` (before scale and shift) of ``x`` ``(..., n C)`` under ``stats``."""
    mean, second = stats
    d = x - mean
    if form == "split":
        return d * jax.lax.rsqrt(second + epsilon)
    if form == "shared":
        return (_blocked(d, n) * jax.lax.rsqrt(second + epsilon)).reshape(d.shape)
    return _per_channel(whitening(second, epsilon), _blocked(d, n)).reshape(d.shape)


def triangle_positions(n: int) -> np.ndarray:
    """``pos[a, b]``: where entry ``(min(a, b), max(a, b))`` sits in the upper triangle stored row
    by row, so ``tri[..., pos]`` is the full symmetric matrix."""
    rows, cols = np.triu_indices(n)
    pos = np.zeros((n, n), np.int32)
    pos[rows, cols] = pos[cols, rows] = np.arange(len(rows))
    return pos


def symmetric(tri: jax.Array, n: int) -> jax.Array:
    """The symmetric ``(..., n, n)`` matrices of upper triangles ``(..., n (n + 1) / 2)``."""
    return tri[..., triangle_positions(n)]


def gamma_init(n: int) -> Callable[..., jax.Array]:
    """``whiten``'s gamma initialiser: the triangle of ``0.5 I`` for every channel."""
    rows, cols = np.triu_indices(n)
    tri = np.where(rows == cols, 0.5, 0.0)

    def init(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
        del key
        return jnp.broadcast_to(jnp.asarray(tri, dtype), shape)

    return init


def scale_shift(xhat: jax.Array, n: int, form: str, scale: jax.Array, bias: jax.Array):
    """``gamma x^ + beta``: ``scale`` ``(F,)`` (split), ``(C,)`` (shared) or ``whiten``'s gamma
    triangles ``(C, n (n + 1) / 2)``; ``bias`` ``(F,)``."""
    if form == "split":
        return xhat * scale + bias
    xb = _blocked(xhat, n)
    y = xb * scale if form == "shared" else _per_channel(symmetric(scale, n), xb)
    return y.reshape(xhat.shape) + bias


def update(running: Stats, batch: Stats, momentum: float) -> Stats:
    """``momentum * running + (1 - momentum) * batch`` for the mean and the second moment,
    without gradient."""
    return tuple(
        jax.lax.stop_gradient(momentum * old + (1 - momentum) * new)
        for old, new in zip(running, batch, strict=True)
    )


def param_specs(form: str, n: int, channels: int) -> dict[str, tuple[Callable, tuple]]:
    """``{name: (initialiser, shape)}`` of the learnable parameters, scale first."""
    features = n * channels
    scale = {
        "split": ("scale", nn.initializers.ones, (features,)),
        "shared": ("scale", nn.initializers.ones, (channels,)),
        "whiten": ("gamma", gamma_init(n), (channels, n * (n + 1) // 2)),
    }[form]
    return {scale[0]: scale[1:], "bias": (nn.initializers.zeros, (features,))}


def initial_stats(form: str, n: int, channels: int) -> dict[str, jax.Array]:
    """The running statistics before any batch: zero mean, unit variance, identity covariance."""
    features = n * channels
    second = {
        "split": ("var", jnp.ones((features,), jnp.float32)),
        "shared": ("var", jnp.ones((channels,), jnp.float32)),
        "whiten": ("cov", jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (channels, n, n))),
    }[form]
    return {"mean": jnp.zeros((features,), jnp.float32), second[0]: second[1]}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, n: int, form: str, epsilon: float):
    """``(y, mean, second)`` of ``split`` or ``shared`` under the batch's own statistics, ``y =
    x^ scale + bias``: both moments in one pass over ``x`` (``var = E[x^2] - E[x]^2``, as flax's
    BatchNorm) and the gradient of normalisation and affine map together written out
    (:func:`_batch_norm_bwd`): it keeps ``x`` (alive anyway) instead of writing ``x^``, and reads
    the activations twice, where autodiff of the two steps read them about twice as often."""
    return _batch_norm_fwd(x, scale, bias, n, form, epsilon)[0]


def _per_feature(v: jax.Array, n: int, form: str) -> jax.Array:
    """A ``shared`` per-channel ``(C,)`` quantity spread over the channel's n features."""
    return jnp.tile(v, n) if form == "shared" else v


def _batch_norm_fwd(x, scale, bias, n, form, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.maximum(jnp.square(x).mean(axes) - jnp.square(mean), 0.0)
    second = _blocked(var, n).mean(0) if form == "shared" else var
    inv = jax.lax.rsqrt(_per_feature(second, n, form) + epsilon)
    y = (x - mean) * (inv * _per_feature(scale, n, form)) + bias
    return (y, mean, second), (x, mean, inv, scale)


def _batch_norm_bwd(n, form, epsilon, residuals, cotangents):
    """With ``g`` the output's cotangent, ``N`` the count per feature and ``x^ = (x - mean) /
    sigma``: ``d bias = sum g``, ``d scale = sum g x^`` (summed over a channel's n features for
    ``shared``), and ``dx = scale / sigma (g - d bias / N - x^ G / N)`` with ``G = sum g x^`` per
    feature (its mean over the channel's features for ``shared``): autodiff of the affine map,
    then of normalisation, ``(dx^ - E[dx^] - x^ E[dx^ x^]) / sigma``. Plus what reaches ``x``
    through the returned moments: ``d mean / dx = 1 / N``, ``d var / dx = 2 (x - mean) / N``
    (``/ n`` shared)."""
    x, mean, inv, scale = residuals
    g, ct_mean, ct_second = cotangents
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    xhat = (x - mean) * inv
    d_bias = g.sum(axes)
    g_xhat = (g * xhat).sum(axes)
    if form == "shared":
        g_xhat, ct_second = _blocked(g_xhat, n).mean(0), ct_second / n
        d_scale = n * g_xhat
    else:
        d_scale = g_xhat
    scale_f = _per_feature(scale, n, form)
    ct_var = (2 / count) * _per_feature(ct_second, n, form) / inv
    dx = (g - d_bias / count - xhat * _per_feature(g_xhat, n, form) / count) * (scale_f * inv)
    return dx + ct_mean / count + ct_var * xhat, d_scale, d_bias


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def train_apply(
    x: jax.Array,
    n: int,
    form: str,
    params: list,
    epsilon: float,
    dtype,
    axis_name: str | None = None,
) -> tuple[jax.Array, Stats]:
    """Training mode: the layer's output under the batch's statistics, and those statistics
    (:func:`batch_stats`'s). ``split`` and ``shared`` on one device take :func:`_batch_norm`;
    ``whiten``, or statistics averaged over ``axis_name``, are differentiated as written."""
    dtype = dtype or jnp.result_type(x, *params)
    x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
    if form == "whiten" or axis_name is not None:
        stats = batch_stats(x, n, form, axis_name=axis_name)
        y = scale_shift(normalize(x, n, form, stats, epsilon), n, form, *params)
    else:
        scale, bias = (jnp.asarray(p, x.dtype) for p in params)
        y, *stats = _batch_norm(x, scale, bias, n, form, epsilon)
    return y.astype(dtype), tuple(stats)


def apply(x: jax.Array, n: int, form: str, stats: Stats, params: list, epsilon: float, dtype):
    """The layer's output: ``x`` normalised under ``stats``, then scaled and shifted by
    ``params`` (scale or gamma, bias), in ``dtype`` (None: ``x``'s and the params' type)."""
    dtype = dtype or jnp.result_type(x, *params)
    xhat = normalize(jnp.asarray(x, stats[0].dtype), n, form, stats, epsilon)
    return scale_shift(xhat, n, form, *params).astype(dtype)


class HyperBatchNorm(nn.Module):
    """Batch norm of component-blocked features in ``form`` ``split``, ``shared`` or
    ``whiten`` (:data:`FORMS`; see the module docstring). Parameters: ``scale`` (``gamma`` for
    ``whiten``) and ``bias``; running statistics in ``batch_stats``: ``mean`` and ``var`` (``cov``
    for ``whiten``), not updated while initialising, as flax's ``nn.BatchNorm``.

    ``use_running_average`` (here or at the call) picks eval mode; ``axis_name`` averages the
    batch statistics over a mapped device axis.
    """

    algebra: str | Algebra = "quat"
    form: str = "split"
    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        eval_mode = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        algebra, channels = check(self.algebra, self.form, x.shape[-1])
        n = algebra.n
        running = [
            self.variable("batch_stats", name, lambda v=value: v)
            for name, value in initial_stats(self.form, n, channels).items()
        ]
        params = [
            self.param(name, init, shape, self.param_dtype)
            for name, (init, shape) in param_specs(self.form, n, channels).items()
        ]
        stats = tuple(v.value for v in running)
        if eval_mode:
            return apply(x, n, self.form, stats, params, self.epsilon, self.dtype)
        y, batch = train_apply(x, n, self.form, params, self.epsilon, self.dtype, self.axis_name)
        if not self.is_initializing():
            for v, value in zip(running, update(stats, batch, self.momentum), strict=True):
                v.value = value
        return y
