"""qsparse.rundir: the names of a run's files, atomic text writes and checked reads, summaries."""

import csv
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from qsparse import checkpoints as ckpt
from qsparse import masks, models, rundir

GOLDEN_RUN = Path(__file__).parent / "golden" / "partial_run"


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_names_of_a_round_and_their_order(tmp_path):
    run = rundir.Run(tmp_path)
    rd = run.replicate(2).round(3)
    assert rd.masks == tmp_path / "replicate_2" / "round_03" / "masks.npz"
    assert rd.search.final == tmp_path / "replicate_2" / "round_03" / "search" / "final"
    assert (rd.level, run.replicate(2).index) == (3, 2)
    for r, level in [(10, 0), (2, 11), (2, 9), (0, 100)]:
        run.replicate(r).round(level).path.mkdir(parents=True)
    (tmp_path / "replicate_2" / "round_05.tmp").write_text("")  # a file, not a round
    assert [rep.index for rep in run.replicates()] == [0, 2, 10]  # numeric, not lexical
    assert [rd.level for rd in run.replicate(2).rounds()] == [9, 11]


def test_every_file_of_a_written_run_has_a_name_here():
    """The vocabulary covers the layout: each file of a run written by the driver lies under a
    path that rundir names."""
    run = rundir.Run(GOLDEN_RUN)
    named = {run.config, run.runs, run.summary_json, run.summary_csv}
    for rep in run.replicates():
        named |= {rep.init, rep.rewind, rep.stopped}
        for rd in rep.rounds():
            named |= {
                rd.masks,
                rd.sparsity,
                rd.done,
                rd.metrics,
                rd.ckpt,
                rd.final,
                rd.search.metrics,
                rd.search.ckpt,
                rd.search.final,
            }
    leftover = [
        p
        for p in GOLDEN_RUN.rglob("*")
        if p.is_file() and not any(p == n or n in p.parents for n in named)
    ]
    assert leftover == [] and len(run.replicate(0).rounds()) == 2


def test_summary_rows_from_done_files_and_the_csv(tmp_path):
    run = rundir.Run(tmp_path)
    for r, level in [(10, 1), (10, 0), (2, 0)]:
        done = {k: float(10 * r + level) for k in rundir.DONE_FIELDS} | {
            "status": "ok",
            "epochs": 2,
        }
        rundir.write_json(run.replicate(r).round(level).done, done)
    run.replicate(2).round(1).path.mkdir()  # unfinished: no row
    rows = rundir.write_summary(run)
    assert [(row["replicate"], row["round"]) for row in rows] == [(2, 0), (10, 0), (10, 1)]
    assert rundir.read_json(run.summary_json) == rows
    with open(run.summary_csv) as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == rundir.SUMMARY_FIELDS
    assert [float(t["test_acc"]) for t in table] == [20.0, 100.0, 101.0]


def test_read_done_checks_fields_and_the_metrics_log(tmp_path):
    rd = rundir.Run(tmp_path).replicate(0).round(0)
    done = {k: 0.5 for k in rundir.DONE_FIELDS} | {"epochs": 2}
    rundir.write_json(rd.done, done)
    rundir.write_jsonl(rd.metrics, [{"epoch": 1}, {"epoch": 2}])
    assert rundir.read_done(rd) == done
    rundir.write_jsonl(rd.metrics, [{"epoch": 1}])
    with pytest.raises(
        rundir.CorruptFileError, match=f"{rd.metrics} does not hold the round's 2 epochs"
    ):
        rundir.read_done(rd)
    rundir.write_json(rd.done, {k: v for k, v in done.items() if k != "test_acc"})
    with pytest.raises(rundir.CorruptFileError, match=f"{rd.done} lacks some of the fields"):
        rundir.read_done(rd)


def test_is_run(tmp_path):
    assert not rundir.is_run(tmp_path)
    rundir.write_json(rundir.Run(tmp_path).config, {})
    assert not rundir.is_run(tmp_path)  # a config alone is not a run yet
    rundir.Run(tmp_path).replicate(0).path.mkdir()
    assert rundir.is_run(tmp_path) and rundir.is_run(GOLDEN_RUN)


def test_provenance_is_appended_one_line_per_invocation(tmp_path):
    run = rundir.Run(tmp_path)
    first = rundir.provenance(device_count=3)
    rundir.append_invocation(run, first)
    rundir.append_invocation(run, rundir.provenance())
    lines = [json.loads(line) for line in run.runs.read_text().splitlines()]
    assert len(lines) == 2 and lines[0] == first and lines[0]["device_count"] == 3
    assert lines[1]["packages"]["jax"] == jax.__version__ and "device_count" not in lines[1]


@pytest.mark.parametrize("algebra", ["quat", "phm4"])
def test_quaternion_kernels_by_name_agree_with_the_masks_module(algebra):
    model = models.create("lenet300_100", algebra, 10, features=(8, 4))
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), (28, 28, 1)))
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    names = [masks.path_str(p) for p in paths]
    assert [rundir.is_kernel(n) for n in names] == [
        n.split("/")[-1] in masks.KERNEL_NAMES for n in names
    ]
    assert [rundir.is_quaternion_kernel(masks.path_str(p)) for p in paths] == [
        masks.is_quaternion(p) for p in paths
    ]
    assert sum(masks.is_hypercomplex(p) for p in paths) == 2  # two hidden layers, a real output
    assert sum(rundir.is_kernel(n) for n in names) == 3  # not PHM's rules, not the biases


def test_load_masks_reads_the_npz_by_parameter_path():
    rd = rundir.Run(GOLDEN_RUN).replicate(0).round(1)
    loaded = rundir.load_masks(rd)
    assert set(loaded) == {"QDense_0/bias", "QDense_0/qkernel", "output/bias", "output/kernel"}
    assert all(m.dtype == np.bool_ for m in loaded.values())
    assert not loaded["QDense_0/qkernel"].all()  # round 1 has pruned weights


def test_text_json_jsonl_round_trip_in_new_folders(tmp_path):
    rundir.write_text(tmp_path / "a" / "t.txt", "quaternions ℍ\nline 2")
    assert (tmp_path / "a" / "t.txt").read_text() == "quaternions ℍ\nline 2"
    obj = {"z": [1, 2.5, None, True], "a": {"nested": "ü", "n": -3}}
    rundir.write_json(tmp_path / "b" / "c" / "o.json", obj)
    assert rundir.read_json(tmp_path / "b" / "c" / "o.json") == obj
    rows = [{"epoch": 1, "loss": 0.25}, {"epoch": 2, "loss": float("1e-30")}]
    rundir.write_jsonl(tmp_path / "m.jsonl", rows)
    assert rundir.read_jsonl(tmp_path / "m.jsonl") == rows
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 2
    rundir.write_jsonl(tmp_path / "empty.jsonl", [])
    assert rundir.read_jsonl(tmp_path / "empty.jsonl") == []
    # nothing but the files asked for: no temporary file is left behind
    assert files(tmp_path) == ["a", "a/t.txt", "b", "b/c", "b/c/o.json", "empty.jsonl", "m.jsonl"]


def test_write_replaces_the_whole_file_and_a_failed_write_keeps_the_old_one(tmp_path):
    path = tmp_path / "f.json"
    rundir.write_json(path, {"long": "x" * 1000})
    rundir.write_json(path, {"s": 1})
    assert path.read_text() == json.dumps({"s": 1}, indent=1) + "\n"  # no tail of the old one
    # a lone surrogate cannot be encoded: the write fails midway, inside the temporary file
    with pytest.raises(UnicodeEncodeError):
        rundir.write_text(path, "partial " * 100 + "\ud800")
    assert rundir.read_json(path) == {"s": 1} and files(tmp_path) == ["f.json"]


@pytest.mark.parametrize(
    "reader,text",
    [
        (rundir.read_json, '{"epoch": 1, "lo'),  # cut mid-write
        (rundir.read_json, ""),
        (rundir.read_jsonl, '{"epoch": 1}\n{"epoch": 2, "lo'),
        (rundir.read_jsonl, '{"epoch": 1}\n[1, 2]\n'),  # valid JSON, but not a row
        (rundir.read_jsonl, '{"epoch": 1}\n\n{"epoch": 2}\n'),
    ],
)
def test_damaged_or_missing_json_raises_corrupt_naming_the_file(tmp_path, reader, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(rundir.CorruptFileError, match=str(path)):
        reader(path)
    with pytest.raises(rundir.CorruptFileError, match=str(tmp_path / "missing.json")):
        reader(tmp_path / "missing.json")


def test_files_are_created_with_the_usual_permissions(tmp_path):
    """Readable by group and others as ``open`` would make them (umask 022), not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        rundir.write_json(tmp_path / "a.json", {})
        ckpt.save_masks(tmp_path / "m.npz", masks.ones({"w": np.zeros(3)}))
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "a.json": 0o644,
        "m.npz": 0o644,
    }
