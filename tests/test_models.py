import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import models, ops

# Exact parameter counts (weights + biases) of the paper's models; rounded, they are the counts
# in the paper's Table 1.
PAPER_COUNTS = {
    ("lenet300_100", 10): (266_610, 67_710),
    ("lenet12", 10): (9_550, 2_494),
    ("conv2", 10): (4_301_642, 1_077_962),
    ("conv4", 10): (2_425_930, 609_226),
    ("conv6", 10): (2_262_602, 568_778),
    ("conv4", 100): (2_449_060, 632_356),
    ("conv6", 100): (2_285_732, 591_908),
}


def shapes(name, algebra, num_classes=10, input_shape=None):
    model = models.create(name, algebra, num_classes)
    if input_shape is None:
        input_shape = (28, 28, 1) if models.spec(name).dataset == "mnist" else (32, 32, 3)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


@pytest.mark.parametrize("name,classes", sorted(PAPER_COUNTS))
def test_parameter_counts_match_paper(name, classes):
    real, quat = PAPER_COUNTS[name, classes]
    assert models.count_params(shapes(name, "real", classes)) == real
    assert models.count_params(shapes(name, "quat", classes)) == quat


@pytest.mark.parametrize("name", models.PAPER_MODELS)
def test_quaternion_hidden_layers_have_a_quarter_of_the_weights(name):
    real = [
        x.size
        for p, x in jax.tree_util.tree_leaves_with_path(shapes(name, "real"))
        if "kernel" in str(p[-1])
    ]
    quat = [
        x.size
        for p, x in jax.tree_util.tree_leaves_with_path(shapes(name, "quat"))
        if "kernel" in str(p[-1])
    ]
    assert len(real) == len(quat)
    # every layer but the first (the input encoding adds a channel) and the real output layer
    for r, q in zip(real[1:-1], quat[1:-1]):
        assert 4 * q == r
    assert real[-1] == quat[-1]


@pytest.mark.parametrize("name", models.PAPER_MODELS)
@pytest.mark.parametrize("algebra", models.PAPER_ALGEBRAS)
@pytest.mark.parametrize("input_shape", [(28, 28, 1), (32, 32, 3)])
def test_any_input_shape_and_classes(name, algebra, input_shape):
    model = models.create(name, algebra, num_classes=7)
    x = jnp.ones((2, *input_shape))
    out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x), x), x)
    assert out.shape == (2, 7)


def test_forward_pass_is_finite_and_depends_on_input():
    model = models.create("conv2", "quat")
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    y = jax.jit(lambda x: model.apply(model.init(jax.random.key(0), x), x))(x)
    assert np.all(np.isfinite(y)) and not np.allclose(y[0], y[1])


def test_output_layer_is_real_and_named_output():
    params = shapes("conv4", "quat")
    assert set(params["output"]) == {"kernel", "bias"}
    assert params["output"]["kernel"].shape == (256, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'conv5'.*conv4"):
        models.create("conv5")
    with pytest.raises(ValueError, match="unknown algebra 'octonion'.*'real', 'complex', 'quat'"):
        models.create("conv4", "octonion")
    with pytest.raises(ValueError, match=r"complex lenet12: real widths must be multiples of 2"):
        models.create("lenet12", "complex", features=(13,))
    with pytest.raises(ValueError, match=r"multiples of 4, got \[30\]"):
        models.create("lenet300_100", "quat", features=(300, 30))
    with pytest.raises(ValueError, match="H, W >= 8"):
        shapes("conv6", "real", input_shape=(4, 4, 3))
    with pytest.raises(ValueError, match="unknown quaternion init"):
        models.create("conv2", "quat", quat_init="nope")


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 7, 9, 4), (1, 2, 2, 1)])
def test_max_pool_2x2_equals_flax_max_pool_values_and_gradients(shape):
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(sum(shape)), shape)  # continuous: no ties
    np.testing.assert_array_equal(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
    ct = jax.random.normal(jax.random.key(1), models.max_pool_2x2(x).shape)
    g = jax.vjp(models.max_pool_2x2, x)[1](ct)[0]
    g_ref = jax.vjp(lambda x: nn.max_pool(x, (2, 2), (2, 2)), x)[1](ct)[0]
    np.testing.assert_array_equal(g, g_ref)
    assert np.count_nonzero(np.asarray(g)) == ct.size  # one maximum per window takes the gradient


@pytest.mark.parametrize("name", models.PAPER_MODELS)
@pytest.mark.parametrize("algebra", models.PAPER_ALGEBRAS)
def test_deploy_ops_name_the_models_layers_in_order(name, algebra):
    input_shape = (28, 28, 1) if models.spec(name).dataset == "mnist" else (32, 32, 3)
    steps = models.create(name, algebra).deploy_ops(input_shape)
    params = shapes(name, algebra)
    layers = [op for op in steps if isinstance(op, ops.Dense | ops.Conv)]
    assert [op.name for op in layers] == list(params)  # the order linen created them in
    for op in layers:
        assert op.kind == ("real" if op.name == "output" else algebra)
        kernel = params[op.name]["qkernel" if op.kind == "quat" else "kernel"]
        assert kernel.ndim == (4 if isinstance(op, ops.Conv) else 2) + (op.kind == "quat")
    hidden = [i for i, op in enumerate(steps) if op in layers[:-1]]
    assert all(steps[i + 1] == ops.RELU for i in hidden) and steps[-1] == layers[-1]
    stages = models.spec(name).kwargs.get("stages", ())
    assert steps.count(ops.MAXPOOL2X2) == len(stages)
    assert sum(isinstance(op, ops.Flatten) for op in steps) == 1


def test_deploy_ops_follow_the_input_encoding():
    lenet = models.create("lenet12", "quat")
    assert lenet.deploy_ops((28, 28, 1))[0] == ops.Flatten("flat")  # the flat image, as blocks
    gray = models.create("lenet12", "quat", encoding="gray_pure").deploy_ops((28, 28, 1))
    assert gray[:2] == [ops.Encode("gray_pure"), ops.Flatten("blocked")]
    conv = models.create("conv2", "quat").deploy_ops((32, 32, 3))
    assert conv[0] == ops.Encode("rgb_gray") and ops.Flatten("blocked") in conv
    assert models.create("conv2", "real").deploy_ops((32, 32, 3))[0] == ops.Conv("Conv_0", "real")
