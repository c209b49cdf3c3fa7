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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(inputs, kernel, padding, precision=None, preferred_element_type=None):
    """Stride-1 2-D convolution for the CPU,
    ``(N, H, W, C_in) x (kh, kw, C_in, C_out) -> (N, H', W', C_out)``, with explicit ``padding``
    ``((lo, hi), (lo, hi))`` (each ``0 <= pad < kernel size``).

    Equal to ``lax.conv_general_dilated`` with the same arguments; only the kernels differ. Float32
    convolutions run on oneDNN when the extension is built; otherwise the gradients are forward
    convolutions in the canonical NHWC/HWIO layout (input gradient: the flipped, transposed
    kernel; kernel gradient: input channels as the batch and examples as the features).
    Reverse-mode only (a ``custom_vjp``): pass ``lax.conv_general_dilated`` to a model for
    forward-mode autodiff.
    """
    padding = tuple(map(tuple, padding))
    if onednn.applies(inputs, kernel, preferred_element_type):
        return onednn.forward(inputs, kernel, padding)
    return lax.conv_general_dilated(
        inputs,
        kernel,
        (1, 1),
        padding,
        dimension_numbers=_NHWC_HWIO,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _conv2d_fwd(inputs, kernel, padding, precision, preferred_element_type):
    return conv2d(inputs, kernel, padding, precision, preferred_element_type), (inputs, kernel)


def _conv2d_bwd(padding, precision, preferred_element_type, residuals, dy):
    x, w = residuals
    padding = tuple(map(tuple, padding))
    if dy.dtype == jnp.float32 and onednn.applies(x, w, preferred_element_type):
        return onednn.input_grad(dy, w, padding, x.shape), onednn.kernel_grad(
            x, dy, padding, w.shape
        )
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
    """Explicit ``((lo, hi), (lo, hi))`` if the call is one :func:`strided_conv2d` computes,
    else None."""
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


def strided_conv2d(inputs, kernel, strides, padding, precision=None, preferred_element_type=None):
    """:func:`conv2d` at ``strides``: the stride-1 convolution's every ``strides``-th output
    (the same values; XLA:CPU's strided gradients are naive loops inside the compiled epoch). A
    1x1 kernel without padding reads only the pixels it keeps, so those are taken first; other
    kernels pay the stride-1 convolution (a ResNet's few downsampling ones)."""
    sh, sw = strides
    if (sh, sw) == (1, 1):
        return conv2d(inputs, kernel, padding, precision, preferred_element_type)
    if kernel.shape[:2] == (1, 1):  # padding is 0 for a 1x1 kernel here (pad < kernel size)
        return conv2d(inputs[:, ::sh, ::sw], kernel, padding, precision, preferred_element_type)
    return conv2d(inputs, kernel, padding, precision, preferred_element_type)[:, ::sh, ::sw]


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
    """``lax.conv_general_dilated`` with :func:`strided_conv2d` on CPU for plain (undilated,
    ungrouped, NHWC/HWIO, any stride) 2-D convolutions.

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
        cpu=lambda x, w: strided_conv2d(x, w, strides, pads, precision, preferred_element_type),
        default=xla,
    )
