"""The optional oneDNN convolution extension (see qsparse/cpu/onednn.py); everything else is in
pyproject.toml.

Where oneDNN comes from, in order (``QSPARSE_ONEDNN`` in the environment picks one):

- ``pip``: PyPI's ``onednn-devel-cpu-gomp`` (headers; a build requirement in pyproject.toml on
  Linux x86-64) and ``onednn-cpu-gomp`` (``libdnnl.so.3``; a dependency, so it is there at run
  time too). Found through their installed files (``importlib.metadata``), wherever pip put them:
  the isolated build environment or the target environment. The extension gets an rpath to the
  environment's ``lib/``, and qsparse/cpu/onednn.py loads the library from the package should
  that not find it (an editable install, a moved environment).
- ``system``: the compiler's default paths, e.g. Debian's ``apt-get install libdnnl-dev``
  (oneDNN 2.6 on Debian 12).
- ``none``: no extension.

``auto`` (the default) takes ``pip`` when its packages are installed, else ``system``. Either
way the extension is ``optional=True``: where it does not compile (no headers) the build warns
(shown by ``pip install -v``), skips it and installs the pure-Python package, whose convolutions
then run on XLA's kernels.
"""

import os
import sys
from importlib import metadata
from pathlib import Path

import jaxlib
from setuptools import Extension, setup

# jaxlib ships the XLA FFI headers (what jax.ffi.include_dir() returns)
FFI_INCLUDE = os.path.join(os.path.dirname(os.path.abspath(jaxlib.__file__)), "include")

PIP_DEVEL, PIP_RUNTIME = "onednn-devel-cpu-gomp", "onednn-cpu-gomp"
CHOICES = ("auto", "pip", "system", "none")


def _installed_file(dist: str, suffix: str) -> Path | None:
    """Where the file of an installed distribution whose path ends with ``suffix`` lies."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return None
    name = suffix.rsplit("/", 1)[-1]
    for f in files:  # RECORD paths are relative to site-packages: "../../libdnnl.so"
        if f.name == name:
            path = Path(f.locate()).resolve()
            if path.as_posix().endswith(suffix) and path.exists():
                return path
    return None


def pip_onednn() -> tuple[str, str] | None:
    """(include dir, lib dir) of PyPI's oneDNN when both its packages are installed."""
    header = _installed_file(PIP_DEVEL, "include/oneapi/dnnl/dnnl.hpp")
    library = _installed_file(PIP_RUNTIME, "lib/libdnnl.so")
    if header is None or library is None:
        return None
    return str(header.parents[2]), str(library.parent)


def extensions() -> list[Extension]:
    choice = os.environ.get("QSPARSE_ONEDNN", "auto")
    if choice not in CHOICES:
        raise SystemExit(f"QSPARSE_ONEDNN={choice!r} is not one of {CHOICES}")
    found = pip_onednn() if choice in ("auto", "pip") else None
    if choice == "none" or (choice == "pip" and found is None):
        print(
            f"qsparse: QSPARSE_ONEDNN={choice}: not building the oneDNN extension", file=sys.stderr
        )
        return []
    include_dirs, library_dirs, rpath = [], [], []
    if found is not None:
        include, lib = found
        include_dirs, library_dirs = [include], [lib]
        # The runtime package puts libdnnl.so.3 in <env>/lib: site-packages/qsparse/../../.. for an
        # installed qsparse, and the environment this build runs for (an editable install).
        rpath = ["$ORIGIN/../../..", os.path.join(sys.prefix, "lib")]
        print(
            f"qsparse: building the oneDNN extension against {PIP_DEVEL} ({include})",
            file=sys.stderr,
        )
    else:
        print("qsparse: building the oneDNN extension against the system's oneDNN", file=sys.stderr)
    return [
        Extension(
            "qsparse._onednn_conv",
            ["csrc/onednn_conv.cc"],
            language="c++",
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            runtime_library_dirs=rpath,
            libraries=["dnnl"],
            extra_compile_args=["-std=c++17", "-O2", "-isystem", FFI_INCLUDE],
            optional=True,
        )
    ]


setup(ext_modules=extensions())
