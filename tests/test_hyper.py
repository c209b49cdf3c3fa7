"""Hypercomplex layers for any algebra (qsparse.hyper, HyperDense, HyperConv): the product they
compute, their equality with the quaternion layers, PHM against Zhang et al.'s Kronecker formula,
the hashed layer's tying, gradients by finite differences, initial variances and parameter
counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import algebras, hyper
from qsparse.algebras import Algebra, structure_constants
from qsparse.layers import HyperConv, HyperDense, QConv, QDense

TABLES = ["real", "complex", "quat", "tessarine", "klein4"]
ALL = algebras.names()[:8]


def params_of(layer, x, key: jax.Array | None = None):
    key = jax.random.key(0) if key is None else key
    return jax.jit(layer.init)(key, x)["params"]


def normal(seed: int, *shape: int) -> np.ndarray:
    """Test data from numpy: drawing with jax would compile its generator for every shape."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rbg_key(seed: int) -> jax.Array:
    """A key whose generator compiles fast, for draws that need no particular numbers."""
    return jax.random.key(seed, impl="rbg")


def random_params(layer, x, seed: int = 0):
    """Parameters of ``layer``'s shapes drawn N(0, 1) in numpy: no initialiser compiled."""
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in shapes.items()}


def run(layer, params, x):
    return jax.jit(layer.apply)({"params": params}, x)


# e_c e_b for the quaternion units (1, i, j, k), as (sign, unit): ij = k, jk = i, ki = j, i^2 = -1.
HAMILTON_RULES = [
    [(1, 0), (1, 1), (1, 2), (1, 3)],
    [(1, 1), (-1, 0), (1, 3), (-1, 2)],
    [(1, 2), (-1, 3), (-1, 0), (1, 1)],
    [(1, 3), (1, 2), (-1, 1), (-1, 0)],
]


@pytest.mark.parametrize("name", TABLES)
def test_a_one_unit_layer_computes_the_product(name):
    """One hypercomplex input and output: the layer's output is w x in the algebra."""
    algebra = algebras.get(name)
    n = algebra.n
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((n, 1, 1)).astype(np.float32), rng.standard_normal((5, n))
    y = run(HyperDense(n, algebra=name, use_bias=False), {"hkernel": w}, x)
    np.testing.assert_allclose(y, algebra.product(w[:, 0], x.T).T, rtol=1e-5, atol=1e-5)


def test_mixed_blocks_go_through_the_table():
    """Dual numbers (e^2 = 0) have a zero block: the einsum path, (a + b e)(c + d e) = ac +
    (ad + bc) e per unit, summed over inputs."""
    dual = Algebra("dual", ("r", "e"), structure_constants(("1", "e"), (("1", "e"), ("e", "0"))))
    rng = np.random.default_rng(1)
    w, x = rng.standard_normal((2, 3, 2)).astype(np.float32), rng.standard_normal((4, 6))
    y = run(HyperDense(4, algebra=dual, use_bias=False), {"hkernel": w}, x)
    xr, xe = x[:, :3], x[:, 3:]
    want = np.concatenate([xr @ w[0], xe @ w[0] + xr @ w[1]], axis=1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["quat", "tessarine"])
def test_the_einsum_and_the_stacked_blocks_agree(name):
    """The two ways to the real kernel, grouped (output channels group-major)."""
    algebra = algebras.get(name)
    w = normal(2, algebra.n, 3, 3, 2, 6)
    for groups in (2,):
        np.testing.assert_allclose(
            jax.jit(hyper.table_kernel, static_argnums=2)(jnp.asarray(algebra.table), w, groups),
            algebra.left_matrix(np.asarray(w), groups),
            rtol=1e-6,
            atol=1e-6,
        )


def test_quat_hyper_dense_is_qdense():
    x = normal(3, 4, 12)
    qparams = params_of(QDense(8), x)
    hparams = params_of(HyperDense(8, algebra="quat"), x)
    np.testing.assert_array_equal(hparams["hkernel"], qparams["qkernel"])  # same init
    qparams = {"qkernel": qparams["qkernel"], "bias": jnp.arange(8.0)}
    hparams = {"hkernel": qparams["qkernel"], "bias": qparams["bias"]}
    np.testing.assert_allclose(
        run(HyperDense(8), hparams, x),
        run(QDense(8), qparams, x),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_quat_hyper_conv_is_qconv(groups):
    x = normal(4, 2, 6, 6, 16)
    qconv = QConv(8, (3, 3), strides=2, feature_group_count=groups)
    hconv = HyperConv(8, (3, 3), strides=2, feature_group_count=groups)
    hparams = random_params(hconv, x)
    np.testing.assert_allclose(
        run(hconv, hparams, x),
        run(qconv, {"qkernel": hparams["hkernel"], "bias": hparams["bias"]}, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_phm4_at_the_hamilton_table_is_qdense():
    x = normal(5, 3, 8)
    phm = HyperDense(8, algebra="phm4", phm_init="hamilton")
    params = params_of(phm, x, rbg_key(0))
    hamilton_rules = np.zeros((4, 4, 4))
    for c, row in enumerate(HAMILTON_RULES):
        for b, (sign, a) in enumerate(row):
            hamilton_rules[c, b, a] = sign
    np.testing.assert_array_equal(params["phm_rules"], hamilton_rules)
    qparams = {"qkernel": params["hkernel"], "bias": params["bias"]}
    np.testing.assert_allclose(
        run(phm, params, x),
        run(QDense(8), qparams, x),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", ["phm2", "phm4"])
def test_phm_is_a_sum_of_kronecker_products(name):
    """W = sum_i A_i kron S_i (out x in), A_i = phm_rules[i].T, S_i = hkernel[i].T; y = W x."""
    n = algebras.get(name).n
    x = normal(6, 3, 3 * n)
    layer = HyperDense(2 * n, algebra=name, use_bias=False)
    params = random_params(layer, x)
    rules, s = np.asarray(params["phm_rules"]), np.asarray(params["hkernel"])
    w = sum(np.kron(rules[i].T, s[i].T) for i in range(n))
    np.testing.assert_allclose(run(layer, params, x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_phm_init_options():
    with pytest.raises(ValueError, match=r"unknown phm_init 'qr'; valid: \['zhang', 'hamilton'\]"):
        hyper.phm_rules_init("qr")
    with pytest.raises(ValueError, match="phm_init='hamilton' needs n=4, got n=2"):
        params_of(HyperDense(4, algebra="phm2", phm_init="hamilton"), jnp.ones((1, 4)), rbg_key(0))
    rules = hyper.phm_rules_init("zhang")(rbg_key(7), (4, 4, 4))
    assert np.abs(rules).max() <= math.sqrt(3) / 4 and np.abs(rules).max() > 0.3


def test_hashed4_ties_a_quarter_of_the_weights_by_seed():
    x = normal(8, 2, 16)
    params = random_params(HyperDense(8, algebra="hashed4"), x)
    assert params["hkernel"].size * 4 == 16 * 8
    stored = jnp.arange(params["hkernel"].size, dtype=jnp.float32).reshape(params["hkernel"].shape)
    kernel = np.asarray(hyper.real_kernel(algebras.get("hashed4"), stored, seed=5))
    assert kernel.shape == (16, 8)
    assert np.all(np.bincount(kernel.astype(int).ravel()) == 4)  # each stored weight 4 times
    same = hyper.real_kernel(algebras.get("hashed4"), stored, seed=5)
    other = hyper.real_kernel(algebras.get("hashed4"), stored, seed=6)
    np.testing.assert_array_equal(kernel, same)
    assert not np.array_equal(kernel, other)
    apply = lambda seed: run(HyperDense(8, algebra="hashed4", hash_seed=seed), params, x)  # noqa: E731
    np.testing.assert_allclose(
        apply(5), x @ hyper.hashed_kernel(params["hkernel"], 5) + params["bias"], rtol=1e-5
    )
    assert not np.allclose(apply(5), apply(6))


def central_differences(f, theta: np.ndarray, eps: float = 1e-2) -> np.ndarray:
    grad = np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        step = np.zeros_like(theta)
        step[idx] = eps
        grad[idx] = (f(theta + step) - f(theta - step)) / (2 * eps)
    return grad


def assert_gradients_match(layer, params: dict, x: np.ndarray) -> None:
    """Autodiff gradients of the summed squared output against central differences."""
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda p: jnp.sum(jnp.square(layer.apply({"params": p}, x))))
    )
    grads = value_and_grad(params)[1]
    for key in params:
        theta = np.asarray(params[key], np.float64)

        def loss(t, key=key):
            return float(value_and_grad(params | {key: t.astype(np.float32)})[0])

        fd = central_differences(loss, theta)
        np.testing.assert_allclose(grads[key], fd, rtol=2e-2, atol=2e-2, err_msg=key)


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_finite_differences(name):
    n = algebras.get(name).n
    x = normal(9, 3, 2 * n)
    layer = HyperDense(n, algebra=name)
    assert_gradients_match(layer, random_params(layer, x, seed=9), x)


@pytest.mark.parametrize("name", ["tessarine", "phm4"])
def test_conv_gradients_match_finite_differences(name):
    """HyperConv for a fixed table and a learned one (PHM's rules get gradients too)."""
    x = normal(10, 1, 3, 3, 4)
    layer = HyperConv(4, (2, 2), algebra=name)
    params = random_params(layer, x, seed=10)
    assert set(params) >= ({"hkernel", "bias", "phm_rules"} if name == "phm4" else {"hkernel"})
    assert_gradients_match(layer, params, x)


@pytest.mark.parametrize("name", [name for name in ALL if name != "phm2"])
def test_initial_variance_per_real_output(name):
    """Var(y_a) = Var(x) / 2 for every real output unit under the default (htorch) rule (PHM
    started at the Hamilton table; its random start is the formula's, tested below)."""
    algebra = algebras.get(name)
    n = algebra.n
    draw = jax.jit(hyper.init(algebra, phm_init="hamilton"), static_argnums=1)
    hkernel = draw(rbg_key(11), (n, 512 // n, 256 // n))
    rules = hyper.phm_rules_init("hamilton")(None, (4, 4, 4)) if algebra.kind == "phm" else None
    kernel = np.asarray(hyper.real_kernel(algebra, hkernel, phm_rules=rules))
    x = np.random.default_rng(10).standard_normal((256, 512)).astype(np.float32)
    per_component = np.var((x @ kernel).reshape(-1, n, 256 // n), axis=(0, 2))
    np.testing.assert_allclose(per_component, 0.5, rtol=0.25)


def test_init_formula_and_criteria():
    tessarine = algebras.get("tessarine")
    assert hyper.block_gain(tessarine) == 4 and hyper.block_gain(algebras.get("complex")) == 2

    def variance(init, shape):
        return np.var(jax.jit(init, static_argnums=1)(rbg_key(12), shape))

    conv = (4, 3, 3, 50, 40)
    np.testing.assert_allclose(variance(hyper.init(tessarine, "he"), conv), 2 / (4 * 50 * 9), 0.05)
    # htorch counts a square window by its side, not its area
    np.testing.assert_allclose(variance(hyper.init(tessarine), conv), 0.5 / (4 * 50 * 3), 0.05)
    phm = variance(hyper.init(algebras.get("phm4")), (4, 100, 50))  # g = n^2 E[A^2] = 1
    np.testing.assert_allclose(phm, 0.5 / 100, rtol=0.05)
    with pytest.raises(ValueError, match=r"unknown criterion 'lecun'; valid: \['htorch', 'he'\]"):
        hyper.init(tessarine, "lecun")


def test_parameter_counts_of_a_784_300_layer():
    x = jax.ShapeDtypeStruct((1, 784), jnp.float32)
    real = 784 * 300
    want = {
        "real": real,
        "complex": real // 2,
        "quat": real // 4,
        "tessarine": real // 4,
        "klein4": real // 4,
        "hashed4": real // 4,
        "phm4": real // 4 + 64,
        "phm2": real // 2 + 8,
    }
    for name, count in want.items():
        shapes = jax.eval_shape(HyperDense(300, algebra=name).init, jax.random.key(0), x)
        kernel = {k: v for k, v in shapes["params"].items() if k != "bias"}
        assert sum(v.size for v in kernel.values()) == count, name
        assert shapes["params"]["bias"].size == 300


def test_widths_must_be_whole_numbers():
    with pytest.raises(
        ValueError, match=r"HyperDense: features must be a multiple of n=4 \(algebra"
    ):
        params_of(HyperDense(6, algebra="klein4"), jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="the input feature size must be a multiple of n=2"):
        params_of(HyperDense(4, algebra="complex"), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="unknown algebra 'oct'; valid:"):
        params_of(HyperDense(8, algebra="oct"), jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="hashed4: feature_group_count must be 1, got 2"):
        params_of(HyperConv(8, (1,), algebra="hashed4", feature_group_count=2), jnp.ones((1, 3, 8)))


@pytest.mark.parametrize("name", ["phm4", "hashed4", "tessarine"])
def test_nnx_twins_have_linen_params_and_outputs(name):
    from flax import nnx

    from qsparse import nnx as qnnx

    x = normal(14, 2, 5, 5, 8)
    layers = {
        "dense": (
            HyperDense(8, algebra=name),
            nnx.eval_shape(lambda: qnnx.HyperDense(200, 8, algebra=name, rngs=nnx.Rngs(0))),
        ),
        "conv": (
            HyperConv(8, (3, 3), algebra=name, strides=2),
            nnx.eval_shape(lambda: qnnx.HyperConv(8, 8, (3, 3), 2, algebra=name, rngs=nnx.Rngs(0))),
        ),
    }
    for kind, (linen, twin) in layers.items():
        inputs = x.reshape(2, 200) if kind == "dense" else x
        params = random_params(linen, inputs, seed=15)
        state = nnx.to_pure_dict(nnx.state(twin, nnx.Param))
        assert jax.tree.map(lambda v: v.shape, state) == jax.tree.map(np.shape, params), kind
        nnx.update(twin, params)
        np.testing.assert_allclose(twin(inputs), run(linen, params, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 4])
def test_phm_dense_written_gradient_equals_autodiff_of_the_expanded_kernel(n):
    """phm_dense's hand-written VJP against autodiff of ``x @ table_kernel(rules, hkernel)``,
    for the input (which the layer tests above do not reach), the rules and the kernels, with
    inputs carrying two leading axes."""
    x = normal(12, 2, 3, n * 5)
    rules, hkernel = normal(13, n, n, n), normal(14, n, 5, 3)
    ct = normal(15, 2, 3, n * 3)

    def written(x, rules, hkernel):
        return jnp.sum(hyper.phm_dense(x, rules, hkernel) * ct)

    def expanded(x, rules, hkernel):
        return jnp.sum(jnp.dot(x, hyper.table_kernel(rules, hkernel)) * ct)

    precise = jax.default_matmul_precision("highest")
    with precise:
        got = jax.grad(written, argnums=(0, 1, 2))(x, rules, hkernel)
        want = jax.grad(expanded, argnums=(0, 1, 2))(x, rules, hkernel)
    for name, g, w in zip(("x", "rules", "hkernel"), got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
