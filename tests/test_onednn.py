"""The optional oneDNN convolutions: same values and gradients as XLA's, CPU only, switchable."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import cpu, epoch, models, pruning, train
from qsparse import masks as M
from qsparse.cpu import onednn

needs_onednn = pytest.mark.skipif(
    not onednn.available(), reason=f"oneDNN extension not built: {onednn._state['error']}"
)

CASES = [  # input shape, kernel shape, padding
    ((3, 9, 7, 5), (3, 3, 5, 6), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (3, 2, 4, 8), ((0, 2), (1, 0))),
    ((2, 6, 6, 3), (1, 1, 3, 4), ((0, 0), (0, 0))),
    ((4, 16, 16, 64), (3, 3, 64, 32), ((1, 1), (1, 1))),
]


def reference(x, w, padding):
    return jax.lax.conv_general_dilated(
        x,
        w,
        (1, 1),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


@pytest.fixture
def choice():
    """Restore the process-wide choice after a test changes it."""
    saved = onednn._state["choice"]
    yield onednn.set_cpu_conv
    onednn._state["choice"] = saved


def test_required_where_ci_installs_onednn():
    # .ci/run sets this when it could install libdnnl-dev, so the tests below cannot skip silently
    if os.environ.get("QSPARSE_REQUIRE_ONEDNN") == "1":
        assert onednn.available(), onednn._state["error"]
    assert onednn.cpu_conv() == ("onednn" if onednn.available() else "xla")


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, padding", CASES)
def test_values_and_gradients_equal_xla(x_shape, w_shape, padding):
    rng = np.random.default_rng(sum(x_shape))
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    f = jax.jit(lambda x, w: cpu.conv2d(x, w, padding))
    assert "qsparse_onednn_conv_forward" in f.lower(x, w).as_text()
    y, y_ref = f(x, w), reference(x, w, padding)
    scale = float(jnp.max(jnp.abs(y_ref)))
    np.testing.assert_allclose(y, y_ref, atol=2e-6 * scale)
    ct = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
    grads = jax.jit(lambda x, w, ct: jax.vjp(lambda x, w: cpu.conv2d(x, w, padding), x, w)[1](ct))(
        x, w, ct
    )
    grads_ref = jax.vjp(lambda x, w: reference(x, w, padding), x, w)[1](ct)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=2e-6 * float(jnp.max(jnp.abs(g_ref))))


@needs_onednn
def test_inside_scan_and_vmap():
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32)
    pad = ((1, 1), (1, 1))

    def body(w, x):
        loss, g = jax.value_and_grad(lambda w: jnp.sum(cpu.conv2d(x, w, pad) ** 2))(w)
        return w - 1e-3 * g, loss

    w_end, losses = jax.jit(lambda w, xs: jax.lax.scan(body, w, xs))(w, xs)
    w_ref = w
    for x, loss in zip(xs, losses):
        loss_ref, g = jax.value_and_grad(lambda w: jnp.sum(reference(x, w, pad) ** 2))(w_ref)  # noqa: B023
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
        w_ref = w_ref - 1e-3 * g
    np.testing.assert_allclose(w_end, w_ref, rtol=1e-5, atol=1e-6)
    ws = jnp.stack([w, 2 * w])
    batched = jax.jit(jax.vmap(lambda w: cpu.conv2d(xs[0], w, pad)))(ws)
    for b, wi in zip(batched, ws):
        np.testing.assert_allclose(b, reference(xs[0], wi, pad), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_precision_settings_use_onednn_and_other_dtypes_use_xla():
    x, w, pad = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8)), ((1, 1), (1, 1))
    for args, kwargs, expect in [
        ((x, w), {"precision": jax.lax.Precision.HIGHEST}, True),
        ((x, w), {"precision": (jax.lax.Precision.DEFAULT,) * 2}, True),
        ((x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)), {}, False),
    ]:
        text = jax.jit(lambda x, w: cpu.conv2d(x, w, pad, **kwargs)).lower(*args).as_text()  # noqa: B023
        assert ("qsparse_onednn" in text) == expect and ("convolution" in text) != expect


def test_switch_to_xla_and_bad_choice(choice):
    choice("xla")
    assert onednn.cpu_conv() == "xla"
    text = (
        jax.jit(lambda x, w: cpu.conv2d(x, w, ((1, 1), (1, 1))))
        .lower(jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 4, 4)))
        .as_text()
    )
    assert "qsparse_onednn" not in text and "convolution" in text
    with pytest.raises(ValueError, match=r"'mkl' is not one of \('auto', 'onednn', 'xla'\)"):
        choice("mkl")


def test_unbuilt_extension_falls_back_to_xla(choice, monkeypatch):
    monkeypatch.setitem(onednn._state, "loaded", False)
    monkeypatch.setitem(onednn._state, "error", "the extension qsparse._onednn_conv is not built")
    choice("auto")
    assert not onednn.available() and onednn.cpu_conv() == "xla"
    with pytest.raises(
        RuntimeError, match="unavailable: the extension qsparse._onednn_conv is not built"
    ):
        choice("onednn")


@needs_onednn
def test_training_epoch_matches_xla_convolutions(choice):
    model = models.create("conv2", "quat", num_classes=3, stages=((8, 8),), dense_features=(16,))
    params = models.init_params(model, jax.random.key(0), (8, 8, 4))
    masks = pruning.prune(params, M.ones(params), 0.5)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (80, 8, 8, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, 80).astype(np.int32)
    spec = train.EpochSpec(20, 4, (0.5,) * 4, (0.25,) * 4, True)
    out = {}
    for backend in ("onednn", "xla"):
        choice(backend)
        trainer = train.Trainer(spec)
        state = train.create_train_state(model, params, masks, train.make_optimizer("adam", 1e-2))
        state = train.stack([state])
        data = trainer.put_data(images, labels)
        for e in range(2):
            state, metrics = trainer.train_epoch(state, *data, train.stack([jax.random.key(e)]))
        lowered = (
            jax.jit(lambda s, x, y: epoch.evaluate(spec.mean, spec.std, 10, 1, s, x, y))
            .lower(train.slot(state, 0), jnp.asarray(images[:30]), jnp.asarray(labels[:30]))
            .as_text()
        )
        assert ("qsparse_onednn_conv_forward" in lowered) == (backend == "onednn")
        ev = trainer.evaluate(state, jnp.asarray(images[:30]), jnp.asarray(labels[:30]))
        out[backend] = state.params, {**metrics, **ev}
    for a, b in zip(jax.tree.leaves(out["onednn"][0]), jax.tree.leaves(out["xla"][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for k in ("train_loss", "loss", "acc"):
        np.testing.assert_allclose(out["onednn"][1][k], out["xla"][1][k], rtol=1e-5)


@needs_onednn
def test_concurrent_calls_from_many_threads():
    """XLA runs independent custom calls at the same time (devices of a mesh, both gradients of a
    layer); the extension must give every caller its own correct result."""
    import concurrent.futures

    rng = np.random.default_rng(2)
    pad = ((1, 1), (1, 1))
    xs = [jnp.asarray(rng.standard_normal((8, 16, 16, 32)), jnp.float32) for _ in range(4)]
    w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)), jnp.float32)
    grad = jax.jit(
        lambda x, w: jax.grad(lambda x, w: jnp.sum(cpu.conv2d(x, w, pad) ** 2), (0, 1))(x, w)
    )
    expected = [jax.grad(lambda x, w: jnp.sum(reference(x, w, pad) ** 2), (0, 1))(x, w) for x in xs]
    jax.block_until_ready(grad(xs[0], w))

    def work(i):
        return [jax.block_until_ready(grad(xs[i % 4], w)) for _ in range(10)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(8)))
    for i, runs in enumerate(results):
        for g in runs:
            for a, b in zip(g, expected[i % 4]):
                np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))))
