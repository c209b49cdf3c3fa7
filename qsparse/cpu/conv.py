"""Convolutions whose gradients XLA:CPU runs fast, and the drop-in that picks them on CPU only.

XLA:CPU lowers a convolution to a fast kernel only in canonical form, and it does not
canonicalise the gradient convolutions that autodiff produces inside a ``while`` loop (the
compiled epoch): there they run as naive loops, far slower. :func:`conv2d` writes
both gradients as canonical forward convolutions, or runs all three on oneDNN
(:mod:`qsparse.cpu.onednn`) where the extension is built.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from qsparse.cpu import onednn

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")
_NHWC_SPECS = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(inputs, kernel, padding, precision=None, preferred_element_type=None, strides=(1, 1)):
    """2-D convolution for the CPU, ``(N, H, W, C_in) x (kh, kw, C_in, C_out) -> (N, H', W',
    C_out)``, with explicit ``padding`` ``((lo, hi), (lo, hi))`` (each ``0 <= pad < kernel
    size``) and ``strides``.

    Equal to ``lax.conv_general_dilated`` with the same arguments; only the kernels differ. Float32
    convolutions run on oneDNN (strides included) when the extension is built. Otherwise a
    strided convolution is the stride-1 one's every ``strides``-th output, and the gradients are
    forward convolutions in the canonical NHWC/HWIO layout (input gradient: the flipped,
    transposed kernel; kernel gradient: input channels as the batch and examples as the
    features) of the stride-1 cotangent (the strided one with zeros between). Reverse-mode only
    (a ``custom_vjp``): pass ``lax.conv_general_dilated`` to a model for forward-mode autodiff.
    """
    padding, strides = tuple(map(tuple, padding)), tuple(strides)
    if onednn.applies(inputs, kernel, preferred_element_type):
        return onednn.forward(inputs, kernel, padding, strides)
    y = lax.conv_general_dilated(
        inputs,
        kernel,
        (1, 1),
        padding,
        dimension_numbers=_NHWC_HWIO,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return y[:, :: strides[0], :: strides[1]]


def _conv2d_fwd(inputs, kernel, padding, precision, preferred_element_type, strides):
    y = conv2d(inputs, kernel, padding, precision, preferred_element_type, strides)
    return y, (inputs, kernel)


def _stride_one_cotangent(dy, x_shape, w_shape, padding, strides):
    """The cotangent of the stride-1 convolution whose every ``strides``-th output is ``dy``:
    ``dy`` with ``stride - 1`` zeros between its values, padded to the stride-1 output size."""
    config = [(0, 0, 0)]
    for axis, (size, k, (lo, hi), s) in enumerate(zip(x_shape[1:3], w_shape[:2], padding, strides)):
        full = size + lo + hi - k + 1
        config.append((0, full - ((dy.shape[axis + 1] - 1) * s + 1), s - 1))
    return lax.pad(dy, jnp.zeros((), dy.dtype), [*config, (0, 0, 0)])


def _conv2d_bwd(padding, precision, preferred_element_type, strides, residuals, dy):
    x, w = residuals
    padding, strides = tuple(map(tuple, padding)), tuple(strides)
    if dy.dtype == jnp.float32 and onednn.applies(x, w, preferred_element_type):
        return onednn.input_grad(dy, w, padding, x.shape, strides), onednn.kernel_grad(
            x, dy, padding, w.shape, strides
        )
    if strides != (1, 1):
        dy = _stride_one_cotangent(dy, x.shape, w.shape, padding, strides)
    kh, kw = w.shape[:2]
    # dx[i] = sum_o dy[o] w[i - o + lo]: correlate dy with the flipped kernel, in/out swapped
    w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)).astype(dy.dtype)
    pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), padding)]
    dx = lax.conv_general_dilated(
        dy, w_t, (1, 1), pads, dimension_numbers=_NHWC_HWIO, precision=precision
    )
    # dw[k, c, f] = sum_{n, o} x_pad[n, o + k, c] dy[n, o, f]: batch <- c, features <- n
    lhs = jnp.transpose(x, (3, 1, 2, 0)).astype(dy.dtype)
    rhs = jnp.transpose(dy, (1, 2, 0, 3))
    dw = lax.conv_general_dilated(
        lhs, rhs, (1, 1), padding, dimension_numbers=_NHWC_HWIO, precision=precision
    )
    return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _plain_padding(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
):
    """Explicit ``((lo, hi), (lo, hi))`` if the call is one :func:`conv2d` computes, else None."""
    if lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
        return None
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC_SPECS:
        return None
    if any(tuple(v or (1, 1)) != (1, 1) for v in (lhs_dilation, rhs_dilation)):
        return None
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if not all(0 <= lo < k and 0 <= hi < k for (lo, hi), k in zip(padding, rhs.shape[:2])):
        return None
    return padding


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with :func:`conv2d` on CPU for plain (undilated, ungrouped,
    NHWC/HWIO, any stride) 2-D convolutions.

    Same arguments and values. ``lax.platform_dependent`` picks the branch when the program is
    lowered, so a program lowered for GPU or TPU holds XLA's own convolution and gradients.
    """
    xla = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    strides = tuple(window_strides or (1, 1))
    pads = _plain_padding(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    )
    if pads is None:
        return xla(lhs, rhs)
    return lax.platform_dependent(
        lhs,
        rhs,
        cpu=lambda x, w: conv2d(x, w, pads, precision, preferred_element_type, strides),
        default=xla,
    )
