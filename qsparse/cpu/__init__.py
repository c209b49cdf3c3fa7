"""Everything qsparse does to run fast on XLA:CPU, behind one door.

* :mod:`qsparse.cpu.conv`: :func:`conv_general_dilated`, a drop-in for
  ``lax.conv_general_dilated`` that qsparse's models pass to ``nn.Conv`` (Flax's hook) and
  :class:`qsparse.layers.QConv`. Lowered for the CPU, plain NHWC convolutions (any stride) run
  on :func:`conv2d`, whose gradients XLA:CPU computes fast; lowered for any other backend the
  program holds XLA's own convolution and its own autodiff gradients.
* :mod:`qsparse.cpu.onednn`: the optional oneDNN kernels behind :func:`conv2d` (``jax.ffi``).
* :mod:`qsparse.cpu.options`: XLA compiler options for models without convolutions.

Nothing outside this package knows about XLA:CPU; on GPU and TPU none of it runs.
"""

from qsparse.cpu import onednn
from qsparse.cpu.conv import conv2d, conv_general_dilated
from qsparse.cpu.options import DENSE_COMPILER_OPTIONS, compiler_options, has_conv

__all__ = [
    "DENSE_COMPILER_OPTIONS",
    "compiler_options",
    "conv2d",
    "conv_general_dilated",
    "has_conv",
    "onednn",
]
