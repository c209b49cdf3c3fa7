import json

import jax
import numpy as np
import pytest

from qsparse import checkpoints as ckpt
from qsparse import experiment, lottery, models, rundir, train
from qsparse import masks as M
from qsparse.config import Config, ConfigError
from qsparse.cpu import onednn

SMALL = dict(
    rounds=2, epochs=2, train_subset=600, test_subset=200, validation_size=100, batch_size=60
)


@pytest.fixture(scope="module")
def quat_run(mnist_dir, tmp_path_factory):
    config = Config(model="lenet300_100", algebra="quat", data_dir=str(mnist_dir), **SMALL)
    run_dir = lottery.run(config, tmp_path_factory.mktemp("work"), log=lambda s: None)
    return experiment.resolve(config), run_dir


def load_round(run_dir, config, level, rep=0):
    model = models.create(config.model, config.algebra, 10)
    params = models.init_params(model, jax.random.key(0), (28, 28, 1))
    rd = run_dir / f"replicate_{rep}" / f"round_{level:02d}"
    masks = ckpt.load_masks(rd / "masks.npz", M.ones(params))
    like = train.create_train_state(model, params, masks, train.make_optimizer("adam", 1e-3))
    return model, ckpt.load_tree(rd / "final", like), masks


def test_run_writes_everything(quat_run):
    config, run_dir = quat_run
    assert run_dir.name.startswith("lenet300_100_quat_mnist_")
    assert Config.from_json(json.loads((run_dir / "config.json").read_text())) == config
    info = json.loads((run_dir / "runs.jsonl").read_text().splitlines()[-1])
    assert (
        info["packages"]["jax"] == jax.__version__
        and info["device_count"] == jax.local_device_count()
    )
    assert info["cpu_conv"] == onednn.cpu_conv()
    rows = json.loads((run_dir / "summary.json").read_text())
    assert [(r["replicate"], r["round"], r["status"]) for r in rows] == [
        (0, 0, "ok"),
        (0, 1, "ok"),
        (0, 2, "ok"),
    ]
    csv_lines = (run_dir / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("replicate,round,status") and len(csv_lines) == 4
    for level in range(3):
        rd = run_dir / "replicate_0" / f"round_{level:02d}"
        for name in ("masks.npz", "sparsity.json", "metrics.jsonl", "done.json", "final", "ckpt"):
            assert (rd / name).exists(), rd / name
        epochs = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in epochs] == [1, 2]
        assert all(0 <= e[k] <= 1 for e in epochs for k in ("train_acc", "test_acc", "val_acc"))
    # the quaternion model's x positions as the paper plots them (the paper's Fig. 4a, rounds 0-2)
    np.testing.assert_allclose(
        [r["weights_remaining_pct"] for r in rows], [100.0, 80.12, 64.22], atol=0.005
    )
    np.testing.assert_allclose(
        [r["weights_remaining_pct_of_real"] for r in rows], [25.40, 20.35, 16.31], atol=0.005
    )


def test_density_is_exact_by_count(quat_run):
    config, run_dir = quat_run
    alive, total = None, None
    for level in range(3):
        report = json.loads(
            (run_dir / "replicate_0" / f"round_{level:02d}" / "sparsity.json").read_text()
        )["total"]
        if alive is None:
            alive, total = report["prunable_alive"], report["prunable_total"]
            assert alive == total == 67_300
        else:
            alive -= round(0.2 * alive)
        assert report["prunable_alive"] == alive


def test_round_starts_from_rewind_params_times_mask(quat_run, mnist_dir):
    """Retraining θ0 ⊙ mask_1 by hand with the run's data keys reproduces round 1 exactly."""
    from qsparse import data

    config, run_dir = quat_run
    model, final, masks = load_round(run_dir, config, 1)
    theta0 = ckpt.load_tree(run_dir / "replicate_0" / "init", final.params)
    ds = data.load(
        "mnist", data_dir=mnist_dir, validation_size=100, train_subset=600, test_subset=200, seed=0
    )
    trainer = train.Trainer(train.epoch_spec(ds, 60))
    state = train.create_train_state(model, theta0, masks, train.make_optimizer("adam", config.lr))
    state = train.stack([state])
    _, data_key, _ = lottery.replicate_keys(config.seed, 0)
    images, labels = trainer.put_data(ds.train_images, ds.train_labels)
    for epoch in range(config.epochs):
        key = train.stack([jax.random.fold_in(data_key, epoch)])
        state, _ = trainer.train_epoch(state, images, labels, key)
    params = train.slot(trainer.fetch(state.params), 0)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final.params)):
        np.testing.assert_array_equal(a, b)


def test_masks_shrink_and_saved_weights_are_exactly_sparse(quat_run):
    config, run_dir = quat_run
    previous = None
    for level in range(3):
        _, final, masks = load_round(run_dir, config, level)
        if previous is not None:
            assert M.is_subset(masks, previous) and not M.is_subset(previous, masks)
        previous = masks
        for p, m in zip(jax.tree.leaves(final.params), jax.tree.leaves(masks)):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
        ckpts = ckpt.EpochCheckpoints(run_dir / "replicate_0" / f"round_{level:02d}" / "ckpt")
        epoch, state, history = ckpts.restore_latest(final)
        assert epoch == 2 and len(history) == 2
        for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_rerun_skips_finished_rounds(quat_run):
    config, run_dir = quat_run
    done = run_dir / "replicate_0" / "round_02" / "done.json"
    before = (done.stat().st_mtime_ns, (run_dir / "summary.json").read_text())
    lines = []
    lottery.run(config, run_dir.parent, log=lines.append)
    assert (
        done.stat().st_mtime_ns == before[0] and (run_dir / "summary.json").read_text() == before[1]
    )
    assert not any("epoch" in line for line in lines)


def test_different_config_in_run_dir_is_refused_and_nothing_changes(quat_run):
    config, run_dir = quat_run
    snapshot = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(ConfigError, match="different config.*epochs"):
        lottery.run(
            Config(**{**config.to_json(), "epochs": 3, "layer_fractions": ()}),
            None,
            run_dir=run_dir,
        )
    assert snapshot == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}


def test_late_rewind_and_controls(mnist_dir, tmp_path):
    base = dict(
        model="lenet12",
        algebra="real",
        data_dir=str(mnist_dir),
        rounds=1,
        epochs=2,
        train_subset=300,
        test_subset=100,
        batch_size=60,
    )
    run_dir = lottery.run(Config(rewind="3it", **base), tmp_path, log=lambda s: None)
    rep = run_dir / "replicate_0"
    model = models.create("lenet12", "real")
    like = models.init_params(model, jax.random.key(0), (28, 28, 1))
    theta0, theta3 = ckpt.load_tree(rep / "init", like), ckpt.load_tree(rep / "rewind", like)
    assert not np.array_equal(theta0["Dense_0"]["kernel"], theta3["Dense_0"]["kernel"])
    shuffled = lottery.run(Config(control="shuffle", **base), tmp_path, log=lambda s: None)
    plain = lottery.run(Config(**base), tmp_path, log=lambda s: None)
    a = np.load(shuffled / "replicate_0" / "round_01" / "masks.npz")
    b = np.load(plain / "replicate_0" / "round_01" / "masks.npz")
    for k in b.files:
        assert a[k].sum() == b[k].sum()
    assert not np.array_equal(a["Dense_0/kernel"], b["Dense_0/kernel"])


def paper_config(mnist_dir, **overrides) -> Config:
    """A tiny quaternion LeNet-12 under the paper's protocol."""
    fields = dict(rounds=2, epochs=1, train_subset=300, test_subset=100, batch_size=60)
    return Config(
        model="lenet12",
        algebra="quat",
        protocol="paper",
        data_dir=str(mnist_dir),
        **{**fields, **overrides},
    )


def test_paper_protocol_writes_search_trajectory(mnist_dir, tmp_path):
    lines = []
    run_dir = lottery.run(paper_config(mnist_dir), tmp_path, log=lines.append)
    rounds = run_dir / "replicate_0"
    assert (rounds / "round_01" / "search" / "final").exists()
    assert not (rounds / "round_02" / "search").exists()  # no round prunes the last one
    rows = rundir.summary_rows(rundir.Run(run_dir))
    assert [r["round"] for r in rows] == [0, 1, 2]
    progress = [line for line in lines if " left" in line]
    assert progress[-1].endswith("~0:00:00 left")  # the last training was counted last


def test_paper_protocol_stopped_replicate_trains_no_further_search(mnist_dir, tmp_path):
    # stop_accuracy out of reach: rounds 0 and 1 fall short, and the replicate stops
    config = paper_config(mnist_dir, rounds=3, stop_accuracy=0.999)
    run_dir = lottery.run(config, tmp_path, log=lambda s: None)
    rounds = run_dir / "replicate_0"
    assert sorted(p.name for p in rounds.glob("round_*")) == ["round_00", "round_01"]
    assert not (rounds / "round_01" / "search").exists()


def test_config_errors_that_need_data(mnist_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"batch size 700 must be in \[1, 600\]"):
        lottery.run(Config(data_dir=str(mnist_dir), train_subset=600, batch_size=700), tmp_path)
    with pytest.raises(ConfigError, match="needs 3 input channel"):
        lottery.run(
            Config(algebra="quat", encoding="rgb_gray", data_dir=str(mnist_dir), train_subset=60),
            tmp_path,
        )
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_replicates_trained_together_equal_the_lone_run(quat_run, tmp_path):
    """--replicates=2 trains both replicates in one compiled epoch; replicate 0 computes what the
    single-replicate run computed (float rounding aside: the two share a loop body), and
    replicate 1 is a different training."""
    config, lone = quat_run
    together = lottery.run(
        Config(**{**config.to_json(), "replicates": 2}), tmp_path, log=lambda s: None
    )
    rows = json.loads((together / "summary.json").read_text())
    assert [(r["replicate"], r["round"]) for r in rows] == [
        (r, level) for r in (0, 1) for level in range(3)
    ]
    for level in range(3):
        _, a, ma = load_round(lone, config, level)
        _, b, mb = load_round(together, config, level, rep=0)
        _, c, _ = load_round(together, config, level, rep=1)
        for x, y in zip(jax.tree.leaves(ma), jax.tree.leaves(mb)):
            np.testing.assert_array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
        assert not np.allclose(jax.tree.leaves(a.params)[0], jax.tree.leaves(c.params)[0])
    lone_rows = json.loads((lone / "summary.json").read_text())
    for x, y in zip(lone_rows, rows[:3]):
        np.testing.assert_allclose(y["train_loss"], x["train_loss"], rtol=1e-4)


def test_paper_search_switches_separate_its_ingredients(mnist_dir, tmp_path):
    """A search that restarts from θ₀ with the carried optimizer (search_weights='rewind') is,
    round for round, the ticket that starts with the search's optimizer
    (ticket_optimizer='search'): same weights, mask, optimizer state and batches."""
    config = paper_config(
        mnist_dir, search_weights="rewind", search_optimizer="carry", ticket_optimizer="search"
    )
    run_dir = lottery.run(config, tmp_path, log=lambda s: None)
    stored = json.loads((run_dir / "config.json").read_text())
    assert (stored["search_weights"], stored["ticket_optimizer"]) == ("rewind", "search")
    model = models.create("lenet12", "quat", 10)
    like = models.init_params(model, jax.random.key(0), (28, 28, 1))
    rd = run_dir / "replicate_0" / "round_01"
    masks = ckpt.load_masks(rd / "masks.npz", M.ones(like))
    state = train.create_train_state(model, like, masks, train.make_optimizer("adam", 1e-3))
    ticket, search = (ckpt.load_tree(p, state) for p in (rd / "final", rd / "search" / "final"))
    for a, b in zip(jax.tree.leaves(ticket.params), jax.tree.leaves(search.params)):
        np.testing.assert_array_equal(a, b)
