"""oneDNN convolutions for XLA:CPU, through ``jax.ffi`` (optional).

oneDNN's kernels run Conv-2/4/6's convolutions and both their gradients faster than XLA:CPU's own
(``python -m experiments.bench --layers`` measures both). The extension
``qsparse._onednn_conv`` is built from ``csrc/onednn_conv.cc`` when the package is installed: on
Linux x86-64 against PyPI's oneDNN 3.2 (``onednn-devel-cpu-gomp``, a build requirement; its
``libdnnl.so.3`` comes with the dependency ``onednn-cpu-gomp``), elsewhere against a system oneDNN
(Debian/Ubuntu: ``apt-get install libdnnl-dev``) where there is one (setup.py). Without oneDNN the
build skips it and everything runs on XLA's convolutions.

:func:`qsparse.cpu.conv2d` uses these kernels for float32 convolutions; it runs only in programs
lowered for the CPU (:func:`qsparse.cpu.conv_general_dilated`). The choice is made when a function
is traced: ``QSPARSE_CPU_CONV=xla`` in the environment, :func:`set_cpu_conv` or :func:`using` turn
it off for functions traced afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CHOICES = ("auto", "onednn", "xla")
_TARGETS = {
    "forward": "QsparseConvForward",
    "input_grad": "QsparseConvInputGrad",
    "kernel_grad": "QsparseConvKernelGrad",
}
_PREFIX = "qsparse_onednn_conv_"

_RUNTIME = "onednn-cpu-gomp"  # PyPI's oneDNN that setup.py builds against: libdnnl.so.3

_state: dict = {"loaded": None, "error": None, "choice": None, "version": None, "preloaded": None}


def _pip_library() -> str | None:
    """The ``libdnnl.so.3`` of PyPI's ``onednn-cpu-gomp``, where it is installed."""
    try:
        files = importlib.metadata.distribution(_RUNTIME).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "libdnnl.so.3":
            path = os.path.realpath(f.locate())
            if os.path.exists(path):
                return path
    return None


def _open_extension(origin: str) -> ctypes.CDLL:
    """The extension, with its ``libdnnl``: found through its rpath (an installed qsparse) or the
    system's paths; failing those (an editable install, a moved environment), PyPI's library is
    loaded first by its path, which the extension's ``libdnnl.so.3`` then resolves to (by soname).
    RTLD_LOCAL: that library's symbols do not go into the global namespace, where they could stand
    in for a different oneDNN's (an extension built against Debian's libdnnl.so.2)."""
    try:
        return ctypes.CDLL(origin)
    except OSError as e:
        pip = _pip_library()
        if "libdnnl" not in str(e) or pip is None:
            raise
        _state["preloaded"] = ctypes.CDLL(pip, mode=os.RTLD_LOCAL)  # kept loaded
        return ctypes.CDLL(origin)


class _Version(ctypes.Structure):  # dnnl_version_t
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]


def _load() -> bool:
    if _state["loaded"] is None:
        _state["loaded"] = False
        spec = importlib.util.find_spec("qsparse._onednn_conv")
        if spec is None or spec.origin is None:
            _state["error"] = (
                "the extension qsparse._onednn_conv is not built (reinstall qsparse; it is built "
                "against PyPI's onednn-devel-cpu-gomp on Linux x86-64, elsewhere against a "
                "system oneDNN, e.g. `apt-get install libdnnl-dev`; `pip install -v` shows why not)"
            )
            return False
        try:
            lib = _open_extension(spec.origin)
            dnnl_version = lib.dnnl_version  # from the libdnnl the extension loaded
            dnnl_version.restype = ctypes.POINTER(_Version)
            v = dnnl_version().contents
            _state["version"] = f"{v.major}.{v.minor}.{v.patch}"
            for name, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(
                    _PREFIX + name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                )
        except (OSError, AttributeError) as e:  # e.g. libdnnl.so removed after the build
            _state["error"] = f"loading {spec.origin} failed: {e}"
            return False
        _state["loaded"] = True
    return _state["loaded"]


def available() -> bool:
    """Whether the oneDNN extension is built and loads."""
    return _load()


def version() -> str | None:
    """The version of the oneDNN library that the extension runs on ("3.2.0"), or None."""
    return _state["version"] if _load() else None


def set_cpu_conv(choice: str) -> None:
    """``"auto"`` (oneDNN when available), ``"onednn"`` (required) or ``"xla"``, for later
    traces."""
    if choice not in CHOICES:
        raise ValueError(f"cpu convolution {choice!r} is not one of {CHOICES}")
    if choice == "onednn" and not available():
        raise RuntimeError(f"oneDNN convolutions requested but unavailable: {_state['error']}")
    _state["choice"] = choice


@contextlib.contextmanager
def using(choice: str) -> Iterator[None]:
    """:func:`set_cpu_conv` for the functions traced inside the block, restored after it."""
    saved = _state["choice"]
    set_cpu_conv(choice)
    try:
        yield
    finally:
        _state["choice"] = saved


def cpu_conv() -> str:
    """The convolution that :func:`qsparse.cpu.conv2d` uses now: "onednn" or "xla"."""
    if _state["choice"] is None:
        set_cpu_conv(os.environ.get("QSPARSE_CPU_CONV", "auto"))
    if _state["choice"] == "xla":
        return "xla"
    return "onednn" if available() else "xla"


def applies(inputs: jax.Array, kernel: jax.Array, preferred_element_type=None) -> bool:
    """Whether a :func:`qsparse.cpu.conv2d` call with these arguments runs on oneDNN on CPU.

    Float32 only. Any ``precision``: oneDNN's float32 convolution is exact float32 arithmetic,
    which is what every precision setting means for float32 on CPU.
    """
    return (
        cpu_conv() == "onednn"
        and inputs.dtype == jnp.float32
        and kernel.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32, np.float32)
    )


def _call(
    name: str, out_shape: Sequence[int], a: jax.Array, b: jax.Array, padding, strides
) -> jax.Array:
    (top, bottom), (left, right) = padding
    call = jax.ffi.ffi_call(
        _PREFIX + name,
        jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32),
        vmap_method="sequential",
    )
    return call(
        a,
        b,
        pad_top=np.int64(top),
        pad_bottom=np.int64(bottom),
        pad_left=np.int64(left),
        pad_right=np.int64(right),
        stride_h=np.int64(strides[0]),
        stride_w=np.int64(strides[1]),
    )


def forward(x: jax.Array, w: jax.Array, padding, strides=(1, 1)) -> jax.Array:
    """``(N, H, W, C) x (KH, KW, C, O) -> (N, H', W', O)`` at ``strides``, padding
    ``((lo, hi), (lo, hi))``."""
    (top, bottom), (left, right) = padding
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    sh, sw = strides
    out = (n, (h + top + bottom - kh) // sh + 1, (wd + left + right - kw) // sw + 1, o)
    return _call("forward", out, x, w, padding, strides)


def input_grad(
    dy: jax.Array, w: jax.Array, padding, x_shape: Sequence[int], strides=(1, 1)
) -> jax.Array:
    """Gradient of :func:`forward` with respect to ``x``."""
    return _call("input_grad", x_shape, dy, w, padding, strides)


def kernel_grad(
    x: jax.Array, dy: jax.Array, padding, w_shape: Sequence[int], strides=(1, 1)
) -> jax.Array:
    """Gradient of :func:`forward` with respect to ``w``."""
    return _call("kernel_grad", w_shape, x, dy, padding, strides)
