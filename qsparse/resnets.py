"""CIFAR-style residual networks in any algebra, with hypercomplex batch norm.

``resnet20`` is open_lth's CIFAR ResNet-20: a 3x3 stem of 16 filters, three stages of three basic
blocks of 16, 32 and 64 filters. ``resnet18`` to ``resnet152`` are the CIFAR layout of the
quaternion ResNets of Mukhopadhyay, Adhilsha and Mishra (NLDL 2024): a 3x3 stride-1 stem of 64
channels and no max-pool, four stages of 64/128/256/512 planes, basic blocks (18, 34) or
bottlenecks of expansion 4 (50, 101, 152). Every stage but the first halves the image in its
first block (on the 3x3 convolution of a bottleneck); a 1x1 strided convolution with batch norm
projects the shortcut where the shape changes. Convolutions have no bias (batch norm follows each
one), the head is a global average pool and a classifier.

Every model reads RGB images as four channels, R, G, B and gray, in every algebra (one quaternion
channel; the real model's first convolution sees the same four), and computes in the algebra's
convolutions (:class:`qsparse.layers.QConv` for ``quat``, ``HyperConv`` for the others, ``nn.Conv``
for ``real``) with :class:`qsparse.batchnorm.HyperBatchNorm` of form ``bn_form`` (``split``, the
authors', by default). The classifier is hypercomplex (``output="hyper"``, as the authors'
quaternion ResNets) or real (``"real"``); ``"auto"`` picks ``hyper`` where the class count is a
multiple of the algebra's n and ``real`` otherwise.

Call with ``train=True`` to normalise with the batch's statistics and update the running ones
(``mutable=["batch_stats"]``), ``train=False`` to use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qsparse import algebras, batchnorm, initializers, models, ops, quaternion
from qsparse.models import _Body, _real_dense, algebra_names

OUTPUTS = ("auto", "hyper", "real")
BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}

_CIFAR = {"widths": (64, 128, 256, 512), "stem": 64}
LAYOUTS: dict[str, dict] = {
    "resnet20": {"block": "basic", "stage_sizes": (3, 3, 3), "widths": (16, 32, 64), "stem": 16},
    "resnet18": {"block": "basic", "stage_sizes": (2, 2, 2, 2), **_CIFAR},
    "resnet34": {"block": "basic", "stage_sizes": (3, 4, 6, 3), **_CIFAR},
    "resnet50": {"block": "bottleneck", "stage_sizes": (3, 4, 6, 3), **_CIFAR},
    "resnet101": {"block": "bottleneck", "stage_sizes": (3, 4, 23, 3), **_CIFAR},
    "resnet152": {"block": "bottleneck", "stage_sizes": (3, 8, 36, 3), **_CIFAR},
}


def output_kind(algebra: str, num_classes: int, output: str) -> str:
    """``hyper`` or ``real``: ``output`` resolved for ``algebra`` and ``num_classes``; refuses a
    hypercomplex classifier whose class count is not a multiple of n."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; valid: {list(OUTPUTS)}")
    n = algebras.get(algebra).n
    fits = num_classes % n == 0
    if output == "hyper" and not fits:
        raise ValueError(
            f"output 'hyper' needs a class count divisible by n={n} (algebra {algebra}), got "
            f"{num_classes}; valid here: ['real', 'auto']"
        )
    return ("hyper" if fits else "real") if output == "auto" else output


class _ResNetBody(_Body):
    """The convolution and batch norm every part of a ResNet builds, in the model's algebra."""

    bn_form: str = "split"
    bn_momentum: float = 0.9

    def settings(self) -> dict:
        """The fields a block shares with its model (algebra, init, convolution, batch norm)."""
        shared = dataclasses.fields(_ResNetBody)
        return {f.name: getattr(self, f.name) for f in shared if f.name not in ("parent", "name")}

    def conv_bn(self, x, features: int, kernel: int, stride: int, train: bool, name: str):
        """A bias-free ``kernel`` x ``kernel`` convolution (PyTorch's padding ``kernel // 2``),
        then batch norm."""
        options = {
            "strides": stride,
            "padding": kernel // 2,
            "use_bias": False,
            "conv_general_dilated": self.conv_op,
            "name": name,
        }
        if self.algebra == "real":
            conv = nn.Conv(
                features, (kernel, kernel), kernel_init=initializers.torch_kernel, **options
            )
        else:
            _, layer, algebra_options = self._layers()
            conv = layer(features, (kernel, kernel), **algebra_options, **options)
        bn = batchnorm.HyperBatchNorm(
            algebra=self.algebra, form=self.bn_form, momentum=self.bn_momentum, name=f"{name}_bn"
        )
        return bn(conv(x), use_running_average=not train)

    def conv_bn_ops(self, name: str, kernel: int, stride: int) -> list[ops.Op]:
        """:meth:`conv_bn` as :mod:`qsparse.ops`: the bias-free convolution, its batch norm."""
        seed = self.hash_seed if algebras.get(self.algebra).kind == "hashed" else 0
        conv = ops.Conv(
            name, self.algebra, seed, padding=kernel // 2, strides=(stride, stride), bias=False
        )
        return [conv, ops.BatchNorm(f"{name}_bn", self.bn_form, self.n)]


class Block(_ResNetBody):
    """A basic block (two 3x3 convolutions) or a bottleneck (1x1, 3x3 carrying the stride, 1x1
    to ``4 * width``), each convolution with batch norm, and the shortcut."""

    block: str = "basic"
    width: int = 64
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_width = EXPANSION[self.block] * self.width
        if self.block == "basic":
            y = nn.relu(self.conv_bn(x, self.width, 3, self.stride, train, "conv1"))
            y = self.conv_bn(y, out_width, 3, 1, train, "conv2")
        else:
            y = nn.relu(self.conv_bn(x, self.width, 1, 1, train, "conv1"))
            y = nn.relu(self.conv_bn(y, self.width, 3, self.stride, train, "conv2"))
            y = self.conv_bn(y, out_width, 1, 1, train, "conv3")
        if self.stride != 1 or x.shape[-1] != out_width:
            x = self.conv_bn(x, out_width, 1, self.stride, train, "shortcut")
        return nn.relu(x + y)

    def deploy_ops(self, prefix: str, in_width: int) -> list[ops.Op]:
        """:meth:`__call__` as :mod:`qsparse.ops` for ``in_width`` real input channels, its layers
        named under ``prefix``: the residual op, then ReLU."""
        out_width = EXPANSION[self.block] * self.width

        def conv(name, kernel, stride):
            return self.conv_bn_ops(f"{prefix}/{name}", kernel, stride)

        if self.block == "basic":
            body = [*conv("conv1", 3, self.stride), ops.RELU, *conv("conv2", 3, 1)]
        else:
            body = [*conv("conv1", 1, 1), ops.RELU, *conv("conv2", 3, self.stride), ops.RELU]
            body += conv("conv3", 1, 1)
        projects = self.stride != 1 or in_width != out_width
        shortcut = conv("shortcut", 1, self.stride) if projects else []
        return [ops.Residual(tuple(body), tuple(shortcut)), ops.RELU]


class ResNet(_ResNetBody):
    """A CIFAR ResNet (see the module docstring); :data:`LAYOUTS` holds the named ones."""

    block: str = "basic"
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: int = 64
    num_classes: int = 100
    output: str = "auto"

    def encode_image(self, x: jax.Array) -> jax.Array:
        """RGB as R, G, B and gray in every algebra, the real one included."""
        if self.algebra == "real":
            return quaternion.encode_rgb_gray(x, 1) if x.shape[-1] == 3 else x
        return super().encode_image(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        output = output_kind(self.algebra, self.num_classes, self.output)
        x = nn.relu(self.conv_bn(self.encode_image(x), self.stem, 3, 1, train, "stem"))
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                name = f"stage{stage + 1}_block{index + 1}"
                x = Block(
                    **self.settings(), block=self.block, width=width, stride=stride, name=name
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))  # global average pool: channels stay component-blocked
        if output == "real" or self.algebra == "real":
            return _real_dense(self.num_classes, x.shape[-1], name="output")(x)
        dense, _, options = self._layers()
        return dense(self.num_classes, name="output", **options)(x)

    def deploy_ops(self, input_shape: Sequence[int]) -> list[ops.Op]:
        """:meth:`__call__` as :mod:`qsparse.ops`, for images of ``input_shape`` (H, W, C); every
        batch norm its own op (the exporter folds those it can)."""
        channels = input_shape[-1]
        if self.algebra == "real":
            out = [ops.Encode("rgb_gray", 1)] if channels == 3 else []
        else:
            out = self._encode_ops(channels)
        out += [*self.conv_bn_ops("stem", 3, 1), ops.RELU]
        width = self.stem
        for stage, (blocks, block_width) in enumerate(
            zip(self.stage_sizes, self.widths, strict=True)
        ):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                settings = {**self.settings(), "block": self.block, "stride": stride}
                block = Block(**settings, width=block_width, parent=None)  # a description only
                out += block.deploy_ops(f"stage{stage + 1}_block{index + 1}", width)
                width = EXPANSION[self.block] * block_width
        output = output_kind(self.algebra, self.num_classes, self.output)
        kind = "real" if output == "real" else self.algebra
        seed = self.hash_seed if algebras.get(kind).kind == "hashed" else 0
        return [*out, ops.AVGPOOL, ops.Dense("output", kind, seed)]


def create(name: str, algebra: str = "real", num_classes: int = 100, **overrides) -> ResNet:
    """ResNet ``name`` (one of :data:`LAYOUTS`) in ``algebra``; ``overrides`` replace fields
    (``output``, ``bn_form``, widths, init, encoding). Refuses an unknown name, algebra, block,
    batch-norm form or output in one line."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(LAYOUTS)}")
    if algebra not in algebra_names():
        raise ValueError(f"unknown algebra {algebra!r}; valid: {algebra_names()}")
    kwargs = {**LAYOUTS[name], **overrides}
    if kwargs["block"] not in BLOCKS:
        raise ValueError(f"unknown block {kwargs['block']!r}; valid: {list(BLOCKS)}")
    n = algebras.get(algebra).n
    batchnorm.check(algebra, kwargs.get("bn_form", "split"), n)
    output_kind(algebra, num_classes, kwargs.get("output", "auto"))
    return ResNet(algebra=algebra, num_classes=num_classes, **kwargs)


_SGD = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "output_layer": "auto"}
RECIPES = {
    # open_lth's CIFAR-10 ResNet-20: 160 epochs of batch 128, x0.1 at epochs 80 and 120, global
    # pruning of 20 % without the output layer; rewound to the end of the first epoch
    "resnet20": (
        "cifar10",
        160,
        128,
        0.1,
        {**_SGD, "schedule": "step", "prune_output": False, "rewind": "1ep", "bn_form": "split"},
    ),
    # the authors' CIFAR-100 recipe: Nesterov SGD, 10 warm-up epochs then a cosine, 100 epochs of
    # batch 100, 30 % of each layer per round, reset to the initial weights
    **{
        name: (
            "cifar100",
            100,
            100,
            0.1,
            {
                **_SGD,
                "nesterov": True,
                "schedule": "warmup_cosine",
                "warmup_epochs": 10,
                "prune_fraction": 0.3,
                "pruning": "layerwise",
                "bn_form": "split",
            },
        )
        for name in LAYOUTS
        if name != "resnet20"
    },
}
models.REGISTRY.update(
    {
        name: models.Spec(ResNet, LAYOUTS[name], dataset, epochs, batch, lr, recipe)
        for name, (dataset, epochs, batch, lr, recipe) in RECIPES.items()
    }
)
