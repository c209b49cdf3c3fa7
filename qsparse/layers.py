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

from qsparse import algebras, hyper, initializers
from qsparse.algebras import Algebra
from qsparse.batchnorm import HyperBatchNorm as HyperBatchNorm  # re-exported beside the layers
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
        check_conv_input(inputs, len(self.kernel_size), "QConv")
        check_multiple_of_4(self.features, "features", "QConv")
        check_multiple_of_4(inputs.shape[-1], "the input channel count", "QConv")
        q_in, q_out = inputs.shape[-1] // 4, self.features // 4
        groups = check_groups(self.feature_group_count, q_in, q_out, "QConv")
        shape = (4, *self.kernel_size, q_in // groups, q_out)
        qkernel = self.param("qkernel", self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, qkernel, bias = promote_dtype(inputs, qkernel, bias, dtype=self.dtype)

        y = layer_conv(self, inputs, left_matrix(qkernel, groups), 4)
        return y if bias is None else y + bias


def blocked_conv(
    inputs: jax.Array,
    kernel: jax.Array,
    n: int,
    *,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
    input_dilation: int | Sequence[int] = 1,
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    precision: Any = None,
    conv_general_dilated: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """A real convolution with ``kernel`` ``(..., n * c_in / groups, n * c_out)`` (output channels
    group-major) on channels blocked by ``n`` components, groups counted on ``n``-unit
    channels."""
    ndim = kernel.ndim - 2
    kernel_size = kernel.shape[:-2]
    groups = feature_group_count
    q_in, q_out = inputs.shape[-1] // n, kernel.shape[-1] // n
    if groups > 1:  # block layout (n, groups, c) -> group-major (groups, n, c)
        lead = inputs.shape[:-1]
        inputs = inputs.reshape(*lead, n, groups, q_in // groups)
        inputs = jnp.swapaxes(inputs, -3, -2).reshape(*lead, n * q_in)
    conv = conv_general_dilated or jax.lax.conv_general_dilated
    spatial = "HWD"[:ndim]
    y = conv(
        inputs,
        kernel,
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
        y = jnp.swapaxes(y.reshape(*lead, groups, n, q_out // groups), -3, -2)
        y = y.reshape(*lead, n * q_out)
    return y


def hyper_widths(algebra: Algebra, n_in: int, n_out: int, layer: str) -> tuple[int, int]:
    """Real widths as hypercomplex units of ``algebra``; refuses a width not a multiple of n."""
    n = algebra.n
    for value, what in ((n_in, "the input feature size"), (n_out, "features")):
        if value % n:
            raise ValueError(
                f"{layer}: {what} must be a multiple of n={n} (algebra {algebra.name}, "
                f"component-blocked), got {value}"
            )
    return n_in // n, n_out // n


class _HyperParams:
    """The parameters every hypercomplex linen layer creates (``hkernel``, PHM's
    ``phm_rules``, ``bias``)."""

    def hyper_params(self, algebra: Algebra, shape: tuple, inputs: jax.Array):
        """``inputs``, ``hkernel``, ``phm_rules`` (None unless PHM) and ``bias``, promoted."""
        init = self.kernel_init or hyper.init(algebra, phm_init=self.phm_init)
        hkernel = self.param("hkernel", init, shape, self.param_dtype)
        rules = None
        if algebra.kind == "phm":
            n = algebra.n
            rules_init = hyper.phm_rules_init(self.phm_init)
            rules = self.param("phm_rules", rules_init, (n, n, n), self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        return promote_dtype(inputs, hkernel, rules, bias, dtype=self.dtype)


class HyperDense(nn.Module, _HyperParams):
    """Fully connected layer over any algebra of :mod:`qsparse.algebras` on block-layout
    features: ``HyperDense(300, algebra="quat")`` computes as ``QDense(300)`` does.

    Parameters: ``hkernel`` ``(n, n_in/n, features/n)``; ``phm_rules`` ``(n, n, n)`` for the PHM
    kinds; ``bias`` per real output. ``kernel_init`` None means :func:`qsparse.hyper.init`;
    ``phm_init`` picks PHM's starting rules (:data:`qsparse.hyper.PHM_INITS`); ``hash_seed``
    fixes the hashed kind's tying.
    """

    features: int
    algebra: str | Algebra = "quat"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: initializers.Initializer | None = None
    bias_init: initializers.Initializer = nn.initializers.zeros
    phm_init: str = "zhang"
    hash_seed: int = 0

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        algebra = algebras.get(self.algebra)
        n_in, n_out = hyper_widths(algebra, inputs.shape[-1], self.features, "HyperDense")
        inputs, hkernel, rules, bias = self.hyper_params(algebra, (algebra.n, n_in, n_out), inputs)
        y = hyper.dense(
            algebra, inputs, hkernel, phm_rules=rules, seed=self.hash_seed, precision=self.precision
        )
        return y if bias is None else y + bias


class HyperConv(nn.Module, _HyperParams):
    """Convolution over any algebra (channels last, N-d like ``nn.Conv``) on block-layout
    channels; parameters as :class:`HyperDense` with ``hkernel``
    ``(n, *kernel_size, c_in/n/groups, features/n)``. ``feature_group_count`` counts
    hypercomplex channels (1 for the hashed kind)."""

    features: int
    kernel_size: Sequence[int]
    algebra: str | Algebra = "quat"
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: int | Sequence[int] = 1
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: initializers.Initializer | None = None
    bias_init: initializers.Initializer = nn.initializers.zeros
    phm_init: str = "zhang"
    hash_seed: int = 0
    conv_general_dilated: Callable[..., jax.Array] | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        algebra = algebras.get(self.algebra)
        check_conv_input(inputs, len(self.kernel_size), "HyperConv")
        n_in, n_out = hyper_widths(algebra, inputs.shape[-1], self.features, "HyperConv")
        groups = check_groups(self.feature_group_count, n_in, n_out, "HyperConv")
        shape = (algebra.n, *self.kernel_size, n_in // groups, n_out)
        inputs, hkernel, rules, bias = self.hyper_params(algebra, shape, inputs)
        kernel = hyper.real_kernel(
            algebra, hkernel, phm_rules=rules, seed=self.hash_seed, groups=groups
        )
        y = layer_conv(self, inputs, kernel, algebra.n)
        return y if bias is None else y + bias


def layer_conv(layer, inputs: jax.Array, kernel: jax.Array, n: int) -> jax.Array:
    """:func:`blocked_conv` with the options of ``layer``: a linen or NNX ``QConv`` or
    ``HyperConv``."""
    return blocked_conv(
        inputs,
        kernel,
        n,
        strides=layer.strides,
        padding=layer.padding,
        input_dilation=layer.input_dilation,
        kernel_dilation=layer.kernel_dilation,
        feature_group_count=layer.feature_group_count,
        precision=layer.precision,
        conv_general_dilated=layer.conv_general_dilated,
    )


def check_conv_input(inputs: jax.Array, ndim: int, layer: str) -> None:
    if inputs.ndim != ndim + 2:
        raise ValueError(
            f"{layer}: expected inputs of shape (batch, {ndim} spatial dims, channels), got "
            f"{inputs.shape}"
        )


def check_groups(groups: int, n_in: int, n_out: int, layer: str) -> int:
    if n_in % groups or n_out % groups:
        raise ValueError(
            f"{layer}: feature_group_count={groups} must divide the hypercomplex channel counts "
            f"(in {n_in}, out {n_out})"
        )
    return groups
