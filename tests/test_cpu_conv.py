"""qsparse.cpu.conv_general_dilated: lax's values everywhere, CPU kernels only in CPU programs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsparse import cpu, models
from qsparse.cpu import onednn

# (x shape, kernel shape, strides, padding, rhs dilation, groups): plain ones and ones left to lax
CASES = [
    ((2, 8, 8, 4), (3, 3, 4, 8), (1, 1), "SAME", (1, 1), 1),
    ((2, 7, 9, 3), (3, 2, 3, 5), (1, 1), "VALID", (1, 1), 1),
    ((1, 6, 6, 4), (3, 3, 4, 4), (1, 1), ((2, 0), (1, 2)), (1, 1), 1),
    ((2, 8, 8, 4), (3, 3, 4, 8), (2, 2), "SAME", (1, 1), 1),
    # strided, as ResNets downsample: 3x3 padding 1 on even and odd sizes, 1x1 shortcuts, others
    ((2, 8, 8, 4), (3, 3, 4, 8), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 7, 9, 4), (3, 3, 4, 8), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 8, 7, 4), (1, 1, 4, 8), (2, 2), "VALID", (1, 1), 1),
    ((1, 10, 9, 3), (3, 2, 3, 5), (3, 2), ((2, 0), (1, 1)), (1, 1), 1),
    ((2, 9, 9, 4), (3, 3, 4, 8), (1, 1), "SAME", (2, 2), 1),
    ((2, 8, 8, 4), (3, 3, 2, 8), (1, 1), "SAME", (1, 1), 2),
    ((2, 8, 8, 4), (3, 3, 4, 8), (1, 1), ((3, 3), (1, 1)), (1, 1), 1),  # padding >= kernel: lax
]


def conv(op, x, w, strides, padding, dilation, groups):
    return op(
        x,
        w,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("kernels", ["onednn", "xla"])
@pytest.mark.parametrize("x_shape, w_shape, strides, padding, dilation, groups", CASES)
def test_values_and_gradients_equal_lax(
    x_shape, w_shape, strides, padding, dilation, groups, kernels
):
    """On oneDNN (where built) and on XLA's canonical stride-1 convolutions alike."""
    if kernels == "onednn" and not onednn.available():
        kernels = "xla"  # the other case covers it; both run where CI builds oneDNN
    with onednn.using(kernels):
        _values_and_gradients_equal_lax(x_shape, w_shape, strides, padding, dilation, groups)


def _values_and_gradients_equal_lax(x_shape, w_shape, strides, padding, dilation, groups):
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    outs = {}
    for name, op in (("cpu", cpu.conv_general_dilated), ("lax", jax.lax.conv_general_dilated)):
        f = jax.jit(lambda x, w, op=op: conv(op, x, w, strides, padding, dilation, groups))
        y = f(x, w)
        ct = jnp.asarray(np.random.default_rng(0).standard_normal(y.shape), jnp.float32)
        grads = jax.jit(
            lambda x, w, ct, op=op: jax.vjp(
                lambda x, w: conv(op, x, w, strides, padding, dilation, groups), x, w
            )[1](ct)
        )(x, w, ct)
        outs[name] = (y, *grads)
    for a, b in zip(outs["cpu"], outs["lax"]):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def _grad_of_loss(model):
    def grad(params, x, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, x), y
            ).mean()

        return jax.grad(loss)(params)

    return grad


def _convolutions(text: str) -> list[str]:
    """The convolution ops of a StableHLO module, with their attributes and types, sorted."""
    return sorted(
        re.sub(r"%[\w#]+|loc\(#loc\d+\)", "", line.strip())
        for line in text.splitlines()
        if "stablehlo.convolution" in line
    )


@pytest.mark.parametrize("algebra", ["real", "quat"])
def test_gpu_and_tpu_programs_hold_xla_convolutions_and_gradients(algebra):
    """Exported for cuda and tpu, a model's gradient holds exactly the convolutions of the same
    model built on plain ``lax.conv_general_dilated`` (XLA's own autodiff), and no custom call."""
    x = jnp.ones((2, 8, 8, 4))
    y = jnp.zeros((2,), jnp.int32)
    texts = {}
    for name, op in (("cpu", cpu.conv_general_dilated), ("lax", jax.lax.conv_general_dilated)):
        model = models.create(
            "conv2", algebra, num_classes=3, stages=((8, 8),), dense_features=(16,), conv_op=op
        )
        params = models.init_params(model, jax.random.key(0), (8, 8, 4))
        grad = jax.jit(_grad_of_loss(model))
        for platform in ("cuda", "tpu"):
            texts[name, platform] = jax.export.export(grad, platforms=[platform])(
                params, x, y
            ).mlir_module()
        texts[name, "cpu"] = grad.lower(params, x, y).as_text()
    for platform in ("cuda", "tpu"):
        ours, plain = texts["cpu", platform], texts["lax", platform]
        assert "custom_call" not in ours
        assert (
            _convolutions(ours) == _convolutions(plain) and len(_convolutions(plain)) == 5
        )  # 2 forward, 2 kernel grads, 1 input grad
    # the CPU program runs the CPU kernels: oneDNN calls, or canonical convolutions only
    if onednn.cpu_conv() == "onednn":
        assert (
            "qsparse_onednn_conv" in texts["cpu", "cpu"]
            and "stablehlo.convolution" not in texts["cpu", "cpu"]
        )
    else:
        assert _convolutions(texts["cpu", "cpu"]) != _convolutions(texts["lax", "cpu"])


def test_forward_mode_through_a_model_built_on_lax():
    """jvp works (the CPU convolution is reverse-mode only) and agrees with vjp:
    <u, J t> = <J^T u, t>."""
    model = models.create(
        "conv2",
        "real",
        num_classes=3,
        stages=((8,),),
        dense_features=(8,),
        conv_op=jax.lax.conv_general_dilated,
    )
    params = models.init_params(model, jax.random.key(0), (8, 8, 3))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    f = lambda p: model.apply({"params": p}, x)  # noqa: E731
    leaves, treedef = jax.tree.flatten(params)
    tangent = jax.tree.unflatten(
        treedef, [jax.random.normal(jax.random.key(i), a.shape) for i, a in enumerate(leaves)]
    )
    _, jt = jax.jvp(f, (params,), (tangent,))
    u = jax.random.normal(jax.random.key(99), jt.shape)
    (jtu,) = jax.vjp(f, params)[1](u)
    lhs = float(jnp.vdot(u, jt))
    rhs = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(jtu), jax.tree.leaves(tangent)))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_a_resnets_strided_and_1x1_convolutions_take_the_cpu_path():
    """A ResNet downsamples with 3x3 stride-2 and 1x1 stride-2 convolutions: in its CPU gradient
    program every convolution is a CPU kernel (oneDNN calls, or canonical stride-1 convolutions
    only), none the strided ones whose XLA gradients are naive loops."""
    model = models.create(
        "resnet20", "real", num_classes=3, stage_sizes=(1, 1), widths=(4, 8), stem=4
    )
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))

    def loss(p, x, y):
        logits, _ = model.apply(
            {"params": p, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    x, y = jnp.ones((2, 8, 8, 3)), jnp.zeros((2,), jnp.int32)
    text = jax.jit(jax.grad(loss)).lower(variables["params"], x, y).as_text()
    convolutions = _convolutions(text)
    if onednn.cpu_conv() == "onednn":
        assert text.count("qsparse_onednn_conv") >= 3 * 6 - 1 and convolutions == []
    else:
        assert convolutions and not any("stride = array<i64: 2, 2>" in c for c in convolutions)
