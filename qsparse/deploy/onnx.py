"""An export file as a standard ONNX graph, for the runtimes and hardware that read ONNX.

:func:`build` turns an export file's header and arrays (:func:`qsparse.deploy.read`) into an
ONNX model that takes what :meth:`qsparse.deploy.Model.predict` takes, raw uint8 images
``(N, H, W, C)``, and returns its logits ``(N, num_classes)`` float32. The graph holds the whole
forward pass: the normalisation ``(pixels / scale - mean) / std``, the input encoding into
hypercomplex channels (a matrix over the channel axis), each layer's real kernel as the numpy
runtime rebuilds it (:mod:`qsparse.deploy.matrices`: an algebra's table, a PHM layer's rules, the
hashed tying) with pruned weights as zeros, ``Gemm`` and ``Conv`` (NCHW inside the graph, strided
and padded as the op says), ``Relu``, ``MaxPool``, ``GlobalAveragePool``, the flatten layouts of
:mod:`qsparse.ops` as reshapes and transposes, a batch norm op's stored map as ``Mul`` and ``Add``
(``whiten``: a 1x1 ``Conv``) and a residual op's branches joined by ``Add``.
:func:`to_onnx` converts a file and writes the result atomically (:mod:`qsparse.files`).

Numpy only at import; ``onnx`` (and, for :func:`run`, ``onnxruntime``) are imported when used,
from the ``onnx`` extra: ``pip install 'qsparse-jax[onnx]'``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from qsparse import files, ops
from qsparse.deploy import batchnorm as bn_lib
from qsparse.deploy.format import ExportFileError, decode_kernel, dense_kernel, read
from qsparse.deploy.matrices import real_kernel
from qsparse.deploy.runtime import structure

OPSET = 17  # the ONNX operator set the graph is written in
IR_VERSION = 8  # the ONNX IR version of opset 17, so that runtimes as old as the opset read it
INPUT, OUTPUT = "images", "logits"
EXTRA = "pip install 'qsparse-jax[onnx]'"


def require(package: str = "onnx") -> ModuleType:
    """The ``onnx`` or ``onnxruntime`` module; ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"ONNX export needs the {package} package: {EXTRA}") from None


class _Graph:
    """The nodes and initializers built so far, and the running tensor: its name, its shape
    without the batch axis, and its layout (``nhwc``, ``nchw`` or ``flat``)."""

    def __init__(self, onnx: ModuleType, shape: tuple[int, ...]):
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.x, self.shape, self.layout = INPUT, shape, "nhwc"

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def add(self, op_type: str, *inputs: str, **attrs) -> None:
        """A node on the running tensor (and ``inputs``), whose output becomes the running one."""
        out = f"{len(self.nodes)}_{op_type}"
        node = self.onnx.helper.make_node(op_type, [self.x, *inputs], [out], name=out, **attrs)
        self.nodes.append(node)
        self.x = out

    def reshape(self, shape: tuple[int, ...]) -> None:
        """To ``(batch, *shape)``."""
        self.add("Reshape", self.const(f"{len(self.nodes)}_shape", np.array([0, *shape])))

    def to(self, layout: str) -> None:
        """An image tensor in ``layout`` (``nhwc`` or ``nchw``); its shape stays (H, W, C)."""
        if self.layout == "flat":
            raise ValueError("an image op after the features were flattened")
        if self.layout != layout:
            self.add("Transpose", perm=[0, 3, 1, 2] if layout == "nchw" else [0, 2, 3, 1])
            self.layout = layout


# -- the ops ---------------------------------------------------------------------------------------


def _normalize(g: _Graph, spec: dict) -> None:
    """uint8 pixels -> ``(x / scale - mean) / std`` float32, as :func:`qsparse.ops.normalize`."""
    channels = g.shape[-1]
    mean, std = (np.asarray(spec[k], np.float32) for k in ("mean", "std"))
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"mean/std do not match the {channels} input channels")
    g.add("Cast", to=g.onnx.TensorProto.FLOAT)
    g.add("Div", g.const("scale", np.array(float(spec["scale"]), np.float32)))
    g.add("Sub", g.const("mean", mean))
    g.add("Div", g.const("std", std))


def _encode(g: _Graph, op: ops.Encode) -> None:
    """The encoding as the matrix it is over the channel axis: the encoding of the identity."""
    identity = np.eye(g.shape[-1], dtype=np.float32)
    matrix = ops.ENCODINGS[op.encoding](identity, n=op.n)  # checks the channel count, too
    if op.encoding == "none":
        return
    g.to("nhwc")
    g.add("MatMul", g.const(f"{len(g.nodes)}_encoding", np.asarray(matrix, np.float32)))
    g.shape = (*g.shape[:-1], matrix.shape[-1])


def _flatten(g: _Graph, op: ops.Flatten) -> None:
    """``flat``: (H, W, C) order; ``blocked``: component by component, ``(n, H, W, C / n)``."""
    h, w, c = g.shape
    if op.layout == "blocked":
        if c % op.n:
            raise ValueError(f"{c} channels do not split into {op.n} components")
        if g.layout == "nhwc":
            g.reshape((h, w, op.n, c // op.n))
            g.add("Transpose", perm=[0, 3, 1, 2, 4])
        else:
            g.to("nchw")
            g.reshape((op.n, c // op.n, h, w))
            g.add("Transpose", perm=[0, 1, 3, 4, 2])
    else:
        g.to("nhwc")
    g.reshape((-1,))
    g.shape, g.layout = (h * w * c,), "flat"


def layer_kernel(op: ops.Dense | ops.Conv, entry: dict, header: dict, arrays: dict):
    """(real kernel, bias) of a layer, rebuilt as the numpy runtime rebuilds it (zeros where
    pruned): the stored values decoded, made dense, and made real by the layer's structure."""
    shape = tuple(entry["kernel_shape"])
    parts = {
        k: arrays[f"{op.name}/{k}"] for k in ("values", "positions") if f"{op.name}/{k}" in arrays
    }
    positions, values = decode_kernel(entry["storage"], shape, parts, header["dtype"])
    layer_structure = structure(op, entry, header.get("algebras", {}), arrays)
    kernel = real_kernel(layer_structure, dense_kernel(entry["storage"], shape, positions, values))
    has_bias = getattr(op, "bias", True)
    bias = np.asarray(arrays[f"{op.name}/bias"] if has_bias else np.zeros(kernel.shape[-1]))
    bias = bias.astype(np.float32)
    if bias.shape != (kernel.shape[-1],):
        raise ValueError(f"bias of shape {bias.shape}, expected ({kernel.shape[-1]},)")
    return np.asarray(kernel, np.float32), bias


def _layer(g: _Graph, op: ops.Dense | ops.Conv, entry: dict, header: dict, arrays: dict) -> None:
    """A dense layer as ``Gemm``, a convolution as ``Conv`` on NCHW."""
    try:
        kernel, bias = layer_kernel(op, entry, header, arrays)
    except KeyError as e:
        raise ValueError(f"layer {op.name}: {e} is missing") from None
    except ValueError as e:
        raise ValueError(f"layer {op.name}: {e}") from None
    if kernel.shape[-2] != g.shape[-1]:
        raise ValueError(f"layer {op.name}: kernel {kernel.shape} on features {g.shape}")
    b = g.const(f"{op.name}/bias", bias)
    if isinstance(op, ops.Dense):
        if g.layout != "flat":
            raise ValueError(f"layer {op.name}: a dense layer on unflattened {g.shape} features")
        g.add("Gemm", g.const(f"{op.name}/kernel", kernel), b)
    else:
        if kernel.ndim != 4:
            raise ValueError(f"layer {op.name}: only 2-D convolutions run")
        kh, kw = kernel.shape[:2]
        (pt, pb), (pl, pr) = ops.conv_pads(op, kh, kw)
        (sh, sw), (h, w) = op.strides, g.shape[:2]
        g.to("nchw")
        oihw = g.const(f"{op.name}/kernel", np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        g.add("Conv", oihw, b, kernel_shape=[kh, kw], pads=[pt, pl, pb, pr], strides=[sh, sw])
        g.shape = ((h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, g.shape[-1])
    g.shape = (*g.shape[:-1], kernel.shape[-1])


def _batchnorm(g: _Graph, op: ops.BatchNorm, arrays: dict) -> None:
    """The stored map (:mod:`qsparse.deploy.batchnorm`) on NCHW: ``Mul`` and ``Add`` per real
    channel (``shared``: each channel's number for its ``n`` components), ``whiten`` a 1x1
    ``Conv`` whose matrix holds each channel's ``n x n`` block."""
    norm = bn_lib.Norm(op, arrays)
    f = g.shape[-1]
    if norm.shift.shape != (f,):
        raise ValueError(f"batch norm {op.name}: shift {norm.shift.shape} on {f} features")
    g.to("nchw")
    if op.form == "whiten":
        n, c = op.n, f // op.n
        matrix = np.zeros((n, c, n, c), np.float32)  # [a, c, d, c']: output a c, input d c'
        matrix[:, np.arange(c), :, np.arange(c)] = norm.scale  # (c, a, d) on the diagonal c = c'
        weight = g.const(f"{op.name}/matrix", matrix.reshape(f, f, 1, 1))
        g.add("Conv", weight, g.const(f"{op.name}/shift", norm.shift), kernel_shape=[1, 1])
        return
    scale = norm.scale if op.form == "split" else np.tile(norm.scale, op.n)
    g.add("Mul", g.const(f"{op.name}/scale", scale.reshape(f, 1, 1).astype(np.float32)))
    g.add("Add", g.const(f"{op.name}/shift", norm.shift.reshape(f, 1, 1)))


def _residual(g: _Graph, entry: dict, header: dict, arrays: dict) -> None:
    """Both branches from the running tensor (NCHW), then ``Add``."""
    g.to("nchw")
    start = g.x, g.shape
    _ops(g, entry["body"], header, arrays)
    g.to("nchw")
    body, body_shape = g.x, g.shape
    g.x, g.shape, g.layout = *start, "nchw"
    _ops(g, entry.get("shortcut", []), header, arrays)
    g.to("nchw")
    if g.shape != body_shape:
        raise ValueError(f"a residual's body ends in {body_shape}, its shortcut in {g.shape}")
    g.add("Add", body)


def _ops(g: _Graph, entries: list[dict], header: dict, arrays: dict) -> None:
    """The header's ``entries`` in order."""
    for entry in entries:
        op = ops.from_json(entry)
        if isinstance(op, ops.Dense | ops.Conv):
            _layer(g, op, entry, header, arrays)
        elif isinstance(op, ops.BatchNorm):
            _batchnorm(g, op, arrays)
        elif isinstance(op, ops.Residual):
            _residual(g, entry, header, arrays)
        else:
            _step(g, op)


def _step(g: _Graph, op: ops.Op) -> None:
    """An op without weights."""
    if isinstance(op, ops.Relu):
        g.add("Relu")
    elif isinstance(op, ops.MaxPool2x2):
        g.to("nchw")
        g.add("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
        g.shape = (g.shape[0] // 2, g.shape[1] // 2, g.shape[2])
    elif isinstance(op, ops.Flatten):
        _flatten(g, op)
    elif isinstance(op, ops.AvgPool):
        g.to("nchw")
        g.add("GlobalAveragePool")
        g.reshape((g.shape[-1],))
        g.shape, g.layout = (g.shape[-1],), "flat"
    else:
        _encode(g, op)


# -- the model -------------------------------------------------------------------------------------


def build(header: dict, arrays: dict[str, np.ndarray]):
    """The ONNX model (``onnx.ModelProto``, checked by ``onnx.checker``) of an export file's
    header and arrays; ExportFileError saying what does not fit."""
    onnx = require()
    try:
        shape = tuple(int(s) for s in header["input"]["shape"])
        g = _Graph(onnx, shape)
        _normalize(g, header["input"])
        _ops(g, header["ops"], header, arrays)
        classes = int(header["num_classes"])
        if g.shape != (classes,) or g.layout != "flat":
            raise ValueError(f"the ops end in features {g.shape}, not {classes} logits")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ExportFileError(f"cannot convert to ONNX: {type(e).__name__}: {e}") from None
    g.nodes[-1].output[0] = OUTPUT
    h = onnx.helper
    graph = h.make_graph(
        g.nodes,
        "qsparse",
        [h.make_tensor_value_info(INPUT, onnx.TensorProto.UINT8, ["N", *shape])],
        [h.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, ["N", classes])],
        g.initializers,
    )
    model = h.make_model(
        graph,
        opset_imports=[h.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="qsparse",
        doc_string=f"raw uint8 images (N, {', '.join(map(str, shape))}) -> logits (N, {classes})",
    )
    prov = {k: v for k, v in header.get("provenance", {}).items() if k != "config"}
    h.set_model_props(
        model, {"qsparse_sha256": str(header.get("sha256")), "provenance": json.dumps(prov)}
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model, out: str | os.PathLike, overwrite: bool = False) -> int:
    """Write an ONNX model to ``out`` atomically (an existing file is kept unless
    ``overwrite``); its size in bytes. :class:`qsparse.files.WriteError` when it cannot be."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (overwrite it explicitly)")
    files.write_bytes(out, model.SerializeToString())
    return out.stat().st_size


def to_onnx(
    source: str | os.PathLike | tuple[dict, dict],
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
):
    """The ONNX model of an export file (its path, or the ``(header, arrays)`` of
    :func:`qsparse.deploy.read`), written to ``out`` when given."""
    if isinstance(source, str | os.PathLike):
        header, arrays = read(source)
        try:
            model = build(header, arrays)
        except ExportFileError as e:
            raise ExportFileError(f"export file {source}: {e}") from None
    else:
        model = build(*source)
    if out is not None:
        save(model, out, overwrite)
    return model


def run(model, images: np.ndarray) -> np.ndarray:
    """The ONNX model's logits of uint8 ``(N, H, W, C)`` images, by onnxruntime on the CPU."""
    ort = require("onnxruntime")
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images of dtype {images.dtype}; the ONNX model takes uint8 pixels")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: images})[0]
