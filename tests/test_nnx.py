"""qsparse.nnx against the linen layers: same params and outputs, init law, bridge, pruning."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse import initializers, layers, masks, pruning
from qsparse import nnx as qnnx
from qsparse import quaternion as Q

LAYERS_DOC = Path(__file__).resolve().parent.parent / "docs" / "layers.md"


def normal(shape: tuple[int, ...], seed: int | np.random.Generator = 0) -> jax.Array:
    """Standard normal float32 values, drawn by NumPy (no per-shape compilation)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def linen_params(layer: nn.Module, x: jax.Array, seed: int = 1) -> dict:
    """Random params in the shapes linen's init gives (traced, not run): nonzero everywhere, the
    bias included, so every path is compared."""
    leaves, tree = jax.tree.flatten(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [normal(a.shape, rng) for a in leaves])


def abstract(build) -> nnx.Module:
    """The module ``build()`` makes, with its params' shapes but no values (nothing run), for
    tests that load params of their own."""
    return nnx.eval_shape(build)


def pure_params(module: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def shapes(tree) -> dict:
    return jax.tree.map(lambda a: tuple(a.shape), tree)


DENSE_CASES = [  # (batch shape, in, out, kwargs)
    ((5,), 8, 12, {}),
    ((3, 2), 16, 4, {}),
    ((2,), 4, 8, {"use_bias": False}),
    ((1,), 64, 32, {"kernel_init": initializers.isotropic()}),
]


@pytest.mark.parametrize("batch,n_in,n_out,kwargs", DENSE_CASES)
def test_qdense_equals_linen_with_the_same_params(batch, n_in, n_out, kwargs):
    x = normal((*batch, n_in), 0)
    linen = layers.QDense(n_out, **kwargs)
    params = linen_params(linen, x)
    layer = abstract(lambda: qnnx.QDense(n_in, n_out, **kwargs, rngs=nnx.Rngs(5)))
    assert shapes(pure_params(layer)) == shapes(params)
    nnx.update(layer, params)
    np.testing.assert_array_equal(layer(x), linen.apply({"params": params}, x))


CONV_CASES = [  # (input shape, out, kernel_size, kwargs)
    ((2, 9, 9, 8), 16, (3, 3), {}),
    ((2, 9, 9, 8), 16, (3, 3), {"strides": 2, "padding": "VALID"}),
    ((2, 9, 9, 8), 16, (3, 3), {"strides": (1, 2), "padding": ((1, 2), (0, 1))}),
    ((1, 7, 6, 4), 8, (2, 3), {"padding": 1, "kernel_dilation": 2, "use_bias": False}),
    ((1, 5, 5, 4), 4, (3, 3), {"input_dilation": (2, 1), "padding": 0}),
    ((2, 6, 6, 16), 16, (3, 3), {"feature_group_count": 2}),
    ((2, 10, 8), 12, (3,), {"strides": 2}),  # 1-d
    ((1, 4, 5, 6, 4), 8, (2, 2, 3), {"padding": "VALID"}),  # 3-d
]


@pytest.mark.parametrize("shape,n_out,kernel_size,kwargs", CONV_CASES)
def test_qconv_equals_linen_with_the_same_params(shape, n_out, kernel_size, kwargs):
    x = normal(shape, 0)
    linen = layers.QConv(n_out, kernel_size, **kwargs)
    params = linen_params(linen, x)
    layer = abstract(lambda: qnnx.QConv(shape[-1], n_out, kernel_size, **kwargs, rngs=nnx.Rngs(5)))
    assert shapes(pure_params(layer)) == shapes(params)
    nnx.update(layer, params)
    np.testing.assert_array_equal(layer(x), linen.apply({"params": params}, x))


def test_jit_and_gradients_equal_linen():
    x = normal((2, 9, 9, 8), 0)
    kwargs = {"strides": (1, 2), "padding": ((1, 2), (0, 1)), "feature_group_count": 2}
    linen = layers.QConv(16, (3, 3), **kwargs)
    params = linen_params(linen, x)
    layer = qnnx.QConv(8, 16, (3, 3), **kwargs, rngs=nnx.Rngs(0))
    nnx.update(layer, params)

    loss = lambda y: jnp.sum(jnp.sin(y))  # noqa: E731
    got = nnx.jit(nnx.grad(lambda m, x: loss(m(x))))(layer, x)
    want = jax.grad(lambda p: loss(linen.apply({"params": p}, x)))(params)
    got = nnx.to_pure_dict(nnx.state(got, nnx.Param))
    assert shapes(got) == shapes(want)
    for name in ("qkernel", "bias"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    y_jit = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(y_jit, linen.apply({"params": params}, x), rtol=1e-6, atol=1e-6)


def test_dtype_and_param_dtype_as_linen():
    x = jnp.ones((2, 8), jnp.float32)
    layer = qnnx.QDense(8, 8, use_bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert set(pure_params(layer)) == {"qkernel"} and layer.qkernel[...].dtype == jnp.float32
    assert layer(x).dtype == jnp.bfloat16
    wide = qnnx.QConv(4, 8, (3, 3), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(pure_params(wide))} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("name", ["htorch", "parcollet_he", "isotropic"])
def test_kernel_init_is_the_qsparse_initialiser_on_the_params_stream(name):
    """With the key NNX hands out, the kernel is exactly the named qsparse initialiser's draw."""
    kwargs = {} if name == "htorch" else {"kernel_init": name}  # htorch is the default
    dense = qnnx.QDense(8, 12, **kwargs, rngs=nnx.Rngs(params=7))
    key = nnx.Rngs(params=7).params()  # the stream's first key: the kernel's
    want = initializers.get(name)(key, (4, 2, 3), jnp.float32)
    np.testing.assert_array_equal(dense.qkernel[...], want)
    np.testing.assert_array_equal(dense.bias[...], 0.0)
    conv = qnnx.QConv(8, 12, (3, 2), **kwargs, rngs=nnx.Rngs(params=7))
    np.testing.assert_array_equal(
        conv.qkernel[...], initializers.get(name)(key, (4, 3, 2, 2, 3), jnp.float32)
    )


@pytest.mark.parametrize("name", ["htorch", "parcollet_he"])
def test_init_scale_matches_linen(name):
    """Linen and NNX derive keys differently, so compare the law: E|w|² per quaternion."""
    init = initializers.get(name)
    x = jnp.zeros((1, 512))
    linen = layers.QDense(512, kernel_init=init).init(jax.random.key(0), x)["params"]["qkernel"]
    native = qnnx.QDense(512, 512, kernel_init=name, rngs=nnx.Rngs(0)).qkernel[...]
    assert native.shape == linen.shape
    assert not np.array_equal(
        native, linen
    )  # independent draws, so the check below means something
    sq = lambda w: float(jnp.mean(jnp.sum(jnp.square(w), axis=0)))  # noqa: E731
    expected = initializers.expected_sq_norm(name, linen.shape)
    assert sq(native) == pytest.approx(expected, rel=0.02)
    assert sq(native) == pytest.approx(sq(linen), rel=0.03)


@pytest.mark.parametrize(
    "make_linen,make_nnx,x_shape,message",
    [
        (lambda: layers.QDense(8), lambda: qnnx.QDense(10, 8, rngs=nnx.Rngs(0)), (1, 10), "10"),
        (lambda: layers.QDense(6), lambda: qnnx.QDense(8, 6, rngs=nnx.Rngs(0)), (1, 8), "6"),
        (
            lambda: layers.QConv(8, (3, 3)),
            lambda: qnnx.QConv(3, 8, (3, 3), rngs=nnx.Rngs(0)),
            (1, 5, 5, 3),
            "3",
        ),
        (
            lambda: layers.QConv(10, (3, 3)),
            lambda: qnnx.QConv(8, 10, (3, 3), rngs=nnx.Rngs(0)),
            (1, 5, 5, 8),
            "10",
        ),
    ],
)
def test_widths_not_multiple_of_4_raise_as_in_linen(make_linen, make_nnx, x_shape, message):
    pattern = rf"must be a multiple of 4.*got {message}\b"
    with pytest.raises(ValueError, match=pattern):
        make_linen().init(jax.random.key(0), jnp.zeros(x_shape))
    with pytest.raises(ValueError, match=pattern):
        make_nnx()  # NNX builds params eagerly: the error comes at construction


def test_other_construction_and_call_errors():
    with pytest.raises(ValueError, match="feature_group_count=3"):
        qnnx.QConv(8, 8, (3, 3), feature_group_count=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding 'CIRCULAR' not supported"):
        qnnx.QConv(8, 8, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown quaternion init 'nope'"):
        qnnx.QDense(8, 8, kernel_init="nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="built for 8 input features"):
        qnnx.QDense(8, 8, rngs=nnx.Rngs(0))(jnp.zeros((1, 12)))
    with pytest.raises(ValueError, match="expected inputs of shape"):
        qnnx.QConv(8, 8, (3, 3), rngs=nnx.Rngs(0))(jnp.zeros((5, 5, 8)))


def test_linen_qdense_through_bridge_to_nnx_equals_native():
    x = normal((4, 8), 0)
    wrapped = nnx.bridge.ToNNX(layers.QDense(12), rngs=nnx.Rngs(3)).lazy_init(x)
    params = pure_params(wrapped)
    params["bias"] = normal((12,), 1)
    nnx.update(wrapped, params)
    native = qnnx.QDense(8, 12, rngs=nnx.Rngs(0))
    assert shapes(pure_params(native)) == shapes(params)
    nnx.update(native, params)
    np.testing.assert_array_equal(native(x), wrapped(x))
    assert not np.allclose(native(x), 0.0)


def test_nnx_qdense_through_bridge_to_linen_equals_linen_qdense():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nnx.bridge.to_linen(qnnx.QDense, 8, 16, name="q")(x))
            return nn.Dense(3, name="output")(x)

    x = normal((4, 8), 0)
    variables = Net().init(jax.random.key(1), x)
    params = variables["params"]
    assert shapes(params["q"]) == {"qkernel": (4, 2, 4), "bias": (16,)}
    params["q"]["bias"] = normal((16,), 2)
    hidden = nn.relu(layers.QDense(16).apply({"params": params["q"]}, x))
    want = nn.Dense(3).apply({"params": params["output"]}, hidden)
    np.testing.assert_allclose(Net().apply({"params": params}, x), want, rtol=1e-6, atol=1e-6)


def real_kernel(qkernel: jax.Array) -> jax.Array:
    """The real block matrix from the Hamilton table, independently of left_matrix."""
    _, n_in, n_out = qkernel.shape
    return jnp.einsum("cab,cio->biao", Q.HAMILTON, qkernel).reshape(4 * n_in, 4 * n_out)


def test_pruning_an_nnx_model_with_qsparse_masks():
    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = qnnx.QDense(16, 32, rngs=rngs)
            self.output = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.output(nnx.relu(self.hidden(x)))

    model = Model(nnx.Rngs(0))
    params = pure_params(model)
    assert shapes(params) == {
        "hidden": {"qkernel": (4, 4, 8), "bias": (32,)},
        "output": {"kernel": (32, 4), "bias": (4,)},
    }
    assert all(bool(jnp.all(p != 0)) for p in jax.tree.leaves(params) if p.ndim > 1)
    m = pruning.prune(params, masks.ones(params), 0.5, method="global")
    nnx.update(model, masks.apply(params, m))

    alive, total = masks.count(m)
    assert total == 4 * 4 * 8 + 32 * 4 and alive == total // 2
    qk, k = model.hidden.qkernel[...], model.output.kernel[...]
    np.testing.assert_array_equal(qk[~m["hidden"]["qkernel"]], 0.0)
    np.testing.assert_array_equal(k[~m["output"]["kernel"]], 0.0)
    assert int(jnp.sum(qk == 0) + jnp.sum(k == 0)) == total - alive
    np.testing.assert_array_equal(model.hidden.bias[...], params["hidden"]["bias"])  # not pruned

    x = normal((5, 16), 1)
    hidden = jax.nn.relu(x @ real_kernel(qk) + model.hidden.bias[...])
    want = hidden @ k + model.output.bias[...]
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
    unpruned = jax.nn.relu(x @ real_kernel(params["hidden"]["qkernel"]) + params["hidden"]["bias"])
    assert not np.allclose(model(x), unpruned @ params["output"]["kernel"] + model.output.bias[...])


def docs_nnx_example() -> str:
    text = LAYERS_DOC.read_text()
    section = text.split("\n## Quaternion layers in NNX\n", 1)
    assert len(section) == 2, "docs/layers.md has no '## Quaternion layers in NNX' section"
    block = re.search(r"```python\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    assert block, "no python block in the NNX section of docs/layers.md"
    return block.group(1)


def test_docs_nnx_example():
    code = docs_nnx_example()
    assert "qsparse.nnx" in code and "pruning.prune" in code
    namespace: dict = {}
    exec(compile(code, str(LAYERS_DOC), "exec"), namespace)  # its own asserts check the sparsity
    alive, total = masks.count(namespace["m"])
    assert alive == total // 2 > 0
