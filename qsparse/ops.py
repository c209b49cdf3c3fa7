"""The deploy ops: a model's forward pass as steps the numpy runtime runs, and their array code.

Each model of :mod:`qsparse.models` and :mod:`qsparse.resnets` states its ops (``deploy_ops``)
beside its ``__call__`` (a ResNet's blocks as :class:`Residual` ops holding op lists);
:mod:`qsparse.export` writes them into an export file's header (as :func:`to_json`) and
:mod:`qsparse.deploy` runs them. The array functions below take the array module as ``xp``
(numpy, the default, or jax.numpy), so that the JAX models and the numpy runtime run the same
code: input normalisation, the hypercomplex input encodings, the component-blocked layout and
2x2 max-pooling. Numpy only (importable without jax).

A layer's ``kind`` is the name of its algebra (:mod:`qsparse.algebras`): ``real`` (kernel
``<name>/kernel``), ``quat`` (the quaternion layers' ``<name>/qkernel``) or any other registered
algebra (the hypercomplex layers' ``<name>/hkernel``, plus ``<name>/phm_rules`` for the PHM kinds;
the hashed kind's tying comes from ``hash_seed``).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import ClassVar

import numpy as np

from qsparse.algebras import LUMA

LAYOUTS = ("flat", "blocked")
# A layer's kernel param by kind, as the module docstring says: every name a kernel leaf may
# have (the prunable leaves), and those holding a number's n components on axis 0.
KERNEL_NAMES = ("kernel", "qkernel", "hkernel")
COMPONENT_KERNELS = ("qkernel", "hkernel")


def kernel_name(kind: str) -> str:
    """The kernel param of a layer of algebra ``kind``: ``kernel``, ``qkernel`` or ``hkernel``."""
    return {"real": "kernel", "quat": "qkernel"}.get(kind, "hkernel")


@dataclasses.dataclass(frozen=True)
class Encode:
    """Real image channels -> component-blocked channels of an ``n``-dimensional algebra
    (:data:`ENCODINGS`)."""

    encoding: str
    n: int = 4
    op: ClassVar[str] = "encode"


@dataclasses.dataclass(frozen=True)
class Flatten:
    """``flat``: a reshape in (H, W, C) order; ``blocked``: component by component, ``[all r |
    all i | all j | all k]`` for ``n = 4``."""

    layout: str
    n: int = 4
    op: ClassVar[str] = "flatten"


@dataclasses.dataclass(frozen=True)
class Relu:
    op: ClassVar[str] = "relu"


@dataclasses.dataclass(frozen=True)
class MaxPool2x2:
    op: ClassVar[str] = "maxpool2x2"


@dataclasses.dataclass(frozen=True)
class Dense:
    """``x @ W + b``; ``kind`` the layer's algebra (its params as the module docstring says)."""

    name: str
    kind: str
    hash_seed: int = 0
    op: ClassVar[str] = "dense"


@dataclasses.dataclass(frozen=True)
class Conv:
    """A convolution, plus a bias unless ``bias`` is false; kernels HWIO (real) or ``(n, kh, kw,
    in/n, out/n)``. ``padding``: ``SAME`` (stride 1) or ``p`` zeros on every side; ``folded``
    names the batch norm the exporter folded into the kernel and bias (empty: none)."""

    name: str
    kind: str
    hash_seed: int = 0
    padding: str | int = "SAME"
    strides: tuple[int, int] = (1, 1)
    bias: bool = True
    folded: str = ""
    op: ClassVar[str] = "conv"


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """Eval-mode batch norm of ``form`` (``split``, ``shared``, ``whiten``) over ``n``-component
    channels: an affine map per hypercomplex channel, stored as ``<name>/scale`` and
    ``<name>/shift`` (:mod:`qsparse.deploy.batchnorm`)."""

    name: str
    form: str
    n: int = 1
    op: ClassVar[str] = "batchnorm"


@dataclasses.dataclass(frozen=True)
class Residual:
    """``body(x) + shortcut(x)``: two op lists on the same input (an empty shortcut: ``x``)."""

    body: tuple
    shortcut: tuple = ()
    op: ClassVar[str] = "residual"


@dataclasses.dataclass(frozen=True)
class AvgPool:
    """The global average pool: ``(B, H, W, C)`` -> ``(B, C)``, the mean over H and W."""

    op: ClassVar[str] = "avgpool"


Op = Encode | Flatten | Relu | MaxPool2x2 | Dense | Conv | BatchNorm | Residual | AvgPool
OPS: dict[str, type] = {
    cls.op: cls
    for cls in (Encode, Flatten, Relu, MaxPool2x2, Dense, Conv, BatchNorm, Residual, AvgPool)
}
RELU, MAXPOOL2X2, AVGPOOL = Relu(), MaxPool2x2(), AvgPool()
BN_FORMS = ("split", "shared", "whiten")
BRANCHES = ("body", "shortcut")  # a residual op's op lists


def to_json(op: Op) -> dict:
    """The op as an export header holds it: ``{"op": name, **fields}`` (tuples as lists, a
    residual's branches as lists of such entries)."""
    fields = {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
    if isinstance(op, Residual):
        fields = {k: [to_json(o) for o in fields[k]] for k in BRANCHES}
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return {"op": op.op, **fields}


def from_json(entry: dict) -> Op:
    """The op of a header entry (keys beyond its fields, such as a layer's storage, are left;
    a residual's branches are read too); ValueError naming an unknown op or a bad field."""
    cls = OPS.get(entry.get("op"))
    if cls is None:
        raise ValueError(f"unknown op {entry.get('op')!r}; valid: {list(OPS)}")
    fields = {f.name: entry[f.name] for f in dataclasses.fields(cls) if f.name in entry}
    if "strides" in fields:
        fields["strides"] = tuple(fields["strides"])
    if cls is Residual:
        fields = {k: tuple(from_json(e) for e in entry.get(k, [])) for k in BRANCHES}
    op = cls(**fields)
    if isinstance(op, Flatten) and op.layout not in LAYOUTS:
        raise ValueError(f"unknown flatten layout {op.layout!r}; valid: {list(LAYOUTS)}")
    if isinstance(op, Encode) and op.encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {op.encoding!r}; valid: {list(ENCODINGS)}")
    if isinstance(op, BatchNorm) and op.form not in BN_FORMS:
        raise ValueError(f"unknown batch norm form {op.form!r}; valid: {list(BN_FORMS)}")
    if isinstance(op, Conv):
        conv_pads(op, 1, 1)  # checks the padding
    return op


def walk(entries: list[dict]):
    """Every op entry of a header's ``ops``, a residual's branches included, in order."""
    for entry in entries:
        yield entry
        for branch in BRANCHES if entry.get("op") == Residual.op else ():
            yield from walk(entry.get(branch, []))


def conv_pads(op: Conv, kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """A convolution's zeros (before, after) on H and W: ``SAME`` (stride 1 only) puts the odd
    one after; an integer ``p`` puts ``p`` on every side."""
    if op.padding == "SAME" and tuple(op.strides) == (1, 1):
        return ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)
    if isinstance(op.padding, int) and not isinstance(op.padding, bool) and op.padding >= 0:
        return (op.padding, op.padding), (op.padding, op.padding)
    raise ValueError(
        f"conv {op.name}: padding {op.padding!r} with strides {list(op.strides)}; valid: "
        "'SAME' with strides [1, 1], or a number of zeros >= 0"
    )


# -- preprocessing -------------------------------------------------------------------------------


def normalize(images, mean, std, scale: float = 255.0, *, xp: ModuleType = np):
    """``(images / scale - mean) / std`` in float32, per channel (last axis).

    ``images`` hold pixel values in ``[0, scale]`` (uint8 or float); ``mean``/``std`` are in
    ``[0, 1]`` units, as torchvision's ``ToTensor`` + ``Normalize``.
    """
    x = xp.asarray(images, xp.float32) / scale
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


# -- input encodings: real images (..., H, W, C) -> component-blocked channels ---------------------


def _check_channels(x, channels: int, name: str) -> None:
    if x.shape[-1] != channels:
        raise ValueError(f"encoding '{name}' needs {channels} input channel(s), got {x.shape[-1]}")


def _gray(rgb):
    return sum(w * rgb[..., c : c + 1] for c, w in enumerate(LUMA))


def encode_rgb_gray(x, n: int = 4, *, xp: ModuleType = np):
    """(R, G, B) -> r=R, i=G, j=B, k=gray: the paper's CIFAR encoding (gray of the normalised
    image). The same 4 channels are 2 complex channels ``R + B i`` and ``G + gray i`` for
    ``n = 2``."""
    _check_channels(x, 3, "rgb_gray")
    return xp.concatenate([x, _gray(x)], axis=-1)


def encode_rgb_pure(x, n: int = 4, *, xp: ModuleType = np):
    """(R, G, B) -> the pure quaternion 0 + R i + G j + B k (for ``n = 2``: ``0 + G i`` and
    ``R + B i``)."""
    _check_channels(x, 3, "rgb_pure")
    return xp.concatenate([xp.zeros_like(x[..., :1]), x], axis=-1)


def encode_gray_pure(x, n: int = 4, *, xp: ModuleType = np):
    """Grayscale x -> the pure number with every imaginary part x: 0 + x i + x j + x k for
    ``n = 4`` (Parcollet's advice for one-channel images), 0 + x i for ``n = 2``."""
    _check_channels(x, 1, "gray_pure")
    return xp.concatenate([xp.zeros_like(x)] + [x] * (n - 1), axis=-1)


def encode_none(x, n: int = 4, *, xp: ModuleType = np):
    """Channels are already component-blocked (their count must be a multiple of ``n``)."""
    if x.shape[-1] % n:
        raise ValueError(
            f"encoding 'none' needs a channel count divisible by {n}, got {x.shape[-1]}; "
            f"choose one of {sorted(ENCODINGS)}"
        )
    return x


ENCODINGS = {
    "rgb_gray": encode_rgb_gray,
    "rgb_pure": encode_rgb_pure,
    "gray_pure": encode_gray_pure,
    "none": encode_none,
}


# -- the component-blocked layout, pooling ---------------------------------------------------------


def to_components(x, axis: int = -1, n: int = 4, *, xp: ModuleType = np):
    """Split a component-blocked feature axis into a leading component axis of size ``n``."""
    x = xp.moveaxis(x, axis, -1)
    if x.shape[-1] % n:
        raise ValueError(f"feature axis of size {x.shape[-1]} is not a multiple of {n}")
    x = x.reshape(*x.shape[:-1], n, x.shape[-1] // n)
    return xp.moveaxis(x, -2, 0)


def from_components(q, *, xp: ModuleType = np):
    """Inverse of :func:`to_components` for ``axis=-1``."""
    return xp.moveaxis(q, 0, -2).reshape(*q.shape[1:-1], q.shape[0] * q.shape[-1])


def blocked_flatten(x, n: int = 4, *, xp: ModuleType = np):
    """Flatten ``(batch, ..., n * c)`` activations to ``(batch, n * prod(...) * c)``, block
    layout.

    A plain reshape would interleave components per pixel; a quaternion dense layer after a
    quaternion conv needs ``[all r | all i | all j | all k]`` (what NCHW flattening gives in
    the paper's PyTorch code).
    """
    q = to_components(x, n=n, xp=xp)  # (n, batch, ..., c)
    q = q.reshape(n, q.shape[1], -1)
    return xp.moveaxis(q, 0, 1).reshape(q.shape[1], -1)


def flatten(x, layout: str, n: int = 4, *, xp: ModuleType = np):
    """The :class:`Flatten` op: ``flat`` or ``blocked`` (``n`` components)."""
    if layout == "blocked":
        return blocked_flatten(x, n, xp=xp)
    return x.reshape(x.shape[0], -1)


def avg_pool(x):
    """The :class:`AvgPool` op: the mean over H and W of NHWC ``x`` (numpy or jax arrays)."""
    return x.mean(axis=(1, 2))


def max_pool_2x2(x):
    """2x2 max-pool with stride 2 (VALID, as ``nn.max_pool(x, (2, 2), (2, 2))``), as a reshape
    and a max (numpy or jax arrays).

    Same values; the gradient is elementwise where ``nn.max_pool``'s is a select-and-scatter, which
    XLA:CPU runs far more slowly. Exact ties among a window's maxima share its gradient instead of
    the first taking it.
    """
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
