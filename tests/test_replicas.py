"""Trainer(replicas=R): R replicates in one compiled epoch equal R separate runs."""

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
        rstate = state
        for e in range(epochs):
            for start, stop in ranges or [(0, spec.steps)]:
                rstate, metrics = trainer.train_epoch(rstate, *data, epoch_keys(e)[r], start, stop)
        out.append((rstate, metrics))
    return out


def run_together(spec, states, data, epochs, ranges=None):
    trainer = train.Trainer(spec, replicas=R)
    rstate = train.stack_states(states)
    for e in range(epochs):
        for start, stop in ranges or [(0, spec.steps)]:
            rstate, metrics = trainer.train_epoch(
                rstate, *data, jnp.stack(epoch_keys(e)), start, stop
            )
    return trainer, rstate, metrics


def assert_same(separate, together, metrics, rtol=1e-5, atol=1e-6):
    for r, (state, m) in enumerate(separate):
        mine = train.unstack_states(together)[r]
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


@pytest.mark.parametrize("algebra", ["real", "quat"])
def test_replicas_equal_separate_runs_lenet(algebra):
    model = models.create("lenet12", algebra, num_classes=3, features=(16,))
    states = replicate_states(model, (8, 8, 1), train.make_optimizer("adam", 1e-2), [0.2, 0.5, 0.8])
    data = train.Trainer(SPEC).put_data(*toy_data())
    separate = run_separately(SPEC, states, data, epochs=2)
    trainer, together, metrics = run_together(SPEC, states, data, epochs=2)
    assert_same(separate, together, metrics)
    assert trainer.trace_count == 1
    # different inits, masks and data orders really gave different replicates
    first = [jax.tree.leaves(s.params)[0] for s, _ in separate]
    assert not np.allclose(first[0], first[1])


def test_replicas_equal_separate_runs_conv_with_augmentation_and_partial_epochs():
    spec = train.EpochSpec(batch_size=12, steps=5, mean=(0.5,) * 3, std=(0.25,) * 3, augment=True)
    model = models.create("conv2", "quat", num_classes=3, stages=((8, 8),), dense_features=(16,))
    states = replicate_states(model, (8, 8, 3), train.make_optimizer("sgd", 1e-2), [0.0, 0.3, 0.6])
    data = train.Trainer(spec).put_data(*toy_data(60, (8, 8, 3)))
    ranges = [(0, 2), (2, 5)]  # a rewind point inside the epoch
    separate = run_separately(spec, states, data, epochs=1, ranges=ranges)
    trainer, together, metrics = run_together(spec, states, data, epochs=1, ranges=ranges)
    assert_same(separate, together, metrics)
    assert trainer.trace_count == 1


def test_replicas_evaluate_and_key_check():
    model = models.create("lenet12", "quat", num_classes=3, features=(16,))
    states = replicate_states(model, (8, 8, 1), train.make_optimizer("adam", 1e-2), [0.2, 0.5, 0.8])
    images, labels = (jnp.asarray(a) for a in toy_data(130, seed=1))
    single = train.Trainer(SPEC)
    trainer = train.Trainer(SPEC, replicas=R)
    together = trainer.evaluate(train.stack_states(states), images, labels)
    for r, state in enumerate(states):
        alone = single.evaluate(state, images, labels)
        np.testing.assert_allclose(together["acc"][r], alone["acc"], rtol=1e-6)
        np.testing.assert_allclose(together["loss"][r], alone["loss"], rtol=1e-5)
    rstate = train.stack_states(states)
    with pytest.raises(ValueError, match="needs 3 keys"):
        trainer.train_epoch(rstate, *trainer.put_data(*toy_data()), jax.random.key(0))
    with pytest.raises(ValueError, match="replicas must be a positive number"):
        train.Trainer(SPEC, replicas=0)


def test_stack_and_unstack_are_inverse():
    model = models.create("lenet12", "real", num_classes=3, features=(8,))
    states = replicate_states(model, (8, 8, 1), train.make_optimizer("adam", 1e-3), [0.1, 0.2, 0.3])
    back = train.unstack_states(train.stack_states(states))
    assert len(back) == R
    for a, b in zip(states, back):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


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
alone = [lone.train_epoch(s, images, labels, k) for s, k in zip(states, keys)]
both = train.Trainer(spec, replicas=2)  # one replicate per device: the lone program on each
assert both.mesh.devices.shape == (2, 1)
together, metrics = both.train_epoch(train.stack_states(states), images, labels, jnp.stack(keys))
for r, (state, m) in enumerate(alone):
    mine = train.unstack_states(together)[r].params
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(mine)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics["train_loss"][r] == m["train_loss"]
print("OK")
"""


@pytest.mark.subprocess
def test_replicas_on_two_devices_are_bit_equal_to_lone_runs():
    """R = 2 on two devices: each device group trains one replicate with the lone run's program."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
