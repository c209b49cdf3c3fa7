"""Batch statistics in the trainer: updated in the compiled epoch, averaged over a replicate's
data devices, used by evaluation, carried by checkpoints; never masked or pruned."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsparse import checkpoints as ckpt
from qsparse import lottery, models, pruning, train
from qsparse import masks as M
from qsparse.config import Config
from qsparse.layers import QDense

MEAN, STD = (0.5,), (0.25,)
TX = train.make_optimizer("adam", 1e-2)  # one optimizer: stacked states share their pytree


class BNNet(nn.Module):
    """A quaternion dense layer, batch norm, a real classifier: the smallest model with stats."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QDense(16)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


MODEL = BNNet()


def data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
    labels = (images.reshape(n, -1)[:, :3].argmax(1)).astype(np.int32)
    return images, labels


def fresh(seed=0, prune=0.5):
    model = MODEL  # one module: stacked states share their apply_fn
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 4, 4, 1)))
    params, stats = variables["params"], variables["batch_stats"]
    masks = pruning.prune(params, M.ones(params), prune)
    return train.create_train_state(model, params, masks, TX, batch_stats=stats)


def normalized(images):
    return (images.astype(np.float32) / 255.0 - MEAN[0]) / STD[0]


def test_one_full_batch_step_updates_the_running_averages_with_momentum():
    images, labels = data()
    # one step whose batch is the whole set: its statistics do not depend on the data order
    trainer = train.Trainer(train.EpochSpec(len(images), 1, MEAN, STD, False))
    state = fresh()
    out, _ = trainer.train_epoch(
        train.stack([state]), images, labels, train.stack([jax.random.key(1)])
    )
    out = train.slot(out, 0)
    # the pre-norm activations of the batch, computed outside the trainer
    params = M.apply(state.params, state.masks)
    h = QDense(16).apply(
        {"params": params["QDense_0"]}, normalized(images).reshape(len(images), -1)
    )
    bs = out.batch_stats["BatchNorm_0"]
    np.testing.assert_allclose(bs["mean"], 0.1 * np.asarray(h).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bs["var"], 0.9 + 0.1 * np.asarray(h).var(0), rtol=1e-4, atol=1e-6)
    # pruned weights stay exactly zero; the statistics have no masks and are not optimised
    kernel, mask = out.params["QDense_0"]["qkernel"], out.masks["QDense_0"]["qkernel"]
    assert np.all(np.asarray(kernel)[~np.asarray(mask)] == 0) and (~np.asarray(mask)).any()
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(out.opt_state)]
    assert any("BatchNorm_0']['scale']" in p for p in paths)  # BN's scale is a param
    assert not any(p.endswith(("['mean']", "['var']")) for p in paths)


def test_evaluation_uses_the_running_averages():
    images, labels = data()
    trainer = train.Trainer(train.EpochSpec(20, 6, MEAN, STD, False), eval_batch=40)
    state, _ = trainer.train_epoch(
        train.stack([fresh()]), images, labels, train.stack([jax.random.key(2)])
    )
    got = trainer.evaluate(state, images, labels)
    s = train.slot(trainer.fetch(state), 0)
    variables = {"params": M.apply(s.params, s.masks), "batch_stats": s.batch_stats}
    logits = BNNet().apply(variables, normalized(images))  # eval mode: running averages
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = np.mean(np.argmax(logits, -1) == labels)
    np.testing.assert_allclose(got["loss"][0], loss, rtol=1e-5)
    assert got["acc"][0] == pytest.approx(acc)
    # and not the batch's statistics: train-mode logits give another loss
    batch_logits, _ = BNNet().apply(variables, normalized(images), train=True, mutable=True)
    other = optax.softmax_cross_entropy_with_integer_labels(batch_logits, labels).mean()
    assert abs(float(other) - got["loss"][0]) > 1e-4


def test_replicates_train_their_own_statistics_as_lone_runs_do():
    images, labels = data()
    spec = train.EpochSpec(20, 6, MEAN, STD, False)
    states = [fresh(seed=s) for s in (0, 1)]
    keys = [jax.random.key(k) for k in (3, 4)]
    both, _ = train.Trainer(spec, replicates=2).train_epoch(
        train.stack(states), images, labels, train.stack(keys)
    )
    for r in range(2):
        lone, _ = train.Trainer(spec).train_epoch(
            train.stack([states[r]]), images, labels, train.stack([keys[r]])
        )
        for a, b in zip(
            jax.tree.leaves(train.slot(both, r).batch_stats), jax.tree.leaves(lone.batch_stats)
        ):
            np.testing.assert_allclose(a, np.asarray(b)[0], rtol=1e-5, atol=1e-6)


def test_checkpoints_carry_the_statistics(tmp_path):
    images, labels = data()
    trainer = train.Trainer(train.EpochSpec(20, 6, MEAN, STD, False))
    state, _ = trainer.train_epoch(
        train.stack([fresh()]), images, labels, train.stack([jax.random.key(5)])
    )
    state = train.slot(trainer.fetch(state), 0)
    ckpt.save_tree(tmp_path / "s", state)
    back = ckpt.load_tree(tmp_path / "s", fresh())
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    assert float(np.abs(np.asarray(back.batch_stats["BatchNorm_0"]["mean"])).sum()) > 0


TWO_DEVICES = textwrap.dedent("""
    import jax, numpy as np
    from qsparse import train
    import test_batch_stats as T
    assert jax.local_device_count() == 2
    images, labels = T.data()
    out = {}
    for devices in (jax.devices()[:1], jax.devices()):
        trainer = train.Trainer(
            train.EpochSpec(len(images), 1, T.MEAN, T.STD, False), devices=devices
        )
        state, _ = trainer.train_epoch(
            train.stack([T.fresh()]), images, labels, train.stack([jax.random.key(1)])
        )
        bs = state.batch_stats["BatchNorm_0"]
        # every device of the replicate holds the same running averages
        shards = [np.asarray(s.data) for s in bs["mean"].addressable_shards]
        assert all(np.array_equal(shards[0], s) for s in shards), "devices disagree"
        out[len(devices)] = {k: np.asarray(v)[0] for k, v in bs.items()}
    # equal slices: the average of the two slices' means is the batch's mean
    np.testing.assert_allclose(out[2]["mean"], out[1]["mean"], rtol=1e-4, atol=1e-6)
    # the variances are the slices' own, averaged (unsynchronised batch norm): not the batch's
    assert np.all(out[2]["var"] <= out[1]["var"] + 1e-6)
    assert not np.allclose(out[2]["var"], out[1]["var"], rtol=1e-5, atol=1e-7)
    print("OK")
""")


@pytest.mark.subprocess
def test_two_data_devices_average_the_running_statistics():
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    result = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["OK"]


class BNLeNet(nn.Module):
    """A real LeNet with batch norm after each hidden layer, registered for the IMP tests."""

    algebra: str = "real"
    num_classes: int = 10
    features: tuple = (16,)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for width in self.features:
            x = nn.Dense(width)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(self.num_classes)(x)


@pytest.fixture
def bn_model(monkeypatch):
    spec = models.Spec(BNLeNet, {"features": (16,)}, "mnist", 2, 60, 1e-3)
    monkeypatch.setitem(models.REGISTRY, "bnlenet", spec)
    return "bnlenet"


def bn_config(mnist_dir, **overrides):
    small = dict(rounds=2, epochs=2, train_subset=600, test_subset=200, batch_size=60)
    return Config(data_dir=str(mnist_dir), rewind="3it", **{**small, **overrides})


def test_imp_rounds_start_from_the_rewind_points_statistics(
    bn_model, mnist_dir, tmp_path, monkeypatch
):
    started = []
    create = train.create_train_state

    def recording(model, params, masks, tx, batch_stats=None):
        started.append(batch_stats)
        return create(model, params, masks, tx, batch_stats=batch_stats)

    monkeypatch.setattr(train, "create_train_state", recording)
    run_dir = lottery.run(bn_config(mnist_dir, model=bn_model), tmp_path, log=lambda s: None)
    variables = models.init_variables(BNLeNet(), jax.random.key(0), (28, 28, 1))
    stats0 = variables["batch_stats"]
    like = train.rewind_point(variables["params"], stats0)
    point = ckpt.load_tree(run_dir / "replicate_0" / "rewind", like)
    moved = point["batch_stats"]["BatchNorm_0"]["mean"]
    assert np.abs(np.asarray(moved)).max() > 0  # three steps moved them off their start
    assert len(started) == 3  # round 0 from θ₀'s statistics, rounds 1-2 from the rewind point's
    for a, b in zip(jax.tree.leaves(started[0]), jax.tree.leaves(stats0)):
        np.testing.assert_array_equal(a, b)
    for s in started[1:]:
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(point["batch_stats"])):
            np.testing.assert_array_equal(a, b)
    # the rounds' final states hold statistics trained on from there
    rows = json.loads((run_dir / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["ok"] * 3


def test_imp_with_batch_norm_resumes_bit_for_bit(bn_model, mnist_dir, tmp_path):
    config = bn_config(mnist_dir, model=bn_model)
    whole = lottery.run(config, tmp_path / "a", log=lambda s: None)
    again = tmp_path / "b" / whole.name
    shutil.copytree(whole, again)
    last = again / "replicate_0" / "round_02"
    for gone in ("done.json", "final", "ckpt/epoch_0002"):
        shutil.rmtree(last / gone) if (last / gone).is_dir() else (last / gone).unlink()
    lottery.run(config, tmp_path / "b", log=lambda s: None)  # resumes round 2 from epoch 1
    model = models.create(bn_model)
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    params, stats = variables["params"], variables["batch_stats"]
    like = train.create_train_state(model, params, M.ones(params), TX, batch_stats=stats)
    a = ckpt.load_tree(whole / "replicate_0" / "round_02" / "final", like)
    b = ckpt.load_tree(last / "final", like)
    assert jax.tree.leaves(a.batch_stats)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
