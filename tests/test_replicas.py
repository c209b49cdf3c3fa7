"""Trainer(replicates=R): R replicates in one compiled epoch equal R separate runs."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import masks as M
from qsparse import models, pruning, train

SPEC = train.EpochSpec(batch_size=20, steps=10, mean=(0.5,), std=(0.25,), augment=False)
R = 3


def toy_data(n=200, shape=(8, 8, 1), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = (images.reshape(n, -1)[:, :3].argmax(1)).astype(np.int32)
    return images, labels


def replicate_states(model, shape, tx, fractions):
    """One state per replicate: its own init, its own mask density."""
    states = []
    for r, fraction in enumerate(fractions):
        params = models.init_params(model, jax.random.key(10 + r), shape)
        masks = pruning.prune(params, M.ones(params), fraction)
        states.append(train.create_train_state(model, params, masks, tx))
    return states


def epoch_keys(epoch):
    return [jax.random.fold_in(jax.random.key(100 + r), epoch) for r in range(R)]


def run_separately(spec, states, data, epochs, ranges=None):
    trainer = train.Trainer(spec)
    out = []
    for r, state in enumerate(states):
        rstate = train.stack([state])
        for e in range(epochs):
            for start, stop in ranges or [(0, spec.steps)]:
                key = train.stack([epoch_keys(e)[r]])
                rstate, metrics = trainer.train_epoch(rstate, *data, key, start, stop)
        out.append(train.slot((trainer.fetch(rstate), metrics), 0))
    return out


def run_together(spec, states, data, epochs, ranges=None):
    trainer = train.Trainer(spec, replicates=R)
    rstate = train.stack(states)
    for e in range(epochs):
        for start, stop in ranges or [(0, spec.steps)]:
            rstate, metrics = trainer.train_epoch(
                rstate, *data, train.stack(epoch_keys(e)), start, stop
            )
    return trainer, trainer.fetch(rstate), metrics


def assert_same(separate, together, metrics, rtol=1e-5, atol=1e-6):
    for r, (state, m) in enumerate(separate):
        mine = train.slot(together, r)
        for a, b, mask in zip(
            jax.tree.leaves(state.params),
            jax.tree.leaves(mine.params),
            jax.tree.leaves(state.masks),
        ):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)
            assert np.all(np.asarray(b)[~np.asarray(mask)] == 0.0)  # pruned weights exactly zero
        assert int(mine.step) == int(state.step)
        np.testing.assert_allclose(metrics["train_loss"][r], m["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["train_acc"][r], m["train_acc"], rtol=1e-6)


def test_replicates_equal_separate_runs_lenet():
    # replicates stack whole states, whatever the algebra: one (quat) stands for all
    model = models.create("lenet12", "quat", num_classes=3, features=(16,))
    states = replicate_states(model, (8, 8, 1), train.make_optimizer("adam", 1e-2), [0.2, 0.5, 0.8])
    data = train.Trainer(SPEC).put_data(*toy_data())
    separate = run_separately(SPEC, states, data, epochs=2)
    trainer, together, metrics = run_together(SPEC, states, data, epochs=2)
    assert_same(separate, together, metrics)
    assert trainer.trace_count == 1
    # different inits, masks and data orders really gave different replicates
    first = [jax.tree.leaves(s.params)[0] for s, _ in separate]
    assert not np.allclose(first[0], first[1])


def test_replicates_equal_separate_runs_conv_with_augmentation_and_partial_epochs():
    spec = train.EpochSpec(batch_size=12, steps=5, mean=(0.5,) * 3, std=(0.25,) * 3, augment=True)
    model = models.create("conv2", "quat", num_classes=3, stages=((4,),), dense_features=(8,))
    states = replicate_states(model, (8, 8, 3), train.make_optimizer("sgd", 1e-2), [0.0, 0.3, 0.6])
    data = train.Trainer(spec).put_data(*toy_data(60, (8, 8, 3)))
    ranges = [(0, 2), (2, 5)]  # a rewind point inside the epoch
    separate = run_separately(spec, states, data, epochs=1, ranges=ranges)
    trainer, together, metrics = run_together(spec, states, data, epochs=1, ranges=ranges)
    assert_same(separate, together, metrics)
    assert trainer.trace_count == 1


def test_replicates_evaluate_and_key_check():
    model = models.create("lenet12", "quat", num_classes=3, features=(16,))
    states = replicate_states(model, (8, 8, 1), train.make_optimizer("adam", 1e-2), [0.2, 0.5, 0.8])
    images, labels = (jnp.asarray(a) for a in toy_data(130, seed=1))
    single = train.Trainer(SPEC)
    trainer = train.Trainer(SPEC, replicates=R)
    together = trainer.evaluate(train.stack(states), images, labels)
    for r, state in enumerate(states):
        alone = single.evaluate(train.stack([state]), images, labels)
        assert len(alone["acc"]) == 1 and len(together["acc"]) == R
        np.testing.assert_allclose(together["acc"][r], alone["acc"][0], rtol=1e-6)
        np.testing.assert_allclose(together["loss"][r], alone["loss"][0], rtol=1e-5)
    empty = trainer.evaluate(train.stack(states), images[:0], labels[:0])
    assert len(empty["acc"]) == R and np.isnan(empty["acc"]).all()
    data = trainer.put_data(*toy_data())
    with pytest.raises(ValueError, match="needs 3 keys"):
        trainer.train_epoch(train.stack(states), *data, jax.random.key(0))
    with pytest.raises(ValueError, match=r"needs 1 keys \(an array of shape \(1,\)\)"):
        single.train_epoch(train.stack(states[:1]), *data, jax.random.key(0))
    with pytest.raises(ValueError, match="replicates must be a positive number, got 0"):
        train.Trainer(SPEC, replicates=0)
    with pytest.raises(ValueError, match=r"replicate_mode 'pmap' is not one of \['auto'"):
        train.Trainer(SPEC, replicate_mode="pmap")


def test_slot_takes_out_what_stack_put_in():
    model = models.create("lenet12", "real", num_classes=3, features=(8,))
    states = replicate_states(model, (8, 8, 1), train.make_optimizer("adam", 1e-3), [0.1, 0.2, 0.3])
    stacked = train.stack(states)
    for r, state in enumerate(states):
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(train.slot(stacked, r))):
            np.testing.assert_array_equal(x, y)
    metrics = {"loss": [0.5, 0.25, 0.125]}
    assert [train.slot(metrics, r) for r in range(R)] == [{"loss": v} for v in metrics["loss"]]


TWO_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from qsparse import masks as M, models, pruning, train
assert jax.device_count() == 2
spec = train.EpochSpec(20, 10, (0.5,), (0.25,), False)
model = models.create("lenet12", "quat", num_classes=3, features=(16,))
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
labels = rng.integers(0, 3, 200).astype(np.int32)
tx = train.make_optimizer("adam", 1e-2)
states = []
for r, fraction in enumerate([0.2, 0.6]):
    params = models.init_params(model, jax.random.key(10 + r), (8, 8, 1))
    masks = pruning.prune(params, M.ones(params), fraction)
    states.append(train.create_train_state(model, params, masks, tx))
keys = [jax.random.key(100 + r) for r in range(2)]
lone = train.Trainer(spec, devices=jax.devices()[:1])
one = train.stack
alone = [lone.train_epoch(one([s]), images, labels, one([k])) for s, k in zip(states, keys)]
both = train.Trainer(spec, replicates=2)  # one replicate per device: the lone program on each
assert both.mesh.devices.shape == (2, 1)
together, metrics = both.train_epoch(train.stack(states), images, labels, train.stack(keys))
together = both.fetch(together.params)
for r, (state, m) in enumerate(alone):
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(train.slot(together, r))):
        np.testing.assert_array_equal(np.asarray(a)[0], b)
    assert metrics["train_loss"][r] == m["train_loss"][0]
print("OK")
"""


@pytest.mark.subprocess
def test_replicates_on_two_devices_are_bit_equal_to_lone_runs():
    """R = 2 on two devices: each device group trains one replicate with the lone run's program."""
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
