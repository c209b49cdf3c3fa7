"""The quaternion algebra's structure constants (qsparse.algebras) against the Hamilton product
written another way, its identities, and the block matrices the layers and the runtime use."""

import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import algebras, quaternion, results
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


# Each built-in algebra's product spelled out from its multiplication rules, components on axis 0.
def real_ref(p, q):
    return p * q


def complex_ref(p, q):
    """(a + bi)(c + di) = (ac - bd) + (ad + bc)i."""
    return np.stack([p[0] * q[0] - p[1] * q[1], p[0] * q[1] + p[1] * q[0]])


def quat_ref(p, q):
    return scalar_vector_product(p, q)


def tessarine_ref(p, q):
    """Bicomplex numbers z + w j (z, w complex in i, j^2 = +1, k = ij): (z1 + w1 j)(z2 + w2 j)
    = (z1 z2 + w1 w2) + (z1 w2 + w1 z2) j; t = (r + i i) + (j + k i) j."""
    p, q = p.astype(np.float64), q.astype(np.float64)
    z1, w1, z2, w2 = p[0] + 1j * p[1], p[2] + 1j * p[3], q[0] + 1j * q[1], q[2] + 1j * q[3]
    z, w = z1 * z2 + w1 * w2, z1 * w2 + w1 * z2
    return np.stack([z.real, z.imag, w.real, w.imag])


def klein4_ref(p, q):
    """Group algebra of Z2 x Z2 with basis (1, a, b, c) = (00, 01, 10, 11): the product of two
    elements is the XOR of their bits, so (p q)_g = sum_h p_h q_(h xor g)."""
    return np.stack([sum(p[h] * q[h ^ g] for h in range(4)) for g in range(4)])


REFERENCES = {
    "real": real_ref,
    "complex": complex_ref,
    "quat": quat_ref,
    "tessarine": tessarine_ref,
    "klein4": klein4_ref,
}
# (associative, commutative), as the algebras are known to be.
LAWS = {
    "real": (True, True),
    "complex": (True, True),
    "quat": (True, False),
    "tessarine": (True, True),
    "klein4": (True, True),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_builtin_products_follow_their_rules(name):
    algebra = algebras.get(name)
    assert algebra.kind == "table" and algebra.signed_blocks
    n = algebra.n
    p = np.random.default_rng(10).standard_normal((n, 50)).astype(np.float32)
    q = np.random.default_rng(11).standard_normal((n, 50)).astype(np.float32)
    np.testing.assert_allclose(algebra.product(p, q), REFERENCES[name](p, q), rtol=1e-5, atol=1e-5)


def random_elements(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 20)) for _ in range(3)]


@pytest.mark.parametrize("name", sorted(LAWS))
def test_associativity_and_commutativity_as_known(name):
    ref = REFERENCES[name]
    p, q, r = random_elements(algebras.get(name).n, 12)
    associative = np.allclose(ref(ref(p, q), r), ref(p, ref(q, r)))
    commutative = np.allclose(ref(p, q), ref(q, p))
    assert (associative, commutative) == LAWS[name]
    algebra = algebras.get(name)
    assert (algebra.is_associative, algebra.is_commutative) == LAWS[name]


def test_a_random_table_is_neither_associative_nor_commutative():
    table = np.random.default_rng(13).standard_normal((3, 3, 3)).astype(np.float32)
    algebra = Algebra("random3", ("r", "u", "v"), table)
    p, q, r = random_elements(3, 14)
    mul3 = algebra.product
    assert not np.allclose(mul3(mul3(p, q), r), mul3(p, mul3(q, r)))
    assert not np.allclose(mul3(p, q), mul3(q, p))
    assert (algebra.is_associative, algebra.is_commutative) == (False, False)
    assert not algebra.signed_blocks


def test_registry_names_and_kinds():
    assert algebras.names()[:8] == [
        "real",
        "complex",
        "quat",
        "tessarine",
        "klein4",
        "phm2",
        "phm4",
        "hashed4",
    ]
    assert algebras.get("quat") is QUATERNION
    dims = {name: algebras.get(name).n for name in algebras.names()}
    assert dims == dims | {"real": 1, "complex": 2, "phm2": 2, "phm4": 4, "hashed4": 4}
    kinds = {name: algebras.get(name).kind for name in ("quat", "phm2", "phm4", "hashed4")}
    assert kinds == {"quat": "table", "phm2": "phm", "phm4": "phm", "hashed4": "hashed"}
    for name in ("phm2", "phm4", "hashed4"):
        algebra = algebras.get(name)
        assert algebra.table is None and algebra.is_associative is None
    with pytest.raises(ValueError, match=r"unknown algebra 'octonion'; valid: \['real', "):
        algebras.get("octonion")


def test_register_a_users_table(monkeypatch):
    monkeypatch.setattr(algebras, "_REGISTRY", dict(algebras._REGISTRY))
    dual = Algebra("dual", ("r", "e"), structure_constants(("1", "e"), (("1", "e"), ("e", "0"))))
    assert algebras.register(dual) is dual and algebras.get("dual") is dual
    assert algebras.names()[-1] == "dual"
    p, q = random_elements(2, 15)[:2]  # (a + b e)(c + d e) = ac + (ad + bc) e
    np.testing.assert_allclose(dual.product(p, q), [p[0] * q[0], p[0] * q[1] + p[1] * q[0]])
    assert (dual.is_associative, dual.is_commutative, dual.signed_blocks) == (True, True, False)
    with pytest.raises(ValueError, match=r"'dual' is already registered; taken: \['real'"):
        algebras.register(dual)
    bad = np.full((2, 2, 2), np.nan, np.float32)
    with pytest.raises(ValueError, match="'nan2': table has non-finite entries"):
        algebras.register(Algebra("nan2", ("r", "e"), bad))
    dead = np.zeros((2, 2, 2), np.float32)
    dead[0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"no product reaches component\(s\) \[1\]; every one"):
        algebras.register(Algebra("dead2", ("r", "e"), dead))
    with pytest.raises(ValueError, match=r"kind 'lut'; valid: \['table', 'phm', 'hashed'\]"):
        Algebra("lut", ("r",), None, "lut")
    assert "nan2" not in algebras.names() and "dead2" not in algebras.names()


def test_tied_positions_use_each_parameter_n_times():
    index = algebras.tied_positions(64, 4, seed=3)
    assert index.shape == (64,) and np.all(np.bincount(index, minlength=16) == 4)
    np.testing.assert_array_equal(index, algebras.tied_positions(64, 4, seed=3))
    assert not np.array_equal(index, algebras.tied_positions(64, 4, seed=4))
    with pytest.raises(ValueError, match="size 10 is not a multiple of n=4"):
        algebras.tied_positions(10, 4, seed=0)
