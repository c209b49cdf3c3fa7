import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qsparse import quaternion as Q
from qsparse.layers import QConv, QDense


def ham(p, q):
    """Hamilton product written out independently of qsparse (components on axis 0)."""
    a1, b1, c1, d1 = p
    a2, b2, c2, d2 = q
    return jnp.stack(
        [
            a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2,
            a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2,
            a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2,
            a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2,
        ]
    )


def naive_qdense(w, b, x):
    """y_o = sum_i w_io ⊗ x_i + b, looping over quaternion units."""
    n_in, n_out = w.shape[1:]
    xq = x.reshape(x.shape[0], 4, n_in)  # block layout
    outs = []
    for o in range(n_out):
        acc = jnp.zeros((4, x.shape[0]))
        for i in range(n_in):
            acc = acc + ham(w[:, i, o][:, None], xq[:, :, i].T)
        outs.append(acc)
    y = jnp.stack(outs, axis=-1)  # (4, batch, n_out)
    return jnp.moveaxis(y, 0, 1).reshape(x.shape[0], 4 * n_out) + b


def explicit_block_kernel(w):
    """Assemble [[r,-i,-j,-k],[i,r,-k,j],[j,k,r,-i],[k,-j,i,r]] (rows = output) by hand."""
    r, i, j, k = w
    rows = [[r, -i, -j, -k], [i, r, -k, j], [j, k, r, -i], [k, -j, i, r]]
    # real kernel is (..., in, out): block (input comp b, output comp a) = rows[a][b]
    return jnp.concatenate(
        [jnp.concatenate([rows[a][b] for a in range(4)], axis=-1) for b in range(4)], axis=-2
    )


def test_qdense_matches_naive_hamilton_reference():
    layer = QDense(12)
    x = jax.random.normal(jax.random.key(0), (5, 8))
    params = layer.init(jax.random.key(1), x)["params"]
    params["bias"] = jax.random.normal(jax.random.key(2), (12,))
    got = layer.apply({"params": params}, x)
    np.testing.assert_allclose(
        got, naive_qdense(params["qkernel"], params["bias"], x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("strides,padding", [(1, "SAME"), (2, "VALID"), ((1, 2), ((1, 2), (0, 1)))])
def test_qconv_equals_real_conv_with_expanded_kernel(strides, padding):
    layer = QConv(16, (3, 3), strides=strides, padding=padding)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8))
    params = layer.init(jax.random.key(1), x)["params"]
    real = nn.Conv(16, (3, 3), strides=strides, padding=padding)
    real_params = {"kernel": explicit_block_kernel(params["qkernel"]), "bias": params["bias"]}
    np.testing.assert_allclose(
        layer.apply({"params": params}, x),
        real.apply({"params": real_params}, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_grouped_qconv_equals_separate_convs_per_group():
    groups = 2
    layer = QConv(16, (3, 3), feature_group_count=groups)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16))  # 4 quaternion channels in
    params = layer.init(jax.random.key(1), x)["params"]
    y = Q.to_components(layer.apply({"params": params}, x))  # (4, ..., 4 out quaternions)
    xq = Q.to_components(x)
    single = QConv(8, (3, 3))
    for g in range(groups):
        xg = Q.from_components(xq[..., 2 * g : 2 * g + 2])
        pg = {
            "qkernel": params["qkernel"][..., 2 * g : 2 * g + 2],
            "bias": params["bias"].reshape(4, 4)[:, 2 * g : 2 * g + 2].ravel(),
        }
        yg = Q.to_components(single.apply({"params": pg}, xg))
        np.testing.assert_allclose(y[..., 2 * g : 2 * g + 2], yg, rtol=1e-5, atol=1e-5)


def test_gradients_numerically():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4), jnp.float64)
        conv = QConv(8, (3, 3), param_dtype=jnp.float64)
        pc = conv.init(jax.random.key(1), x)["params"]
        fc = jax.jit(lambda p, x: conv.apply({"params": p}, x))  # compiled once, called often
        check_grads(fc, (pc, x), order=1, modes=["rev"])
        xd = x.reshape(2, -1)
        dense = QDense(8, param_dtype=jnp.float64)
        pd = dense.init(jax.random.key(2), xd)["params"]
        check_grads(
            jax.jit(lambda p, x: dense.apply({"params": p}, x)), (pd, xd), order=1, modes=["rev"]
        )


def test_quarter_of_the_weights_of_real_layer_of_same_width():
    x = jnp.zeros((1, 64))
    qk = QDense(128).init(jax.random.key(0), x)["params"]["qkernel"]
    rk = nn.Dense(128).init(jax.random.key(0), x)["params"]["kernel"]
    assert 4 * qk.size == rk.size
    xi = jnp.zeros((1, 8, 8, 32))
    qc = QConv(64, (3, 3)).init(jax.random.key(0), xi)["params"]["qkernel"]
    rc = nn.Conv(64, (3, 3)).init(jax.random.key(0), xi)["params"]["kernel"]
    assert 4 * qc.size == rc.size


def test_zeroing_one_quaternion_removes_it_from_all_four_outputs():
    layer = QDense(8, use_bias=False)
    x = (
        jnp.zeros((1, 8)).at[0, jnp.array([1, 3, 5, 7])].set(1.0)
    )  # only input quaternion 1 is nonzero
    params = layer.init(jax.random.key(0), x)["params"]
    y = Q.to_components(layer.apply({"params": params}, x))
    pruned = {"qkernel": params["qkernel"].at[:, 1, 0].set(0.0)}
    yp = Q.to_components(layer.apply({"params": pruned}, x))
    assert np.all(np.abs(y[:, 0, 0]) > 0)
    np.testing.assert_array_equal(yp[:, 0, 0], 0.0)  # all four components of output 0
    np.testing.assert_array_equal(yp[:, 0, 1], y[:, 0, 1])  # output 1 untouched


def test_bad_sizes_raise_at_init():
    with pytest.raises(ValueError, match="input feature size must be a multiple of 4.*got 10"):
        QDense(8).init(jax.random.key(0), jnp.zeros((1, 10)))
    with pytest.raises(ValueError, match="features must be a multiple of 4.*got 6"):
        QDense(6).init(jax.random.key(0), jnp.zeros((1, 8)))
    with pytest.raises(ValueError, match="input channel count must be a multiple of 4.*got 3"):
        QConv(8, (3, 3)).init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="feature_group_count=3"):
        QConv(8, (3, 3), feature_group_count=3).init(jax.random.key(0), jnp.zeros((1, 5, 5, 8)))


def test_dtype_and_no_bias():
    x = jnp.ones((2, 8), jnp.float32)
    layer = QDense(8, use_bias=False, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), x)["params"]
    assert set(params) == {"qkernel"} and params["qkernel"].dtype == jnp.float32
    assert layer.apply({"params": params}, x).dtype == jnp.bfloat16


def test_inside_someone_elses_flax_model():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):  # x: (batch, 32, 32, 3) RGB
            x = Q.encode_rgb_gray(x)  # -> 4 channels = 1 quaternion channel
            x = nn.relu(QConv(16, (3, 3))(x))
            x = Q.blocked_flatten(nn.max_pool(x, (2, 2), (2, 2)))
            return nn.Dense(10)(nn.relu(QDense(32)(x)))

    x = jnp.ones((2, 32, 32, 3))
    params = Net().init(jax.random.key(0), x)
    assert Net().apply(params, x).shape == (2, 10)
