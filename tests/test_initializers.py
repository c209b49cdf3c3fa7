import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import initializers
from qsparse.layers import QDense

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
    np.testing.assert_allclose(initializers.expected_sq_norm("htorch", SHAPE), 4 / (8 * fan_in))
    np.testing.assert_allclose(initializers.expected_sq_norm("parcollet_he", SHAPE), 2 / fan_in)
    np.testing.assert_allclose(
        initializers.expected_sq_norm("parcollet_glorot", SHAPE), 2 / (fan_in + fan_out)
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
