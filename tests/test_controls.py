"""Controls branching from a ticket run (``--ticket_run``): reinit trains the ticket's masks from
new weights, shuffle random masks with the ticket's per-layer counts; bad branches are refused
before anything is written."""

import json

import numpy as np
import pytest

from qsparse import lottery
from qsparse.config import Config, ConfigError

SMALL = dict(
    model="lenet12",
    algebra="quat",
    grouping="number",
    rounds=2,
    epochs=1,
    train_subset=300,
    test_subset=100,
    batch_size=60,
    replicates=2,
)


def quiet(_):
    pass


@pytest.fixture(scope="module")
def ticket(mnist_dir, tmp_path_factory):
    config = Config(data_dir=str(mnist_dir), **SMALL)
    return lottery.run(config, tmp_path_factory.mktemp("tickets"), log=quiet)


def masks(run_dir, r, level) -> dict[str, np.ndarray]:
    with np.load(run_dir / f"replicate_{r}" / f"round_{level:02d}" / "masks.npz") as f:
        return {k: f[k] for k in f.files}


def branch(ticket, mnist_dir, tmp_path, control, **overrides):
    fields = {**SMALL, **overrides}
    config = Config(data_dir=str(mnist_dir), control=control, ticket_run=str(ticket), **fields)
    return lottery.run(config, tmp_path, log=quiet)


def test_reinit_trains_the_tickets_masks_and_records_the_ticket(ticket, mnist_dir, tmp_path):
    run = branch(ticket, mnist_dir, tmp_path, "reinit")
    for r in range(2):
        for level in (1, 2):
            mine, theirs = masks(run, r, level), masks(ticket, r, level)
            assert sorted(mine) == sorted(theirs)
            for k in theirs:
                np.testing.assert_array_equal(mine[k], theirs[k])
        final = run / f"replicate_{r}" / "round_01" / "done.json"
        ticket_done = json.loads((ticket / f"replicate_{r}" / "round_01" / "done.json").read_text())
        assert json.loads(final.read_text())["test_acc"] != ticket_done["test_acc"]
    record = json.loads((run / "ticket.json").read_text())
    assert record["run"] == str(ticket.resolve())
    assert record["config"] == json.loads((ticket / "config.json").read_text())


def test_shuffle_keeps_the_tickets_layer_counts_at_new_positions(ticket, mnist_dir, tmp_path):
    run = branch(ticket, mnist_dir, tmp_path, "shuffle", replicates=1)
    previous = None
    for level in (1, 2):
        mine, theirs = masks(run, 0, level), masks(ticket, 0, level)
        moved = 0
        for k in theirs:
            assert mine[k].sum() == theirs[k].sum(), k
            if k.endswith("qkernel"):
                assert np.all(mine[k] == mine[k][:1])  # whole quaternions
            if not theirs[k].all():
                moved += int(np.sum(mine[k] != theirs[k]))
            if previous is not None:
                assert np.all(~mine[k] | previous[k])  # masks only shrink
        assert moved > 0
        previous = mine


def test_bad_branches_are_refused_before_anything_is_written(ticket, mnist_dir, tmp_path):
    cases = [
        (dict(control="none"), "needs control='reinit' or 'shuffle'"),
        (dict(control="reinit", lr=0.5), "is another experiment.*'lr'"),
        (dict(control="reinit", rounds=3), "rounds=3: the ticket run .* has only 2"),
        (dict(control="reinit", ticket_run=str(tmp_path)), "holds no run"),
    ]
    for overrides, match in cases:
        fields = {**SMALL, "ticket_run": str(ticket), **overrides}
        with pytest.raises(ConfigError, match=match):
            lottery.run(Config(data_dir=str(mnist_dir), **fields), tmp_path / "work", log=quiet)
    assert not (tmp_path / "work").exists()
