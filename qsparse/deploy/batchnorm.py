"""Eval-mode batch norm as the export file stores it: an affine map per hypercomplex channel.

In eval mode :class:`qsparse.batchnorm.HyperBatchNorm` computes ``gamma x^ + beta`` with ``x^``
normalised by the running statistics, an affine map of ``x`` per channel of ``n`` components
(component-blocked features, ``F = n C``). The exporter (:func:`affine`) computes it once, in
float64, as ``y = scale * x + shift`` with ``scale``

* ``(F,)`` for ``split``: ``gamma / sqrt(var + eps)`` per real feature;
* ``(C,)`` for ``shared``: ``gamma_c / sqrt(var_c + eps)``, one number per hypercomplex channel;
* ``(C, n, n)`` for ``whiten``: ``M_c = G_c L_c^-1`` applied to the channel's ``n`` components,
  ``G_c`` the symmetric gamma, ``L_c`` the Cholesky factor of ``cov_c + eps I``;

and ``shift`` ``(F,)`` = ``beta - scale * mean``. Where the map scales whole output channels of the
convolution before it (:func:`foldable`: any form of a real model, ``shared`` in any algebra) the
exporter folds it into that convolution instead (:func:`fold`): a hypercomplex kernel scaled by
one number per output channel keeps its structure, and a pruned (zero) weight stays zero. Numpy
only.
"""

from __future__ import annotations

import numpy as np

from qsparse import ops

FORMS = ("split", "shared", "whiten")


def param_names(form: str) -> tuple[str, str]:
    """The layer's learnable params: its scale (``gamma`` for ``whiten``) and ``bias``."""
    return ("gamma" if form == "whiten" else "scale"), "bias"


def stat_names(form: str) -> tuple[str, str]:
    """The layer's running statistics: ``mean`` and ``var`` (``cov`` for ``whiten``)."""
    return "mean", ("cov" if form == "whiten" else "var")


def _symmetric(tri: np.ndarray, n: int) -> np.ndarray:
    """``(C, n, n)`` symmetric matrices of upper triangles ``(C, n (n + 1) / 2)`` stored row by
    row (as ``numpy.triu_indices``)."""
    rows, cols = np.triu_indices(n)
    out = np.zeros((tri.shape[0], n, n))
    out[:, rows, cols] = tri
    out[:, cols, rows] = tri
    return out


def affine(
    form: str, n: int, params: dict, stats: dict, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) float32 of a layer's eval-mode map (module docstring) from its ``params``
    and running ``stats`` (keyed as :func:`param_names`, :func:`stat_names`)."""
    if form not in FORMS:
        raise ValueError(f"unknown batch norm form {form!r}; valid: {list(FORMS)}")
    gamma_name, _ = param_names(form)
    gamma = np.asarray(params[gamma_name], np.float64)
    beta = np.asarray(params["bias"], np.float64)
    mean, second = (np.asarray(stats[k], np.float64) for k in stat_names(form))
    features = mean.shape[0]
    if form == "whiten":
        chol = np.linalg.cholesky(second + epsilon * np.eye(n))
        scale = _symmetric(gamma, n) @ np.linalg.inv(chol)  # (C, n, n)
    else:
        scale = gamma / np.sqrt(second + epsilon)
    shift = beta - (apply(mean[None], form, n, scale, np.zeros(features)))[0]
    return scale.astype(np.float32), shift.astype(np.float32)


def apply(x: np.ndarray, form: str, n: int, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``scale * x + shift`` over the last (component-blocked) axis of ``x``, by ``form``."""
    if form == "split":
        return x * scale + shift
    xb = x.reshape(*x.shape[:-1], n, x.shape[-1] // n)
    y = xb * scale if form == "shared" else np.einsum("cad,...dc->...ac", scale, xb)
    return y.reshape(x.shape) + shift


def foldable(form: str, n: int) -> bool:
    """Whether the map scales whole output channels: a real model (``n = 1``), or ``shared``."""
    return n == 1 or form == "shared"


def fold(kernel: np.ndarray, form: str, scale: np.ndarray) -> np.ndarray:
    """A bias-free convolution's kernel (HWIO, or component kernel ``(n, ..., out/n)``) times
    a :func:`foldable` map's ``scale``, one number per output channel (its last axis)."""
    per_channel = scale.reshape(-1) if form == "whiten" else scale  # whiten, n = 1: (C, 1, 1)
    if per_channel.shape != (kernel.shape[-1],):
        raise ValueError(
            f"batch norm {form} of {per_channel.shape} does not fold into kernel {kernel.shape}"
        )
    return (np.asarray(kernel, np.float32) * per_channel).astype(np.float32)


class Norm:
    """A :class:`~qsparse.ops.BatchNorm` op of the runtime: its stored map, checked against its
    form, on activations ``(..., F)``."""

    def __init__(self, op: ops.BatchNorm, arrays: dict):
        self.name, self.form, self.n = op.name, op.form, op.n
        self.scale = np.asarray(arrays[f"{op.name}/scale"], np.float32)
        self.shift = np.asarray(arrays[f"{op.name}/shift"], np.float32)
        f = self.shift.shape[0] if self.shift.ndim == 1 else -1
        channels = f // self.n if f % self.n == 0 else -1
        want = {"split": (f,), "shared": (channels,), "whiten": (channels, self.n, self.n)}
        if f < 0 or channels < 0 or self.scale.shape != want[self.form]:
            raise ValueError(
                f"batch norm {op.name}: scale {self.scale.shape} and shift {self.shift.shape} "
                f"do not fit form {self.form} with n={self.n}"
            )

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.shift.shape[0]:
            raise ValueError(
                f"batch norm {self.name}: {x.shape[-1]} features, not {self.shift.shape[0]}"
            )
        return apply(x, self.form, self.n, self.scale, self.shift).astype(np.float32)
