import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsparse import cpu, models, pruning, train
from qsparse import masks as M

SPEC = train.EpochSpec(batch_size=20, steps=10, mean=(0.5,), std=(0.25,), augment=False)


def one(tree):
    """A lone state or key as the trainer takes it: with a replicate axis of size 1."""
    return train.stack([tree])


def toy_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    labels = (images.reshape(n, -1)[:, :3].argmax(1)).astype(np.int32)
    return images, labels


init_params = jax.jit(models.init_params, static_argnums=(0, 2))  # compiled, not op by op


@pytest.fixture(scope="module")
def setup():
    model = models.create("lenet12", "quat", num_classes=3)
    params = models.init_params(model, jax.random.key(0), (8, 8, 1))
    masks = pruning.prune(params, M.ones(params), 0.6)
    trainer = train.Trainer(SPEC)
    data = trainer.put_data(*toy_data())
    return model, params, masks, trainer, data


def run_epochs(setup, tx, masks=None, epochs=2, opt_state=None):
    model, params, default_masks, trainer, data = setup
    state = train.create_train_state(model, params, default_masks if masks is None else masks, tx)
    if opt_state is not None:
        state = state.replace(opt_state=opt_state)
    rstate = one(state)
    for e in range(epochs):
        rstate, metrics = trainer.train_epoch(rstate, *data, one(jax.random.key(e)))
    return train.slot(rstate, 0), train.slot(metrics, 0)


@pytest.mark.parametrize(
    "tx",
    [
        train.make_optimizer("adam", 1e-2),
        train.make_optimizer("sgd", 1e-2),
        optax.chain(optax.adamw(1e-2, weight_decay=0.1), train.zero_pruned()),
    ],
)
def test_pruned_weights_stay_exactly_zero(setup, tx):
    _, params, masks, _, _ = setup
    state, metrics = run_epochs(setup, tx)
    assert np.isfinite(metrics["train_loss"])
    moved = False
    for p0, p, m in zip(
        jax.tree.leaves(params), jax.tree.leaves(state.params), jax.tree.leaves(masks)
    ):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
        moved |= bool(np.any(np.asarray(p)[np.asarray(m)] != np.asarray(p0)[np.asarray(m)]))
    assert moved


def test_carried_dense_optimizer_state_does_not_revive_pruned_weights(setup):
    model, params, masks, _, _ = setup
    tx = train.make_optimizer("adam", 1e-2)
    dense, _ = run_epochs(setup, tx, masks=M.ones(params))  # Adam moments nonzero everywhere
    state, _ = run_epochs(setup, tx, opt_state=dense.opt_state, epochs=1)
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_one_compilation_serves_every_mask(setup):
    model, params, masks, _, data = setup
    trainer = train.Trainer(SPEC)
    tx = train.make_optimizer("adam", 1e-3)
    m = masks
    for _ in range(3):
        rstate = one(train.create_train_state(model, params, m, tx))
        for e in range(2):
            rstate, _ = trainer.train_epoch(rstate, *data, one(jax.random.key(e)))
        m = pruning.prune(train.slot(trainer.fetch(rstate.params), 0), m, 0.3)
    rstate, _ = trainer.train_epoch(rstate, *data, one(jax.random.key(9)), 3, 7)  # a partial epoch
    assert trainer.trace_count == 1


def test_split_epoch_equals_whole_epoch_and_same_key_same_result(setup):
    model, params, masks, trainer, data = setup
    tx = train.make_optimizer("adam", 1e-2)
    start = one(train.create_train_state(model, params, masks, tx))
    key5, key6 = one(jax.random.key(5)), one(jax.random.key(6))
    # a state the caller built is copied onto the devices, never donated: it can start each run
    whole, _ = trainer.train_epoch(start, *data, key5)
    again, _ = trainer.train_epoch(start, *data, key5)
    part, _ = trainer.train_epoch(start, *data, key5, 0, 4)
    part, _ = trainer.train_epoch(part, *data, key5, 4, 10)
    other, _ = trainer.train_epoch(start, *data, key6)
    for a, b, c, _ in zip(*(jax.tree.leaves(s.params) for s in (whole, again, part, other))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert not any(x.is_deleted() for x in jax.tree.leaves(start))
    assert part.step.tolist() == [10]
    assert not all(
        np.array_equal(a, d)
        for a, d in zip(jax.tree.leaves(whole.params), jax.tree.leaves(other.params))
    )


def test_training_learns_and_evaluate_counts(setup):
    model, params, masks, trainer, data = setup
    state, metrics = run_epochs(setup, train.make_optimizer("adam", 1e-2), epochs=6)
    images, labels = toy_data(130, seed=1)
    ev = train.slot(trainer.evaluate(one(state), jnp.asarray(images), jnp.asarray(labels)), 0)
    logits = model.apply(
        {"params": M.apply(state.params, state.masks)},
        (images.astype(np.float32) / 255 - 0.5) / 0.25,
    )
    np.testing.assert_allclose(ev["acc"], np.mean(np.argmax(logits, -1) == labels), rtol=1e-6)
    assert metrics["train_acc"] > 0.5


def test_bad_batch_sizes():
    ds = types.SimpleNamespace(
        train_images=np.zeros((50, 8, 8, 1)), mean=(0.0,), std=(1.0,), augment=False
    )
    with pytest.raises(ValueError, match=r"batch size 60 must be in \[1, 50\]"):
        train.epoch_spec(ds, 60)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        train.make_optimizer("rmsprop", 1e-3)


TWO_DEVICES = textwrap.dedent("""
    import jax, numpy as np
    from qsparse import masks as M, models, pruning, train
    model = models.create("conv2", "quat", num_classes=3, stages=((8, 8),), dense_features=(16,))
    init = jax.jit(models.init_params, static_argnums=(0, 2))  # compiled once, not op by op
    params = init(model, jax.random.key(0), (8, 8, 3))
    masks = pruning.prune(params, M.ones(params), 0.5)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 120).astype(np.int32)
    out = {}
    for n in (1, 2):
        spec = train.EpochSpec(20, 6, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True)
        trainer = train.Trainer(spec, devices=jax.local_devices()[:n])
        state = train.create_train_state(model, params, masks, train.make_optimizer("adam", 1e-2))
        state = train.stack([state])
        data = trainer.put_data(images, labels)
        for e in range(2):
            state, m = trainer.train_epoch(state, *data, train.stack([jax.random.key(e)]))
        out[n] = (trainer.fetch(state.params), m)
    assert jax.device_count() == 2
    try:
        train.Trainer(train.EpochSpec(7, 1, (0.0,), (1.0,), False))
        raise AssertionError("odd batch accepted on 2 devices")
    except ValueError as e:
        assert "batch size 7 is not divisible by the 2 devices" in str(e)
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[2][0])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out[1][1]["train_loss"], out[2][1]["train_loss"], rtol=1e-4)
    print("OK")
""")


@pytest.mark.subprocess
def test_two_cpu_devices_equal_one_device():
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_dense_models_get_cpu_compiler_options_with_the_same_training():
    """The option only changes which kernels run; training stays the same up to float rounding."""
    model = models.create("lenet300_100", "quat", num_classes=3, features=(32, 16))
    params = init_params(model, jax.random.key(0), (8, 8, 1))
    masks = pruning.prune(params, M.ones(params), 0.5)
    images, labels = toy_data()
    out = {}
    for options in ("auto", None):
        trainer = train.Trainer(SPEC, compiler_options=options)
        data = trainer.put_data(images, labels)
        rstate = train.create_train_state(model, params, masks, train.make_optimizer("adam", 1e-2))
        rstate = one(rstate)
        for e in range(3):
            rstate, metrics = trainer.train_epoch(rstate, *data, one(jax.random.key(e)), 0, 5 + e)
        out[options] = (rstate.params, metrics)
        assert trainer.trace_count == 1
        assert trainer._options(rstate, data[0]) == (
            cpu.DENSE_COMPILER_OPTIONS if options else None
        )
    for a, b in zip(jax.tree.leaves(out["auto"][0]), jax.tree.leaves(out[None][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["auto"][1]["train_loss"], out[None][1]["train_loss"], rtol=1e-5)


def test_models_with_convolutions_keep_xla_defaults():
    model = models.create("conv2", "quat", num_classes=3, stages=((8,),), dense_features=(16,))
    params = init_params(model, jax.random.key(0), (8, 8, 1))
    trainer = train.Trainer(SPEC)
    rstate = one(
        train.create_train_state(model, params, M.ones(params), train.make_optimizer("adam", 1e-2))
    )
    assert (
        trainer.compiler_options == "auto"
        and trainer._options(rstate, trainer.put_data(*toy_data())[0]) is None
    )
