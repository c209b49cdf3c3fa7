"""Hypercomplex batch norm: each form's promise on correlated data, the learnable scale, running
averages by hand, eval mode, flax's BatchNorm for split, NNX against linen, refusals."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse import batchnorm, layers
from qsparse import nnx as qnnx
from qsparse.batchnorm import HyperBatchNorm

FORMS = batchnorm.FORMS
EPS = 1e-5
CASES = [("quat", (16, 4, 4)), ("complex", (64,)), ("tessarine", (32, 3))]  # (algebra, lead)
N = {"quat": 4, "complex": 2, "tessarine": 4, "real": 1}
C = 3  # hypercomplex channels


def correlated(lead: tuple, n: int, seed: int = 0) -> np.ndarray:
    """Component-blocked features ``(*lead, n C)`` whose channels have non-zero means and
    correlated components of unequal scales (float64)."""
    rng = np.random.default_rng(seed)
    mix = 0.5 * rng.standard_normal((C, n, n)) + np.diag(np.arange(1.0, n + 1))
    z = rng.standard_normal((*lead, n, C))
    xb = np.einsum("cad,...dc->...ac", mix, z) + 3 * rng.standard_normal((n, C))
    return xb.reshape(*lead, n * C)


def rows(x: np.ndarray, n: int) -> np.ndarray:
    """Every example and position as a row, blocked: ``(rows, n, C)``."""
    return np.asarray(x, np.float64).reshape(-1, n, x.shape[-1] // n)


def reference_stats(x: np.ndarray, n: int, form: str):
    """The batch statistics in float64, from their definitions."""
    xb = rows(x, n)
    d = xb - xb.mean(0)
    mean = xb.mean(0).reshape(-1)
    if form == "split":
        return mean, (d**2).mean(0).reshape(-1)
    if form == "shared":
        return mean, (d**2).sum(1).mean(0) / n  # E|x - mu|^2 / n per channel
    return mean, np.stack([np.cov(d[:, :, c].T, bias=True).reshape(n, n) for c in range(C)])


def full_gamma(tri: np.ndarray, n: int) -> np.ndarray:
    """The symmetric matrices of upper triangles stored row by row, built entry by entry."""
    g = np.zeros((tri.shape[0], n, n))
    k = 0
    for a in range(n):
        for b in range(a, n):
            g[:, a, b] = g[:, b, a] = tri[:, k]
            k += 1
    return g


def reference_apply(x, n, form, stats, params):
    """The layer's output in float64 from the formulas: centre, divide or whiten (numpy's
    Cholesky), then scale and shift."""
    mean, second = (np.asarray(s, np.float64) for s in stats)
    d = rows(x, n) - mean.reshape(n, -1)
    if form == "split":
        xhat = d / np.sqrt(second.reshape(n, -1) + EPS)
    elif form == "shared":
        xhat = d / np.sqrt(second + EPS)
    else:
        chol = np.linalg.cholesky(second + EPS * np.eye(n))
        xhat = np.stack([np.linalg.solve(chol[c], d[:, :, c].T).T for c in range(C)], -1)
    scale = np.asarray(params.get("scale", params.get("gamma")), np.float64)
    if form == "split":
        y = xhat * scale.reshape(n, -1)
    elif form == "shared":
        y = xhat * scale
    else:
        y = np.einsum("cad,rdc->rac", full_gamma(scale, n), xhat)
    y = y + np.asarray(params["bias"]).reshape(n, -1)
    return y.reshape(np.shape(x))


def train_call(module, variables, x):
    return module.apply(variables, jnp.asarray(x, jnp.float32), mutable=["batch_stats"])


def identity_params(params: dict) -> dict:
    """Scale 1 (gamma the identity: twice its initial 0.5 I), bias 0: the output is x^."""
    ident = {"scale": jnp.ones_like, "gamma": lambda g: 2 * g, "bias": jnp.zeros_like}
    return {k: ident[k](v) for k, v in params.items()}


@pytest.mark.parametrize("algebra,lead", CASES)
@pytest.mark.parametrize("form", FORMS)
def test_normalised_values_keep_each_forms_promise(form, algebra, lead):
    n = N[algebra]
    x = correlated(lead, n)
    module = HyperBatchNorm(algebra=algebra, form=form, use_running_average=False)
    variables = module.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    params = identity_params(variables["params"])
    xhat, _ = train_call(module, {**variables, "params": params}, x)
    xb = rows(xhat, n)
    assert np.allclose(xb.mean(0), 0, atol=1e-4)
    var = (xb**2).mean(0)  # (n, C) per component
    raw_var = reference_stats(x, n, "split")[1].reshape(n, C)
    assert not np.allclose(raw_var, 1, atol=0.1)  # the data was not normalised already
    if form == "split":
        assert np.allclose(var, 1, atol=1e-4)
    elif form == "shared":
        assert np.allclose(var.mean(0), 1, atol=1e-4)  # E|x^|^2 / n = 1 per channel
        assert not np.allclose(var, 1, atol=0.05)  # one divisor per channel, not per component
    else:
        cov = np.einsum("rac,rdc->cad", xb, xb) / len(xb)
        assert np.allclose(cov, np.eye(n), atol=1e-3)  # eps I shifts it by eps / eigenvalue
        # Cholesky whitening leaves the first component only scaled (ZCA would mix it).
        d0 = rows(x, n)[:, 0] - rows(x, n)[:, 0].mean(0)
        assert np.allclose(xb[:, 0], d0 / np.sqrt((d0**2).mean(0) + EPS), atol=1e-4)
    # the layer's output is gamma x^ + beta for any parameters
    rng = np.random.default_rng(1)
    random = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    y, _ = train_call(module, {**variables, "params": random}, x)
    expected = reference_apply(x, n, form, reference_stats(x, n, form), random)
    assert np.allclose(y, expected, atol=2e-4)


@pytest.mark.parametrize("form", FORMS)
def test_the_initial_scale_scales_the_output(form):
    n = 4
    x = correlated((16, 4, 4), n, seed=2)
    module = HyperBatchNorm(algebra="quat", form=form, use_running_average=False)
    variables = module.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    yb = rows(train_call(module, variables, x)[0], n)
    cov = np.einsum("rac,rdc->cad", yb, yb) / len(yb)
    assert np.allclose(yb.mean(0), 0, atol=1e-4)
    if form == "whiten":
        assert np.allclose(cov, 0.25 * np.eye(n), atol=1e-4)
    else:
        diag = np.diagonal(cov, axis1=1, axis2=2)  # (C, n)
        assert np.allclose(diag.mean(1) if form == "shared" else diag, 1, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_running_averages_follow_the_momentum_and_eval_mode_uses_them(form):
    n, momentum = 4, 0.8
    batches = [correlated((8, 3, 3), n, seed=s) for s in (3, 4)]
    module = HyperBatchNorm(algebra="quat", form=form, momentum=momentum)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 3, 3, n * C)), False)
    initial = [np.zeros(n * C), {"split": np.ones(n * C), "shared": np.ones(C)}.get(form)]
    if form == "whiten":
        initial[1] = np.broadcast_to(np.eye(n), (C, n, n))
    names = ["mean", "cov" if form == "whiten" else "var"]
    assert all(
        np.array_equal(variables["batch_stats"][k], v) for k, v in zip(names, initial, strict=True)
    )
    running = initial
    for x in batches:
        _, updates = module.apply(variables, jnp.asarray(x, jnp.float32), False, mutable=True)
        variables = {**variables, **updates}
        batch = reference_stats(x, n, form)
        running = [momentum * r + (1 - momentum) * b for r, b in zip(running, batch, strict=True)]
        got = [variables["batch_stats"][k] for k in names]
        assert all(np.allclose(g, r, atol=1e-5) for g, r in zip(got, running, strict=True))
    params = {k: v + 0.1 for k, v in variables["params"].items()}
    x = batches[0]
    y, updates = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
    assert np.allclose(y, reference_apply(x, n, form, running, params), atol=2e-4)
    assert jax.tree.all(
        jax.tree.map(np.array_equal, updates, {"batch_stats": variables["batch_stats"]})
    )
    one = module.apply({**variables, "params": params}, x[:1], True)  # no batch dependence
    assert np.allclose(one, y[:1], atol=1e-6)
    assert HyperBatchNorm().momentum == 0.9  # PyTorch's default decay


@pytest.mark.parametrize("algebra", ["quat", "complex", "real"])
def test_split_equals_flax_batchnorm(algebra):
    x = [correlated((8, 3, 3), N[algebra], seed=s) for s in (5, 6)]
    ours = HyperBatchNorm(algebra=algebra, form="split")
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=EPS)
    v_ours = ours.init(jax.random.key(0), x[0], False)
    v_flax = flax_bn.init(jax.random.key(0), x[0], False)
    assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_flax)
    for batch in x:
        y_ours, u_ours = ours.apply(v_ours, batch, False, mutable=["batch_stats"])
        y_flax, u_flax = flax_bn.apply(v_flax, batch, False, mutable=["batch_stats"])
        assert np.allclose(y_ours, y_flax, atol=1e-5)
        v_ours, v_flax = {**v_ours, **u_ours}, {**v_flax, **u_flax}
        assert jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-5), v_ours, v_flax))
    assert np.allclose(ours.apply(v_ours, x[0], True), flax_bn.apply(v_flax, x[0], True), atol=1e-5)


@pytest.mark.parametrize("form,scale", [("shared", 1.0), ("whiten", 0.5)])
def test_every_real_form_is_an_ordinary_batchnorm(form, scale):
    x = correlated((32,), 1, seed=7)
    ours = HyperBatchNorm(algebra="real", form=form)
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=EPS, scale_init=nn.initializers.constant(scale))
    v_ours = ours.init(jax.random.key(0), x, False)
    v_flax = flax_bn.init(jax.random.key(0), x, False)
    y_ours, u_ours = ours.apply(v_ours, x, False, mutable=["batch_stats"])
    y_flax, u_flax = flax_bn.apply(v_flax, x, False, mutable=["batch_stats"])
    assert np.allclose(y_ours, y_flax, atol=1e-5)
    second = u_ours["batch_stats"]["var" if form == "shared" else "cov"].reshape(-1)
    assert np.allclose(second, u_flax["batch_stats"]["var"], atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_nnx_equals_linen(form):
    batches = [correlated((8, 3, 3), 4, seed=s) for s in (8, 9)]
    linen = HyperBatchNorm(algebra="quat", form=form)
    variables = linen.init(jax.random.key(0), batches[0], False)
    layer = qnnx.HyperBatchNorm(4 * C, algebra="quat", form=form, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    params = {k: v + rng.standard_normal(v.shape) for k, v in variables["params"].items()}
    nnx.update(layer, nnx.State(params))
    variables = {**variables, "params": params}
    assert (
        nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat)).keys() == variables["batch_stats"].keys()
    )
    for x in batches:
        y, updates = linen.apply(variables, x, False, mutable=["batch_stats"])
        variables = {**variables, **updates}
        assert np.allclose(layer(jnp.asarray(x, jnp.float32)), y, atol=1e-5)
        stats = nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))
        assert jax.tree.all(jax.tree.map(np.allclose, stats, dict(variables["batch_stats"])))
    layer.eval()
    assert np.allclose(layer(batches[0]), linen.apply(variables, batches[0], True), atol=1e-5)
    assert jax.tree.all(
        jax.tree.map(np.array_equal, nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat)), stats)
    )


@pytest.mark.parametrize("form", FORMS)
def test_gradients_are_finite_even_for_degenerate_batches(form):
    module = HyperBatchNorm(algebra="quat", form=form, use_running_average=False)
    x = jnp.asarray(correlated((32,), 4, seed=10), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    weights = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)

    def loss(params, x):
        y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.tanh(y) * weights)

    constant = jnp.ones_like(x)  # zero variance and a zero covariance matrix
    equal = jnp.tile(x[:, :C], (1, 4))  # every component the same: a singular covariance
    for data in (x, constant, equal):
        grads = jax.grad(loss, argnums=(0, 1))(variables["params"], data)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(jax.grad(loss, argnums=1)(variables["params"], x)).max()) > 0


@pytest.mark.parametrize("form,algebra", [("split", "real"), ("split", "quat"), ("shared", "quat")])
def test_training_mode_values_and_gradients_equal_the_formulas_differentiated(form, algebra):
    """Training mode's one-pass statistics and written-out gradient give what autodiff of the
    two-pass formulas gives (batch_stats, normalize, scale_shift), for every output: the layer's
    values and the batch's mean and second moment, with random cotangents for all three."""
    n = N[algebra]
    x = jnp.asarray(3.0 + 2.0 * correlated((6, 5, 5), n, seed=12), jnp.float32)  # mean far from 0
    rng = np.random.default_rng(1)
    params = [
        jnp.asarray(1 + rng.standard_normal(s), jnp.float32)
        for s in [spec[1] for spec in batchnorm.param_specs(form, n, C).values()]
    ]

    def written(x, params):
        stats = batchnorm.batch_stats(x, n, form)
        return batchnorm.scale_shift(
            batchnorm.normalize(x, n, form, stats, EPS), n, form, *params
        ), stats

    def ours(x, params):
        return batchnorm.train_apply(x, n, form, params, EPS, None)

    (y_ref, stats_ref), vjp_ref = jax.vjp(written, x, params)
    (y, stats), vjp = jax.vjp(ours, x, params)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    for a, b in zip(stats, stats_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    cotangents = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), (y, stats)
    )
    for g, g_ref in zip(
        jax.tree.leaves(vjp(cotangents)), jax.tree.leaves(vjp_ref(cotangents)), strict=True
    ):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(g_ref).max()))


def test_batch_statistics_average_over_a_device_axis():
    x = jnp.asarray(correlated((4, 8, 3), 4, seed=11), jnp.float32)  # 4 shards of 8
    for form in FORMS:
        shards = jax.vmap(
            lambda s, f=form: batchnorm.batch_stats(s, 4, f, axis_name="d"), axis_name="d"
        )
        whole = batchnorm.batch_stats(x.reshape(-1, x.shape[-1]), 4, form)
        for per_shard, full in zip(shards(x), whole, strict=True):
            assert np.allclose(per_shard, full[None], atol=1e-5)


def test_refusals_name_the_bad_value_and_the_choices():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match=r"^batch norm form 'shared' does not apply to algebra "):
        HyperBatchNorm(algebra="hashed4", form="shared").init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match=r"valid: \['split'\]$"):
        qnnx.HyperBatchNorm(8, algebra="hashed4", form="whiten", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"form 'zca' .* valid: \['split', 'shared', 'whiten'\]"):
        HyperBatchNorm(form="zca").init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match="6 features are not a multiple of n=4"):
        HyperBatchNorm().init(jax.random.key(0), jnp.ones((2, 6)), False)
    assert layers.HyperBatchNorm is HyperBatchNorm


def test_the_docs_example_runs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "layers.md").read_text()
    section = text.split("\n## Hypercomplex batch norm\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(code, "docs/layers.md", "exec"), namespace)  # its own asserts check the shapes
    assert namespace["y_eval"].shape == namespace["x"].shape
