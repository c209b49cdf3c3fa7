"""The quaternion algebra's structure constants (qsparse.algebras) against the Hamilton product
written another way, its identities, and the block matrices the layers and the runtime use."""

import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import quaternion, results
from qsparse.algebras import COMPONENTS, QUATERNION, Algebra, structure_constants

mul = QUATERNION.product


def rand_q(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, *shape)).astype(np.float32)


def scalar_vector_product(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(a, u)(b, v) = (ab - u.v, a v + b u + u x v), in float64."""
    p, q = p.astype(np.float64), q.astype(np.float64)
    a, u, b, v = p[0], p[1:], q[0], q[1:]
    real = a * b - np.sum(u * v, axis=0)
    vector = a * v + b * u + np.cross(u, v, axis=0)
    return np.concatenate([real[None], vector])


def test_table_is_the_hamilton_product():
    assert QUATERNION.n == 4 and QUATERNION.table.shape == (4, 4, 4)
    p, q = rand_q(0, 200), rand_q(1, 200)
    np.testing.assert_allclose(mul(p, q), scalar_vector_product(p, q), rtol=1e-5, atol=1e-5)


def test_unit_products():
    """ij = k, jk = i, ki = j and their reverses negated; i^2 = j^2 = k^2 = ijk = -1."""
    unit = dict(zip("1ijk", np.eye(4, dtype=np.float32)))
    products = {"ij": "k", "jk": "i", "ki": "j", "ii": "-1", "jj": "-1", "kk": "-1"}
    products |= {
        ab[::-1]: ("-" + c).replace("--", "") for ab, c in products.items() if ab[0] != ab[1]
    }
    products |= {"1" + u: u for u in "1ijk"} | {u + "1": u for u in "ijk"}
    for ab, c in products.items():
        want = -unit[c[1]] if c.startswith("-") else unit[c]
        np.testing.assert_array_equal(mul(unit[ab[0]], unit[ab[1]]), want, err_msg=ab)
    np.testing.assert_array_equal(mul(mul(unit["i"], unit["j"]), unit["k"]), -unit["1"])


def test_associative_not_commutative():
    p, q, r = rand_q(2, 100), rand_q(3, 100), rand_q(4, 100)
    np.testing.assert_allclose(mul(mul(p, q), r), mul(p, mul(q, r)), rtol=1e-4, atol=1e-4)
    assert np.abs(mul(p, q) - mul(q, p)).max() > 0.1


def test_left_matrix_computes_the_product_per_unit():
    w, x = rand_q(5, 3, 2), rand_q(6, 3)  # 3 inputs, 2 outputs
    blocked = x.reshape(-1)  # [r1 r2 r3 | i1 i2 i3 | ...]
    got = (blocked @ QUATERNION.left_matrix(w)).reshape(4, 2)
    want = sum(scalar_vector_product(w[:, i, :], x[:, i, None]) for i in range(3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_left_blocks_sign_one_component_each():
    seen = set()
    for b, a, c, sign in QUATERNION.left_terms:
        assert sign in (1, -1) and QUATERNION.table[c, b, a] == sign
        seen.add((b, a))
    assert seen == {(b, a) for b in range(4) for a in range(4)}
    mixed = np.zeros((2, 2, 2), np.float32)
    mixed[0, 0, 0] = mixed[0, 1, 1] = mixed[1, 0, 1] = 1
    mixed[1, 1] = (1, 1)  # e1 e1 = 1 + e1: block (1, 1) holds w0 + w1
    with pytest.raises(ValueError, match="not one signed component"):
        Algebra("mixed", ("a", "b"), mixed).left_matrix(np.ones((2, 1, 1), np.float32))


@pytest.mark.parametrize("shape,groups", [((4, 5, 3), 1), ((4, 3, 3, 2, 6), 1), ((4, 3, 2, 6), 2)])
def test_numpy_and_jax_share_the_tables(shape, groups):
    w = rand_q(7, *shape[1:])
    np.testing.assert_array_equal(
        QUATERNION.left_matrix(w, groups), quaternion.left_matrix(jnp.asarray(w), groups)
    )
    np.testing.assert_array_equal(quaternion.HAMILTON, QUATERNION.table.transpose(0, 2, 1))
    assert quaternion.COMPONENTS == results.COMPONENTS == COMPONENTS == ("r", "i", "j", "k")


def test_cayley_tables_name_their_units():
    np.testing.assert_array_equal(
        structure_constants(("1", "e"), (("1", "e"), ("e", "0"))),  # dual numbers: e^2 = 0
        [[[1, 0], [0, 1]], [[0, 1], [0, 0]]],
    )
    with pytest.raises(ValueError, match=r"'-x' names no unit; valid: \['1', 'e'\]"):
        structure_constants(("1", "e"), (("1", "e"), ("e", "-x")))
    with pytest.raises(ValueError, match="2 rows of 2 entries"):
        structure_constants(("1", "e"), (("1", "e"),))
