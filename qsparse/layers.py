"""Quaternion dense and convolution layers (Flax linen).

Both layers take and return real arrays whose feature (channel) axis is component-blocked,
``[r | i | j | k]`` (see :mod:`qsparse.quaternion`), and count features in *real* units:
``QDense(300)`` has 300 real outputs = 75 quaternion neurons, so swapping ``nn.Dense`` for
``QDense`` keeps the real width of a model and divides its weights by four.

Each layer has one kernel parameter, ``qkernel``, with the component axis first:
``(4, n_in/4, n_out/4)`` for ``QDense`` and ``(4, *kernel_size, n_in/4/groups, n_out/4)`` for
``QConv``. It is expanded to the real block matrix inside ``__call__``, so a pruning mask on
``qkernel`` acts on the Hamilton structure itself. The distinct name lets pruning rules tell
quaternion kernels from real ones by path alone.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from qsparse import initializers, onednn
from qsparse.quaternion import left_matrix

PaddingLike = str | int | Sequence[int | tuple[int, int]]


def _check_multiple_of_4(value: int, what: str, layer: str) -> None:
    if value % 4:
        raise ValueError(f"{layer}: {what} must be a multiple of 4 (component-blocked [r|i|j|k]), got {value}")


class QDense(nn.Module):
    """Quaternion fully connected layer computing ``W ⊗ x + b`` on block-layout features.

    Attributes:
      features: real output features (a multiple of 4).
      use_bias: one bias per real output feature (not quaternion-shared, as hTorch).
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: initializers.Initializer = initializers.htorch()
    bias_init: initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        _check_multiple_of_4(self.features, "features", "QDense")
        _check_multiple_of_4(inputs.shape[-1], "the input feature size", "QDense")
        qkernel = self.param(
            "qkernel", self.kernel_init, (4, inputs.shape[-1] // 4, self.features // 4), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, qkernel, bias = promote_dtype(inputs, qkernel, bias, dtype=self.dtype)
        y = jnp.dot(inputs, left_matrix(qkernel), precision=self.precision)
        return y if bias is None else y + bias


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(inputs, kernel, padding, precision=None, preferred_element_type=None):
    """Stride-1 2-D convolution, ``(N, H, W, C_in) x (kh, kw, C_in, C_out) -> (N, H', W', C_out)``,
    with explicit ``padding`` ``((lo, hi), (lo, hi))`` (each ``0 <= pad < kernel size``).

    It equals ``lax.conv_general_dilated`` with the same arguments; only how it and its gradients
    are computed differs. Lowered for the CPU, float32 convolutions run on oneDNN's kernels when
    the optional extension is built (:mod:`qsparse.onednn`). Otherwise both gradients are written
    as forward convolutions in the canonical NHWC/HWIO layout (input gradient: the flipped,
    transposed kernel; kernel gradient: input channels as the batch and examples as the features).
    XLA:CPU lowers canonical convolutions to its fast Eigen kernel everywhere, whereas the
    convolutions that autodiff produces are canonicalised only outside loops: inside a
    ``scan``/``while`` they ran as naive loops, hundreds of times slower.
    Reverse mode only (a ``custom_vjp``).
    """
    padding = tuple(map(tuple, padding))

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC_HWIO,
                                            precision=precision, preferred_element_type=preferred_element_type)

    if onednn.applies(inputs, kernel, preferred_element_type):
        return jax.lax.platform_dependent(inputs, kernel, cpu=lambda x, w: onednn.forward(x, w, padding), default=xla)
    return xla(inputs, kernel)


def _conv2d_fwd(inputs, kernel, padding, precision, preferred_element_type):
    return conv2d(inputs, kernel, padding, precision, preferred_element_type), (inputs, kernel)


def _conv2d_bwd(padding, precision, preferred_element_type, residuals, dy):
    x, w = residuals
    padding = tuple(map(tuple, padding))

    def xla(x, w, dy):
        kh, kw = w.shape[:2]
        # dx[i] = sum_o dy[o] w[i - o + lo]: correlate dy with the flipped kernel, in/out swapped
        w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)).astype(dy.dtype)
        pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding)]
        dx = jax.lax.conv_general_dilated(dy, w_t, (1, 1), pads, dimension_numbers=_NHWC_HWIO, precision=precision)
        # dw[k, c, f] = sum_{n, o} x_pad[n, o + k, c] dy[n, o, f]: batch <- c, features <- n
        lhs = jnp.transpose(x, (3, 1, 2, 0)).astype(dy.dtype)
        rhs = jnp.transpose(dy, (1, 2, 0, 3))
        dw = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), padding, dimension_numbers=_NHWC_HWIO, precision=precision)
        return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)

    def cpu(x, w, dy):
        return onednn.input_grad(dy, w, padding, x.shape), onednn.kernel_grad(x, dy, padding, w.shape)

    if dy.dtype == jnp.float32 and onednn.applies(x, w, preferred_element_type):
        return jax.lax.platform_dependent(x, w, dy, cpu=cpu, default=xla)
    return xla(x, w, dy)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _canonical_padding(padding: PaddingLike, ndim: int):
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"QConv: padding {padding!r} not supported; valid: 'SAME', 'VALID', ints or pairs")
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * ndim
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != ndim:
        raise ValueError(f"QConv: padding {padding!r} has {len(pads)} entries for {ndim} spatial dims")
    return pads


def _tuple(value: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * ndim
    return (value,) * ndim if isinstance(value, int) else tuple(value)


class QConv(nn.Module):
    """Quaternion convolution (channels last, N-d like ``nn.Conv``) on block-layout channels.

    Attributes:
      features: real output channels (a multiple of 4).
      kernel_size: spatial window, e.g. ``(3, 3)``.
      feature_group_count: groups counted on quaternion channels; both quaternion channel
        counts must be divisible by it.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: int | Sequence[int] = 1
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: initializers.Initializer = initializers.htorch()
    bias_init: initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        ndim = len(self.kernel_size)
        if inputs.ndim != ndim + 2:
            raise ValueError(
                f"QConv: expected inputs of shape (batch, {ndim} spatial dims, channels), got {inputs.shape}"
            )
        _check_multiple_of_4(self.features, "features", "QConv")
        _check_multiple_of_4(inputs.shape[-1], "the input channel count", "QConv")
        groups = self.feature_group_count
        q_in, q_out = inputs.shape[-1] // 4, self.features // 4
        if q_in % groups or q_out % groups:
            raise ValueError(
                f"QConv: feature_group_count={groups} must divide the quaternion channel counts "
                f"(in {q_in}, out {q_out})"
            )
        shape = (4, *self.kernel_size, q_in // groups, q_out)
        qkernel = self.param("qkernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, qkernel, bias = promote_dtype(inputs, qkernel, bias, dtype=self.dtype)

        if groups > 1:  # block layout (4, groups, c) -> group-major (groups, 4, c)
            lead = inputs.shape[:-1]
            inputs = inputs.reshape(*lead, 4, groups, q_in // groups)
            inputs = jnp.swapaxes(inputs, -3, -2).reshape(*lead, 4 * q_in)
        y = jax.lax.conv_general_dilated(
            inputs,
            left_matrix(qkernel, groups),
            window_strides=_tuple(self.strides, ndim),
            padding=_canonical_padding(self.padding, ndim),
            lhs_dilation=_tuple(self.input_dilation, ndim),
            rhs_dilation=_tuple(self.kernel_dilation, ndim),
            dimension_numbers=jax.lax.conv_dimension_numbers(
                inputs.shape, (*self.kernel_size, 1, 1), ("N" + "HWD"[:ndim] + "C", "HWD"[:ndim] + "IO", "N" + "HWD"[:ndim] + "C")
            ),
            feature_group_count=groups,
            precision=self.precision,
        )
        if groups > 1:  # back to block layout
            lead = y.shape[:-1]
            y = jnp.swapaxes(y.reshape(*lead, groups, 4, q_out // groups), -3, -2).reshape(*lead, self.features)
        return y if bias is None else y + bias
