"""qsparse: sparse quaternion neural networks in JAX/Flax.

Modules are imported explicitly (``from qsparse.layers import QDense``) so that using the
layers never pulls in the experiment stack (tensorflow-datasets, Orbax, absl).
"""

__version__ = "0.1.0"
