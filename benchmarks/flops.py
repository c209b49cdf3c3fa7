"""Analytic FLOP counts, so throughput can be read against the machine's matmul peak.

Only dots and convolutions are counted (2 x multiply-adds): they dominate every model here, and
counting them from the traced jaxpr needs no hand bookkeeping per architecture or algebra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


def _eqn_flops(eqn: Any) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    if name == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        rhs = eqn.invars[1].aval.shape
        # input features (per group) x window
        per_output = math.prod(rhs[d] for d in dn.rhs_spec[1:])
        return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
    return 0


def _jaxpr_flops(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for sub in jex_core.jaxprs_in_params(eqn.params):  # nested jit, custom_jvp, ...
            total += _jaxpr_flops(sub)
    return total


def forward_flops(
    model: nn.Module, params: Any, input_shape: Sequence[int], batch_stats: Any = None
) -> int:
    """Multiply-adds x 2 of every dot and convolution in one example's forward pass
    (``batch_stats`` for a model with batch norm).

    ``params`` may be abstract (``jax.eval_shape``): only shapes are traced.
    """
    x = jnp.zeros((1, *input_shape))
    extra = {} if batch_stats is None else {"batch_stats": batch_stats}
    closed = jax.make_jaxpr(lambda p, x: model.apply({"params": p, **extra}, x))(params, x)
    return _jaxpr_flops(closed.jaxpr)
