"""Quaternion dense and convolution layers, and hypercomplex batch norm, as Flax NNX modules.

The twins of :mod:`qsparse.layers`: same parameters (``qkernel`` with the component axis
first, ``bias`` per real output unit), same initialisers, same arithmetic through
:func:`qsparse.quaternion.left_matrix`. So linen params load with ``nnx.update(layer, params)``
and qsparse's masks and pruning work unchanged on the pure pytree
``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.

NNX creates parameters in the constructor, so the input width is an argument (``in_features``,
in real units like ``out_features``) and width errors are raised there rather than at the first
call. Argument names follow ``nnx.Linear`` / ``nnx.Conv``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from qsparse import algebras, batchnorm, hyper, initializers
from qsparse.algebras import Algebra
from qsparse.layers import (
    PaddingLike,
    as_tuple,
    canonical_padding,
    check_conv_input,
    check_groups,
    check_multiple_of_4,
    hyper_widths,
    layer_conv,
)
from qsparse.quaternion import left_matrix

InitLike = initializers.Initializer | str


def _initializer(init: InitLike) -> initializers.Initializer:
    """A callable as is, or a name of :data:`qsparse.initializers.QUATERNION_INITS`."""
    return initializers.get(init) if isinstance(init, str) else init


def _check_input(inputs: jax.Array, in_features: int, layer: str) -> None:
    if inputs.shape[-1] != in_features:
        raise ValueError(
            f"{layer}: built for {in_features} input features, got inputs of shape {inputs.shape}"
        )


def _bias(use_bias: bool, init, features: int, dtype, rngs: nnx.Rngs):
    # nnx.data(None) marks "no bias" as pytree data, as nnx.Linear does.
    return nnx.Param(init(rngs.params(), (features,), dtype)) if use_bias else nnx.data(None)


class QDense(nnx.Module):
    """Quaternion fully connected layer ``W ⊗ x + b`` on block-layout features.

    ``in_features`` and ``out_features`` count real units (multiples of 4). ``kernel_init`` is an
    initialiser or a name from :mod:`qsparse.initializers` (default ``htorch``, as linen).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: InitLike = "htorch",
        bias_init: initializers.Initializer = jax.nn.initializers.zeros,
        rngs: nnx.Rngs,
    ) -> None:
        check_multiple_of_4(in_features, "in_features", "QDense")
        check_multiple_of_4(out_features, "out_features", "QDense")
        shape = (4, in_features // 4, out_features // 4)
        self.qkernel = nnx.Param(_initializer(kernel_init)(rngs.params(), shape, param_dtype))
        self.bias = _bias(use_bias, bias_init, out_features, param_dtype, rngs)
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.dtype, self.param_dtype = use_bias, dtype, param_dtype
        self.precision = precision

    def __call__(self, inputs: jax.Array) -> jax.Array:
        _check_input(inputs, self.in_features, "QDense")
        bias = None if self.bias is None else self.bias[...]
        inputs, qkernel, bias = promote_dtype(inputs, self.qkernel[...], bias, dtype=self.dtype)
        y = jnp.dot(inputs, left_matrix(qkernel), precision=self.precision)
        return y if bias is None else y + bias


class QConv(nnx.Module):
    """Quaternion convolution (channels last, N-d like ``nnx.Conv``) on block-layout channels.

    Channels count real units (multiples of 4); ``feature_group_count`` counts quaternion
    channels and must divide both quaternion channel counts. ``conv_general_dilated`` is the
    convolution hook of linen ``QConv`` (default ``lax.conv_general_dilated``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        padding: PaddingLike = "SAME",
        input_dilation: int | Sequence[int] = 1,
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: InitLike = "htorch",
        bias_init: initializers.Initializer = jax.nn.initializers.zeros,
        conv_general_dilated: Callable[..., jax.Array] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        check_multiple_of_4(in_features, "in_features", "QConv")
        check_multiple_of_4(out_features, "out_features", "QConv")
        groups = feature_group_count
        q_in, q_out = in_features // 4, out_features // 4
        if q_in % groups or q_out % groups:
            raise ValueError(
                f"QConv: feature_group_count={groups} must divide the quaternion channel counts "
                f"(in {q_in}, out {q_out})"
            )
        ndim = len(kernel_size)
        self.kernel_size = tuple(kernel_size)
        shape = (4, *self.kernel_size, q_in // groups, q_out)
        self.qkernel = nnx.Param(_initializer(kernel_init)(rngs.params(), shape, param_dtype))
        self.bias = _bias(use_bias, bias_init, out_features, param_dtype, rngs)
        self.in_features, self.out_features = in_features, out_features
        # Canonical (hashable) forms: NNX keeps these in the static graph definition.
        pads = canonical_padding(padding, ndim)
        self.padding = pads if isinstance(pads, str) else tuple(map(tuple, pads))
        self.strides = as_tuple(strides, ndim)
        self.input_dilation = as_tuple(input_dilation, ndim)
        self.kernel_dilation = as_tuple(kernel_dilation, ndim)
        self.feature_group_count = groups
        self.use_bias, self.dtype, self.param_dtype = use_bias, dtype, param_dtype
        self.precision = precision
        self.conv_general_dilated = conv_general_dilated

    def __call__(self, inputs: jax.Array) -> jax.Array:
        check_conv_input(inputs, len(self.kernel_size), "QConv")
        _check_input(inputs, self.in_features, "QConv")
        groups = self.feature_group_count
        bias = None if self.bias is None else self.bias[...]
        inputs, qkernel, bias = promote_dtype(inputs, self.qkernel[...], bias, dtype=self.dtype)

        y = layer_conv(self, inputs, left_matrix(qkernel, groups), 4)
        return y if bias is None else y + bias


class _HyperLayer(nnx.Module):
    """What the hypercomplex NNX layers share: their parameters, as linen's (``hkernel``,
    ``phm_rules`` for PHM, ``bias``)."""

    def _hyper_params(self, algebra, shape, features, options: dict, rngs: nnx.Rngs) -> None:
        # options: the constructor's arguments (its locals()), named as the linen attributes
        init = options["kernel_init"] or hyper.init(algebra, phm_init=options["phm_init"])
        dtype = options["param_dtype"]
        self.hkernel = nnx.Param(init(rngs.params(), shape, dtype))
        n = algebra.n
        rules_init = hyper.phm_rules_init(options["phm_init"])
        self.phm_rules = (
            nnx.Param(rules_init(rngs.params(), (n, n, n), dtype))
            if algebra.kind == "phm"
            else nnx.data(None)
        )
        self.bias = _bias(options["use_bias"], options["bias_init"], features, dtype, rngs)
        self.algebra, self.hash_seed = algebra, options["hash_seed"]
        self.use_bias, self.dtype, self.param_dtype = options["use_bias"], options["dtype"], dtype
        self.precision = options["precision"]

    def _params(self, inputs: jax.Array):
        """``inputs``, ``hkernel``, ``phm_rules`` (None unless PHM) and ``bias``, promoted."""
        bias = None if self.bias is None else self.bias[...]
        rules = None if self.phm_rules is None else self.phm_rules[...]
        return promote_dtype(inputs, self.hkernel[...], rules, bias, dtype=self.dtype)


class HyperDense(_HyperLayer):
    """:class:`qsparse.layers.HyperDense` as an NNX module: widths in real units (multiples of
    the algebra's n), same parameters and arithmetic."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        algebra: str | Algebra = "quat",
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: initializers.Initializer | None = None,
        bias_init: initializers.Initializer = jax.nn.initializers.zeros,
        phm_init: str = "zhang",
        hash_seed: int = 0,
        rngs: nnx.Rngs,
    ) -> None:
        algebra = algebras.get(algebra)
        n_in, n_out = hyper_widths(algebra, in_features, out_features, "HyperDense")
        self._hyper_params(algebra, (algebra.n, n_in, n_out), out_features, locals(), rngs)
        self.in_features, self.out_features = in_features, out_features

    def __call__(self, inputs: jax.Array) -> jax.Array:
        _check_input(inputs, self.in_features, "HyperDense")
        inputs, hkernel, rules, bias = self._params(inputs)
        y = hyper.dense(
            self.algebra,
            inputs,
            hkernel,
            phm_rules=rules,
            seed=self.hash_seed,
            precision=self.precision,
        )
        return y if bias is None else y + bias


class HyperConv(_HyperLayer):
    """:class:`qsparse.layers.HyperConv` as an NNX module (channels last, N-d)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        algebra: str | Algebra = "quat",
        padding: PaddingLike = "SAME",
        input_dilation: int | Sequence[int] = 1,
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: initializers.Initializer | None = None,
        bias_init: initializers.Initializer = jax.nn.initializers.zeros,
        phm_init: str = "zhang",
        hash_seed: int = 0,
        conv_general_dilated: Callable[..., jax.Array] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        algebra = algebras.get(algebra)
        n_in, n_out = hyper_widths(algebra, in_features, out_features, "HyperConv")
        groups = check_groups(feature_group_count, n_in, n_out, "HyperConv")
        ndim = len(kernel_size)
        self.kernel_size = tuple(kernel_size)
        shape = (algebra.n, *self.kernel_size, n_in // groups, n_out)
        self._hyper_params(algebra, shape, out_features, locals(), rngs)
        self.in_features, self.out_features = in_features, out_features
        pads = canonical_padding(padding, ndim)
        self.padding = pads if isinstance(pads, str) else tuple(map(tuple, pads))
        self.strides = as_tuple(strides, ndim)
        self.input_dilation = as_tuple(input_dilation, ndim)
        self.kernel_dilation = as_tuple(kernel_dilation, ndim)
        self.feature_group_count = groups
        self.conv_general_dilated = conv_general_dilated

    def __call__(self, inputs: jax.Array) -> jax.Array:
        check_conv_input(inputs, len(self.kernel_size), "HyperConv")
        _check_input(inputs, self.in_features, "HyperConv")
        inputs, hkernel, rules, bias = self._params(inputs)
        groups = self.feature_group_count
        kernel = hyper.real_kernel(
            self.algebra, hkernel, phm_rules=rules, seed=self.hash_seed, groups=groups
        )
        y = layer_conv(self, inputs, kernel, self.algebra.n)
        return y if bias is None else y + bias


class HyperBatchNorm(nnx.Module):
    """:class:`qsparse.batchnorm.HyperBatchNorm` as an NNX module, as ``nnx.BatchNorm``: running
    statistics in ``nnx.BatchStat`` variables (``mean``, ``var`` or ``cov``), parameters
    ``scale`` (``gamma`` for ``whiten``) and ``bias``; ``model.eval()`` / ``model.train()`` set
    ``use_running_average``. ``num_features`` counts real units (a multiple of n)."""

    def __init__(
        self,
        num_features: int,
        *,
        algebra: str | Algebra = "quat",
        form: str = "split",
        use_running_average: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        axis_name: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        algebra, channels = batchnorm.check(algebra, form, num_features)
        stats = batchnorm.initial_stats(form, algebra.n, channels)
        specs = batchnorm.param_specs(form, algebra.n, channels)
        for name, value in stats.items():
            setattr(self, name, nnx.BatchStat(value))
        for name, (init, shape) in specs.items():
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))
        self.stat_names, self.param_names = tuple(stats), tuple(specs)
        self.num_features, self.algebra, self.form = num_features, algebra, form
        self.use_running_average = use_running_average
        self.momentum, self.epsilon = momentum, epsilon
        self.axis_name, self.dtype, self.param_dtype = axis_name, dtype, param_dtype

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        _check_input(x, self.num_features, "HyperBatchNorm")
        eval_mode = self.use_running_average if use_running_average is None else use_running_average
        n = self.algebra.n
        stats = tuple(getattr(self, name)[...] for name in self.stat_names)
        params = [getattr(self, name)[...] for name in self.param_names]
        if eval_mode:
            return batchnorm.apply(x, n, self.form, stats, params, self.epsilon, self.dtype)
        y, batch = batchnorm.train_apply(
            x, n, self.form, params, self.epsilon, self.dtype, self.axis_name
        )
        new = batchnorm.update(stats, batch, self.momentum)
        for name, value in zip(self.stat_names, new, strict=True):
            getattr(self, name)[...] = value
        return y
