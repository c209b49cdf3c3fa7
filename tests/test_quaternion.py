import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import quaternion as Q

ONE, I, J, K = (jnp.eye(4)[n] for n in range(4))


def rand_q(seed, *shape):
    return jax.random.normal(jax.random.key(seed), (4, *shape))


def test_unit_products():
    mul = Q.hamilton_product
    np.testing.assert_array_equal(mul(I, J), K)
    np.testing.assert_array_equal(mul(J, I), -K)
    np.testing.assert_array_equal(mul(J, K), I)
    np.testing.assert_array_equal(mul(K, I), J)
    for u in (I, J, K):
        np.testing.assert_array_equal(mul(u, u), -ONE)
        np.testing.assert_array_equal(mul(ONE, u), u)
    np.testing.assert_array_equal(mul(mul(I, J), K), -ONE)  # ijk = -1


def test_associative_and_norm_multiplicative():
    p, q, r = rand_q(0, 100), rand_q(1, 100), rand_q(2, 100)
    mul = Q.hamilton_product
    np.testing.assert_allclose(mul(mul(p, q), r), mul(p, mul(q, r)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Q.norm(mul(p, q)), Q.norm(p) * Q.norm(q), rtol=1e-5)


def test_conjugate_gives_squared_norm_and_reverses_products():
    p, q = rand_q(3, 50), rand_q(4, 50)
    mul = Q.hamilton_product
    np.testing.assert_allclose(mul(p, Q.conjugate(p))[0], Q.norm(p) ** 2, rtol=1e-5)
    np.testing.assert_allclose(mul(p, Q.conjugate(p))[1:], 0, atol=1e-5)
    np.testing.assert_allclose(
        Q.conjugate(mul(p, q)), mul(Q.conjugate(q), Q.conjugate(p)), rtol=1e-5, atol=1e-5
    )


def test_left_matrix_is_documented_block_matrix():
    r, i, j, k = (jnp.full((1, 1), v) for v in (2.0, 3.0, 5.0, 7.0))
    w = jnp.stack([r, i, j, k])  # one quaternion weight, n_in = n_out = 1
    # x_row @ M: M[b, a] is the coefficient of input component b in output component a,
    # i.e. the transpose of the documented [[r,-i,-j,-k],[i,r,-k,j],[j,k,r,-i],[k,-j,i,r]].
    doc = np.array([[2, -3, -5, -7], [3, 2, -7, 5], [5, 7, 2, -3], [7, -5, 3, 2]], np.float32)
    np.testing.assert_array_equal(Q.left_matrix(w), doc.T)


def test_left_matrix_computes_hamilton_product_per_unit():
    w = rand_q(5, 3, 2)  # 3 inputs, 2 outputs
    x = rand_q(6, 3)
    x_blocked = Q.from_components(x)  # (12,) = [r1 r2 r3 | i1 i2 i3 | ...]
    got = Q.to_components(x_blocked @ Q.left_matrix(w))  # (4, 2)
    want = sum(Q.hamilton_product(w[:, i, :], x[:, i, None]) for i in range(3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_components_roundtrip_and_blocked_flatten():
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
    np.testing.assert_array_equal(Q.from_components(Q.to_components(x)), x)
    flat = Q.blocked_flatten(x)
    # block layout: first all r components (channels 0..1 of every pixel), then i, j, k
    np.testing.assert_array_equal(flat[:, :18], x[..., 0:2].reshape(2, -1))
    np.testing.assert_array_equal(flat[:, 54:], x[..., 6:8].reshape(2, -1))
    with pytest.raises(ValueError, match="multiple of 4"):
        Q.to_components(jnp.zeros((2, 6)))


def test_split_activation_equals_plain_for_elementwise_and_differs_for_softmax():
    x = jax.random.normal(jax.random.key(1), (5, 12))
    np.testing.assert_array_equal(Q.split_activation(jax.nn.relu, x), jax.nn.relu(x))
    per_comp = Q.split_activation(jax.nn.softmax, x)
    np.testing.assert_allclose(Q.to_components(per_comp).sum(-1), 1.0, rtol=1e-5)


def test_encodings():
    rgb = jax.random.uniform(jax.random.key(2), (2, 4, 4, 3))
    enc = Q.encode_rgb_gray(rgb)
    np.testing.assert_allclose(
        enc[..., 3], 0.2989 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2], rtol=1e-6
    )
    np.testing.assert_array_equal(enc[..., :3], rgb)
    pure = Q.encode_rgb_pure(rgb)
    np.testing.assert_array_equal(pure[..., 0], 0)
    np.testing.assert_array_equal(pure[..., 1:], rgb)
    gray = rgb[..., :1]
    np.testing.assert_array_equal(
        Q.encode_gray_pure(gray), jnp.concatenate([0 * gray, gray, gray, gray], -1)
    )
    with pytest.raises(ValueError, match="3 input channel"):
        Q.encode_rgb_gray(gray)
    with pytest.raises(ValueError, match="unknown input encoding 'bogus'"):
        Q.get_encoding("bogus")
    assert Q.default_encoding(3) == "rgb_gray" and Q.default_encoding(1) == "gray_pure"
