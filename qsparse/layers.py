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

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from qsparse import initializers
from qsparse.quaternion import left_matrix

PaddingLike = str | int | Sequence[int | tuple[int, int]]


def check_multiple_of_4(value: int, what: str, layer: str) -> None:
    """Refuse a real width that is not a whole number of quaternions (shared by linen and NNX)."""
    if value % 4:
        raise ValueError(
            f"{layer}: {what} must be a multiple of 4 (component-blocked [r|i|j|k]), got {value}"
        )


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
        check_multiple_of_4(self.features, "features", "QDense")
        check_multiple_of_4(inputs.shape[-1], "the input feature size", "QDense")
        qkernel = self.param(
            "qkernel",
            self.kernel_init,
            (4, inputs.shape[-1] // 4, self.features // 4),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, qkernel, bias = promote_dtype(inputs, qkernel, bias, dtype=self.dtype)
        y = jnp.dot(inputs, left_matrix(qkernel), precision=self.precision)
        return y if bias is None else y + bias


def canonical_padding(padding: PaddingLike, ndim: int) -> str | list[tuple[int, int]]:
    """``padding`` as ``lax.conv_general_dilated`` takes it: 'SAME'/'VALID' or one pair per dim."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"QConv: padding {padding!r} not supported; valid: 'SAME', 'VALID', ints or pairs"
            )
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * ndim
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != ndim:
        raise ValueError(
            f"QConv: padding {padding!r} has {len(pads)} entries for {ndim} spatial dims"
        )
    return pads


def as_tuple(value: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """A stride or dilation given as one int, a sequence or None (1) as one entry per dim."""
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
      conv_general_dilated: the convolution, as ``nn.Conv``'s hook of the same name (default
        ``lax.conv_general_dilated``; qsparse's models pass
        :func:`qsparse.cpu.conv_general_dilated`).
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
    conv_general_dilated: Callable[..., jax.Array] | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        ndim = len(self.kernel_size)
        if inputs.ndim != ndim + 2:
            raise ValueError(
                f"QConv: expected inputs of shape (batch, {ndim} spatial dims, channels), got "
                f"{inputs.shape}"
            )
        check_multiple_of_4(self.features, "features", "QConv")
        check_multiple_of_4(inputs.shape[-1], "the input channel count", "QConv")
        groups = self.feature_group_count
        q_in, q_out = inputs.shape[-1] // 4, self.features // 4
        if q_in % groups or q_out % groups:
            raise ValueError(
                f"QConv: feature_group_count={groups} must divide the quaternion channel counts "
                f"(in {q_in}, out {q_out})"
            )
        shape = (4, *self.kernel_size, q_in // groups, q_out)
        qkernel = self.param("qkernel", self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, qkernel, bias = promote_dtype(inputs, qkernel, bias, dtype=self.dtype)

        y = quaternion_conv(
            inputs,
            qkernel,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=groups,
            precision=self.precision,
            conv_general_dilated=self.conv_general_dilated,
        )
        return y if bias is None else y + bias


def quaternion_conv(
    inputs: jax.Array,
    qkernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
    input_dilation: int | Sequence[int] = 1,
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    precision: Any = None,
    conv_general_dilated: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """The convolution of :class:`QConv` (linen) and :class:`qsparse.nnx.QConv`, bias aside:
    block-layout channels in and out, the component kernel ``qkernel`` expanded by
    :func:`qsparse.quaternion.left_matrix`. Groups are counted on quaternion channels."""
    ndim = qkernel.ndim - 3
    kernel_size = qkernel.shape[1:-2]
    groups = feature_group_count
    q_in, q_out = inputs.shape[-1] // 4, qkernel.shape[-1]
    if groups > 1:  # block layout (4, groups, c) -> group-major (groups, 4, c)
        lead = inputs.shape[:-1]
        inputs = inputs.reshape(*lead, 4, groups, q_in // groups)
        inputs = jnp.swapaxes(inputs, -3, -2).reshape(*lead, 4 * q_in)
    conv = conv_general_dilated or jax.lax.conv_general_dilated
    spatial = "HWD"[:ndim]
    y = conv(
        inputs,
        left_matrix(qkernel, groups),
        window_strides=as_tuple(strides, ndim),
        padding=canonical_padding(padding, ndim),
        lhs_dilation=as_tuple(input_dilation, ndim),
        rhs_dilation=as_tuple(kernel_dilation, ndim),
        dimension_numbers=jax.lax.conv_dimension_numbers(
            inputs.shape,
            (*kernel_size, 1, 1),
            ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"),
        ),
        feature_group_count=groups,
        precision=precision,
    )
    if groups > 1:  # back to block layout
        lead = y.shape[:-1]
        y = jnp.swapaxes(y.reshape(*lead, groups, 4, q_out // groups), -3, -2)
        y = y.reshape(*lead, 4 * q_out)
    return y
