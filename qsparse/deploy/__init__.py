"""Pruned models as one self-contained file, and a small runtime that needs only numpy and scipy.

``python -m experiments.export`` writes a trained round of a run directory as one ``.npz`` file;
:func:`load` reads it back and returns a :class:`Model` whose :meth:`Model.predict` takes raw
uint8 images and returns the trained model's logits::

    from qsparse import deploy

    model = deploy.load("lenet300_100_quat.npz")
    logits = model.predict(images)  # (N, 28, 28, 1) uint8 -> (N, 10) float32

``python -m qsparse.deploy FILE`` checks a file and prints what it holds. The file format is
written out in ``docs/deployment.md``; :mod:`qsparse.deploy.format` implements it (the exporter
writes through :func:`pack` and :func:`save`), :mod:`qsparse.deploy.runtime` runs it. Nothing
here imports jax, flax or TensorFlow; the sparse products compile with numba where it is installed
(``pip install qsparse-jax[fast]``, :mod:`qsparse.deploy.kernels`) and use scipy otherwise.
"""

from qsparse.deploy.format import (
    DTYPES,
    ENCODINGS,
    FORMAT,
    HEADER,
    LAYOUTS,
    READS,
    VERSION,
    ExportFileError,
    algebra_entry,
    choose_storage,
    decode_kernel,
    decode_values,
    dense_kernel,
    encode_kernel,
    encode_values,
    index_dtype,
    pack,
    read,
    save,
    storage_candidates,
)
from qsparse.deploy.runtime import KERNELS, Model, load

__all__ = [
    "DTYPES",
    "ENCODINGS",
    "FORMAT",
    "HEADER",
    "KERNELS",
    "LAYOUTS",
    "READS",
    "VERSION",
    "ExportFileError",
    "Model",
    "algebra_entry",
    "choose_storage",
    "decode_kernel",
    "decode_values",
    "dense_kernel",
    "encode_kernel",
    "encode_values",
    "index_dtype",
    "load",
    "pack",
    "read",
    "save",
    "storage_candidates",
]
