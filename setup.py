"""The optional oneDNN convolution extension (see qsparse/cpu/onednn.py); everything else is in
pyproject.toml.

``optional=True``: where oneDNN's headers are missing (``apt-get install libdnnl-dev`` provides
them) the build warns (shown by `pip install -v`), skips the extension and installs the
pure-Python package.
"""

import os

import jaxlib
from setuptools import Extension, setup

# jaxlib ships the XLA FFI headers (what jax.ffi.include_dir() returns)
FFI_INCLUDE = os.path.join(os.path.dirname(os.path.abspath(jaxlib.__file__)), "include")

setup(
    ext_modules=[
        Extension(
            "qsparse._onednn_conv",
            ["csrc/onednn_conv.cc"],
            language="c++",
            libraries=["dnnl"],
            extra_compile_args=["-std=c++17", "-O2", "-isystem", FFI_INCLUDE],
            optional=True,
        )
    ]
)
