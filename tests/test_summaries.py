"""TensorBoard event files of a run, read back with TensorBoard's own reader."""

import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from qsparse import lottery, rundir, summaries
from qsparse.config import Config


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(mnist_dir, tmp_path_factory):
    config = Config(
        model="lenet12",
        algebra="quat",
        hidden=(8,),
        rounds=1,
        epochs=2,
        train_subset=120,
        test_subset=60,
        validation_size=20,
        batch_size=20,
        data_dir=str(mnist_dir),
    )
    return rundir.Run(lottery.run(config, tmp_path_factory.mktemp("work"), log=lambda s: None))


def test_each_epoch_of_each_round_equals_its_metrics_log(run):
    for rd in run.replicate(0).rounds():
        rows = rundir.read_jsonl(rd.metrics)
        curves = scalars(rd.path)
        names = {
            "train/loss": "train_loss",
            "train/acc": "train_acc",
            "test/acc": "test_acc",
            "val/loss": "val_loss",
            "images_per_sec": "images_per_sec",
            "density_prunable": "density_prunable",
        }
        for tag, key in names.items():
            assert [s for s, _ in curves[tag]] == [1, 2], tag
            np.testing.assert_allclose(
                [v for _, v in curves[tag]], [r[key] for r in rows], rtol=1e-6, err_msg=tag
            )  # events hold float32


def test_each_replicate_has_its_layers_and_results_per_round(run):
    rep = run.replicate(0)
    curves = scalars(rep.path)
    for rd in rep.rounds():
        report, done = rundir.read_json(rd.sparsity), rundir.read_json(rd.done)
        for name, leaf in report["leaves"].items():
            if leaf["prunable"]:
                value = dict(curves[f"density/{name}"])[rd.level]
                assert value == pytest.approx(leaf["alive"] / leaf["total"], rel=1e-6)
        assert dict(curves["round/test_acc"])[rd.level] == pytest.approx(done["test_acc"], rel=1e-6)
        assert dict(curves["round/weights_remaining_pct"])[rd.level] == pytest.approx(
            done["weights_remaining_pct"], rel=1e-6
        )
    assert dict(curves["density/QDense_0/qkernel"])[1] < dict(curves["density/QDense_0/qkernel"])[0]


def test_the_run_holds_its_config_as_hparams(run):
    acc = EventAccumulator(str(run.path))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    config = rundir.read_json(run.config)
    assert start.hparams["model"].string_value == config["model"] == "lenet12"
    assert start.hparams["epochs"].number_value == config["epochs"] == 2
    assert start.hparams["prune_output"].bool_value is config["prune_output"] is True
    assert start.hparams["hidden"].string_value == "[8]"
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == rundir.read_json(run.config)


def test_a_resumed_training_has_each_epoch_once(tmp_path):
    first = summaries.Writer(tmp_path)
    for step in (1, 2, 3):
        first.scalars({"train/loss": float(step)}, step)
    first.close()  # the run is killed after epoch 3 was logged, its last checkpoint at epoch 2
    again = summaries.Writer(tmp_path, purge_step=3)
    again.scalars({"train/loss": 30.0, "test/acc": math.nan}, 3)
    again.scalars({"train/loss": 40.0}, 4)
    again.close()
    assert scalars(tmp_path) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}
    assert len(list(tmp_path.iterdir())) == 2  # one file per writer, neither overwritten


def test_processes_other_than_0_write_no_events(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "is_writer", lambda: False)
    writer = summaries.Writer(tmp_path)
    writer.scalars({"train/loss": 1.0}, 1)
    writer.close()
    summaries.config(rundir.Run(tmp_path), Config().to_json())
    assert list(tmp_path.iterdir()) == []
