"""The paper's models (LeNet-300-100, LeNet-12, Conv-2/4/6) in any algebra, by name.

Quaternion models follow the paper (its §4): the same number of *real* neurons in every
layer, every hidden layer quaternion, and a real output layer (10 classes are not divisible by
4). Every other algebra of :mod:`qsparse.algebras` with ``n`` in {1, 2, 4} (:func:`algebra_names`)
is built the same way from :class:`qsparse.layers.HyperDense`/``HyperConv``: the real widths
below, hidden layers in the algebra, a real output layer. An ``n``-dimensional model therefore
has about ``1/n`` of the weights (PHM adds ``n³`` per hypercomplex layer); the hashed model
(``hashed4``) has the quaternion model's count in tied real weights.

What each algebra sees: the real model the image; every other algebra the same input encoding
(RGB images: R, G, B and gray, which is one quaternion ``R + G i + B j + gray k`` or two complex
channels ``R + B i`` and ``G + gray i``; grayscale: ``0 + x i (+ x j + x k)``), in the
component-blocked layout; LeNets read the flat image as ``n`` blocks of pixels.

Initialisation follows the paper's code: PyTorch's default for real layers (including the
models' real output layer) and hTorch's polar init with zero biases for quaternion layers;
other algebras take :func:`qsparse.hyper.init`, the same variance rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qsparse import algebras, cpu, initializers, ops, quaternion
from qsparse.layers import HyperConv, HyperDense, QConv, QDense
from qsparse.ops import max_pool_2x2

PAPER_ALGEBRAS = ("real", "quat")  # the paper's two, the default pair of tables and benchmarks
DIMENSIONS = (1, 2, 4)  # the algebra dimensions the models' encodings and layouts support


def algebra_names() -> list[str]:
    """The registered algebras a model can be built in (``n`` in :data:`DIMENSIONS`), read at
    call time so that a user's registered algebra is one of them."""
    return [a for a in algebras.names() if algebras.get(a).n in DIMENSIONS]


def _real_dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=initializers.torch_kernel,
        bias_init=initializers.torch_bias(fan_in),
        name=name,
    )


class _Body(nn.Module):
    """Shared pieces: the layer for the algebra, the input encoding and the flatten.

    ``conv_op`` computes every convolution (``nn.Conv``'s ``conv_general_dilated`` hook, also used
    by ``QConv``): by default :func:`qsparse.cpu.conv_general_dilated`, XLA's own convolution except
    in programs lowered for the CPU; ``jax.lax.conv_general_dilated`` everywhere allows
    forward-mode autodiff. ``quat_init`` is the quaternion layers' initialiser, ``phm_init`` the
    PHM layers' starting rules and ``hash_seed`` the hashed layers' tying (every layer's).
    """

    algebra: str = "real"
    quat_init: str = "htorch"
    encoding: str = "auto"
    phm_init: str = "zhang"
    hash_seed: int = 0
    conv_op: Callable[..., jax.Array] = cpu.conv_general_dilated

    @property
    def n(self) -> int:
        return algebras.get(self.algebra).n

    def _layers(self) -> tuple[type, type, dict]:
        """The (dense, conv) layer types of the hidden layers and their algebra options."""
        if self.algebra == "quat":
            return QDense, QConv, {"kernel_init": initializers.get(self.quat_init)}
        options = {"algebra": self.algebra, "phm_init": self.phm_init, "hash_seed": self.hash_seed}
        return HyperDense, HyperConv, options

    def dense(self, x: jax.Array, features: int) -> jax.Array:
        if self.algebra == "real":
            return _real_dense(features, x.shape[-1])(x)
        dense, _, options = self._layers()
        return dense(features, **options)(x)

    def conv(self, x: jax.Array, features: int) -> jax.Array:
        if self.algebra == "real":
            fan_in = 9 * x.shape[-1]
            return nn.Conv(
                features,
                (3, 3),
                kernel_init=initializers.torch_kernel,
                bias_init=initializers.torch_bias(fan_in),
                conv_general_dilated=self.conv_op,
            )(x)
        _, conv, options = self._layers()
        return conv(features, (3, 3), conv_general_dilated=self.conv_op, **options)(x)

    def encoding_for(self, channels: int) -> str:
        """The input encoding of a hypercomplex model for images of ``channels`` channels."""
        return quaternion.default_encoding(channels) if self.encoding == "auto" else self.encoding

    def encode_image(self, x: jax.Array) -> jax.Array:
        """Real models see the image; the others see component-blocked channels."""
        if self.algebra == "real":
            return x
        return quaternion.get_encoding(self.encoding_for(x.shape[-1]))(x, self.n)

    def flatten_layout(self) -> str:
        """Hypercomplex features flatten component-blocked, real ones as a plain reshape."""
        return "flat" if self.algebra == "real" else "blocked"

    def flatten(self, x: jax.Array) -> jax.Array:
        return ops.flatten(x, self.flatten_layout(), self.n, xp=jnp)

    def output(self, x: jax.Array, num_classes: int) -> jax.Array:
        return _real_dense(num_classes, x.shape[-1], name="output")(x)

    # The deploy ops (qsparse.ops) of the layers above, named as linen names their modules.

    def _layer_op(self, op: type, index: int) -> ops.Dense | ops.Conv:
        if self.algebra == "real":
            module = {ops.Dense: nn.Dense, ops.Conv: nn.Conv}[op]
        else:
            dense, conv, _ = self._layers()
            module = {ops.Dense: dense, ops.Conv: conv}[op]
        seed = self.hash_seed if algebras.get(self.algebra).kind == "hashed" else 0
        return op(f"{module.__name__}_{index}", self.algebra, hash_seed=seed)

    def _encode_ops(self, channels: int) -> list[ops.Op]:
        if self.algebra == "real":
            return []
        return [ops.Encode(self.encoding_for(channels), self.n)]

    def _head_ops(self, hidden: int) -> list[ops.Op]:
        """``hidden`` dense layers with ReLU, then the real output layer."""
        out: list[ops.Op] = []
        for k in range(hidden):
            out += [self._layer_op(ops.Dense, k), ops.RELU]
        return [*out, ops.Dense("output", "real")]


class LeNet(_Body):
    """Fully connected LeNet: flatten, hidden ReLU layers of the given real widths, output."""

    features: Sequence[int] = (300, 100)
    num_classes: int = 10

    def _reads_flat_image(self) -> bool:
        return self.algebra != "real" and self.encoding in ("auto", "flat")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self._reads_flat_image():
            # The paper (§4) feeds "each set of four pixels" of the flattened image to a
            # quaternion neuron; its code reads the flat image as block-layout features, so
            # quaternion u is made of pixels (u, u + P/4, u + P/2, u + 3P/4) for P pixels (and
            # an n-dimensional unit of pixels u + c P/n).
            x = x.reshape(x.shape[0], -1)
            if x.shape[-1] % self.n:
                raise ValueError(
                    f"{self.algebra} LeNet with encoding 'flat' needs an input size divisible by "
                    f"{self.n}, got {x.shape[-1]}; choose an encoding from "
                    f"{sorted(quaternion.ENCODINGS)}"
                )
        else:
            x = self.flatten(self.encode_image(x))
        for width in self.features:
            x = nn.relu(self.dense(x, width))
        return self.output(x, self.num_classes)

    def deploy_ops(self, input_shape: Sequence[int]) -> list[ops.Op]:
        """:meth:`__call__` as :mod:`qsparse.ops`, for images of ``input_shape`` (H, W, C)."""
        if self._reads_flat_image():
            head: list[ops.Op] = [ops.Flatten("flat", self.n)]  # flat image read as block layout
        else:
            head = [*self._encode_ops(input_shape[-1]), ops.Flatten(self.flatten_layout(), self.n)]
        return head + self._head_ops(len(self.features))


class ConvNet(_Body):
    """Conv-2/4/6 of the lottery-ticket paper: 3×3 conv stages, each followed by 2×2 max-pool."""

    stages: Sequence[Sequence[int]] = ((64, 64),)
    dense_features: Sequence[int] = (256, 256)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        smallest = 2 ** len(self.stages)
        if x.ndim != 4 or min(x.shape[1:3]) < smallest:
            raise ValueError(
                f"a ConvNet with {len(self.stages)} pooling stages needs (batch, H, W, C) images "
                f"with H, W >= {smallest}; got shape {x.shape}"
            )
        x = self.encode_image(x)
        for stage in self.stages:
            for width in stage:
                x = nn.relu(self.conv(x, width))
            x = max_pool_2x2(x)
        x = self.flatten(x)
        for width in self.dense_features:
            x = nn.relu(self.dense(x, width))
        return self.output(x, self.num_classes)

    def deploy_ops(self, input_shape: Sequence[int]) -> list[ops.Op]:
        """:meth:`__call__` as :mod:`qsparse.ops`, for images of ``input_shape`` (H, W, C)."""
        out = self._encode_ops(input_shape[-1])
        k = 0
        for stage in self.stages:
            for _ in stage:
                out += [self._layer_op(ops.Conv, k), ops.RELU]
                k += 1
            out.append(ops.MAXPOOL2X2)
        out.append(ops.Flatten(self.flatten_layout(), self.n))
        return out + self._head_ops(len(self.dense_features))


@dataclasses.dataclass(frozen=True)
class Spec:
    """A named architecture, the dataset the paper trains it on, its Table 1 hyper-parameters."""

    module: type
    kwargs: dict
    dataset: str
    epochs: int
    batch_size: int
    lr: float
    recipe: dict = dataclasses.field(default_factory=dict)
    """Config fields the model's recipe sets beyond these (optimizer, schedule, pruning, ...);
    the rest take :data:`qsparse.config.MODEL_DEFAULTS`."""


REGISTRY: dict[str, Spec] = {
    "lenet300_100": Spec(LeNet, {"features": (300, 100)}, "mnist", 40, 60, 1.2e-3),
    "lenet12": Spec(LeNet, {"features": (12,)}, "mnist", 20, 60, 1.2e-3),
    "conv2": Spec(ConvNet, {"stages": ((64, 64),)}, "cifar10", 40, 60, 2e-4),
    "conv4": Spec(ConvNet, {"stages": ((64, 64), (128, 128))}, "cifar10", 40, 60, 3e-4),
    "conv6": Spec(ConvNet, {"stages": ((64, 64), (128, 128), (256, 256))}, "cifar10", 60, 60, 3e-4),
}
PAPER_MODELS = tuple(REGISTRY)  # the paper's five; the ResNets (qsparse.resnets) join REGISTRY


def spec(name: str) -> Spec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(REGISTRY)}") from None


def create(name: str, algebra: str = "real", num_classes: int = 10, **overrides) -> nn.Module:
    """Model ``name`` for ``algebra`` (one of :func:`algebra_names`); ``overrides`` replace
    architecture fields (widths, init, encoding, ``phm_init``, ``hash_seed``)."""
    s = spec(name)
    if algebra not in algebra_names():
        raise ValueError(f"unknown algebra {algebra!r}; valid: {algebra_names()}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if algebra == "quat" and "quat_init" in overrides:
        initializers.get(overrides["quat_init"])
    kwargs = {**s.kwargs, **overrides}
    widths = list(kwargs.get("features", ())) + [w for st in kwargs.get("stages", ()) for w in st]
    widths += list(kwargs.get("dense_features", ())) + list(kwargs.get("widths", ()))
    widths += [kwargs["stem"]] if "stem" in kwargs else []
    n = algebras.get(algebra).n
    bad = [w for w in widths if w % n]
    if bad:
        raise ValueError(
            f"{algebra} {name}: real widths must be multiples of {n}, got {bad} in {widths}"
        )
    return s.module(algebra=algebra, num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict:
    """Every variable collection of ``model`` (``params``, and ``batch_stats`` for a model with
    batch norm) for one example of ``input_shape`` (H, W, C); batch size does not matter."""
    return dict(model.init(key, jnp.zeros((1, *input_shape), jnp.float32)))


def init_params(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict:
    """Parameters for one example of ``input_shape`` (H, W, C); batch size does not matter."""
    return init_variables(model, key, input_shape)["params"]


def init_batch_stats(model: nn.Module, input_shape: Sequence[int]) -> dict | None:
    """A model's initial batch statistics, None for a model without batch norm. They are the
    layers' constants (zero means, unit variances), the same for every seed."""
    init = functools.partial(init_variables, model, jax.random.key(0), input_shape)
    if "batch_stats" not in jax.eval_shape(init):
        return None
    return jax.jit(lambda: init()["batch_stats"])()


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


from qsparse import resnets  # noqa: E402, F401  (registers the ResNets, which build on _Body)
