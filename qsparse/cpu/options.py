"""XLA compiler options for the compiled epoch on CPU."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

# No YNNPACK fusions for models without convolutions: XLA's own dot kernels ran LeNet-300-100's
# matmuls faster than YNNPACK's. Models with convolutions keep XLA's defaults (YNNPACK runs their
# convolutions, and turning it off made them slower).
DENSE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

_CONV_P = jex_core.primitives.conv_general_dilated_p


def _has_conv(jaxpr) -> bool:
    return any(
        e.primitive is _CONV_P or any(_has_conv(j) for j in jex_core.jaxprs_in_params(e.params))
        for e in jaxpr.eqns
    )


def has_conv(apply_fn: Callable, params, image_shape: Sequence[int], batch_stats=None) -> bool:
    """Whether ``apply_fn`` (a flax ``apply``) convolves one image of ``image_shape``; the
    variables may be abstract (``jax.eval_shape``)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

    def forward(params, batch_stats, x):
        extra = {} if batch_stats is None else {"batch_stats": batch_stats}
        return apply_fn({"params": params, **extra}, x)

    return _has_conv(jax.make_jaxpr(forward)(params, batch_stats, x).jaxpr)


def compiler_options(
    platform: str, apply_fn: Callable, params, image_shape: Sequence[int], batch_stats=None
) -> dict | None:
    """Options for compiling a model's epoch on ``platform``: :data:`DENSE_COMPILER_OPTIONS` for
    a model without convolutions on CPU, XLA's defaults (None) otherwise."""
    if platform != "cpu" or has_conv(apply_fn, params, image_shape, batch_stats):
        return None
    return DENSE_COMPILER_OPTIONS
