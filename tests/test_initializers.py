import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import initializers, models
from qsparse.layers import QConv, QDense

SHAPE = (4, 3, 3, 64, 96)  # a 3x3 conv kernel, 64 -> 96 quaternion channels


@pytest.mark.parametrize("name", sorted(initializers.QUATERNION_INITS))
def test_second_moment_matches_documented_sigma(name):
    w = initializers.get(name)(jax.random.key(0), SHAPE, jnp.float32)
    assert w.shape == SHAPE and w.dtype == jnp.float32
    sq_norm = float(jnp.mean(jnp.sum(w**2, axis=0)))
    want = initializers.expected_sq_norm(name, SHAPE)
    np.testing.assert_allclose(sq_norm, want, rtol=0.02)


def test_documented_sigmas():
    fan_in, fan_out = 9 * 64, 9 * 96
    assert initializers.fans(SHAPE) == (fan_in, fan_out)
    # The paper's conv kernels (hTorch given kernel_size=3): the receptive field counts 3, not 9.
    np.testing.assert_allclose(initializers.expected_sq_norm("htorch", SHAPE), 4 / (8 * 3 * 64))
    np.testing.assert_allclose(
        initializers.expected_sq_norm("htorch_consistent", SHAPE), 4 / (8 * fan_in)
    )
    np.testing.assert_allclose(initializers.expected_sq_norm("parcollet_he", SHAPE), 2 / fan_in)
    np.testing.assert_allclose(
        initializers.expected_sq_norm("parcollet_glorot", SHAPE), 2 / (fan_in + fan_out)
    )


@pytest.mark.parametrize(
    "shape, htorch_fan_in",
    [
        ((4, 64, 96), 64),  # dense: no receptive field, both counts agree
        ((4, 5, 64, 96), 5 * 64),  # 1-d: hTorch's prod(5) is the side and the area
        ((4, 3, 3, 64, 96), 3 * 64),  # the paper's 3x3 convs
        ((4, 3, 3, 3, 8, 8), 3 * 8),  # a cube kernel from an int kernel_size: its side
        ((4, 3, 5, 64, 96), 15 * 64),  # unequal sides come from a tuple: hTorch counts the area
    ],
)
def test_htorch_fan_in_is_what_htorch_computes_from_an_int_kernel_size(shape, htorch_fan_in):
    assert initializers.htorch_fan_in(shape) == htorch_fan_in
    np.testing.assert_allclose(
        initializers.sigma(shape, "htorch"), 1 / np.sqrt(8 * htorch_fan_in), rtol=1e-12
    )


def test_paper_conv_weights_are_sqrt3_larger_than_the_consistent_ones_draw_for_draw():
    key = jax.random.key(7)
    paper = initializers.get("htorch")(key, SHAPE)
    consistent = initializers.get("htorch_consistent")(key, SHAPE)
    np.testing.assert_allclose(paper, np.sqrt(3.0) * consistent, rtol=1e-5, atol=1e-9)
    dense = (4, 64, 96)
    np.testing.assert_array_equal(
        initializers.get("htorch")(key, dense), initializers.get("htorch_consistent")(key, dense)
    )


def test_polar_puts_half_the_energy_in_real_part_isotropic_a_quarter():
    polar = initializers.get("parcollet_he")(jax.random.key(1), SHAPE)
    iso = initializers.get("isotropic")(jax.random.key(1), SHAPE)
    for w, real_share in ((polar, 0.5), (iso, 0.25)):
        energy = jnp.mean(w**2, axis=(1, 2, 3, 4))
        np.testing.assert_allclose(energy[0] / energy.sum(), real_share, atol=0.01)


def test_same_key_same_weights_different_key_different():
    init = initializers.get("htorch")
    a, b = init(jax.random.key(3), SHAPE), init(jax.random.key(3), SHAPE)
    c = init(jax.random.key(4), SHAPE)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="unknown quaternion init 'xavier'"):
        initializers.get("xavier")
    with pytest.raises(ValueError, match="component kernel"):
        initializers.fans((3, 4, 4))
    with pytest.raises(ValueError, match="unknown criterion 'he'; valid: \\['htorch'"):
        initializers.htorch("he")


def _second_moments(init_name, depth=10, width=256):
    x = jax.random.normal(jax.random.key(0), (512, width))
    moments = [float(jnp.mean(x**2))]
    for layer in range(depth):
        module = QDense(width, kernel_init=initializers.get(init_name))
        params = module.init(jax.random.key(layer + 1), x)
        x = jax.nn.relu(module.apply(params, x))
        moments.append(float(jnp.mean(x**2)))
    return np.array(moments)


@pytest.mark.parametrize("name", ["parcollet_he", "isotropic"])
def test_he_inits_keep_activation_scale_through_deep_stack(name):
    m = _second_moments(name)
    assert np.all(m[1:] > 0.25) and np.all(m[1:] < 4.0), m


def test_htorch_quarters_second_moment_per_layer():
    # σ = 1/sqrt(8 fan_in) gives 4x less variance than He, so each QDense+ReLU divides E[x²]
    # by 4 where He keeps it: the paper's shallow models train anyway, deep stacks would not.
    m = _second_moments("htorch", depth=6)
    np.testing.assert_allclose(m[2:] / m[1:-1], 0.25, rtol=0.2)


def _conv_preactivation_stds(quat_init):
    x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
    model = models.create("conv4", "quat", 10, quat_init=quat_init)
    params = jax.jit(model.init)(jax.random.key(1), x)
    convs = _capture_convs(params, x)
    return np.array([float(jnp.std(convs[f"QConv_{i}"]["__call__"][0])) for i in range(4)])


@jax.jit
def _capture_convs(params, x):
    """The quaternion Conv-4's convolution outputs (the init does not change the forward pass,
    so one compiled apply serves both inits)."""
    model = models.create("conv4", "quat", 10)
    _, state = model.apply(params, x, capture_intermediates=lambda m, _: isinstance(m, QConv))
    return state["intermediates"]


def test_paper_init_keeps_conv4_preactivations_near_unit_scale_consistent_shrinks_them():
    # What the paper's quaternion Conv-4 got at initialisation (unit-variance input): each
    # convolution's pre-activation std stays near 1 under the paper's fan-in, and shrinks layer
    # by layer when the fan-in counts the whole 3x3 field.
    paper = _conv_preactivation_stds("htorch")
    consistent = _conv_preactivation_stds("htorch_consistent")
    assert np.all((paper > 0.8) & (paper < 1.5)), paper
    assert np.all(consistent[1:] < 0.7 * paper[1:]), (paper, consistent)
    assert np.all(np.diff(consistent) < 0), consistent
