"""Runs survive kills, a second process, damaged files and divergence, and are reproducible.

A tiny quaternion LeNet-12. A run to be killed, or one expected to stop with an error, is the
real command (``python -m experiments.imp``) in a subprocess; kills land at exact places through
the ``QSPARSE_FAULT`` hook (:func:`qsparse.checkpoints.fault_point`) plus one at a random instant.
All subprocesses share one persistent compilation cache, so only the first one compiles. A run
that goes to its end is the same :func:`qsparse.lottery.run` in this process, which spares a JAX
import each: what it writes must equal, bit for bit, what the killed commands left and resumed.
"""

import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time
import types
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qsparse import checkpoints as ckpt
from qsparse import experiment, lottery, rundir
from qsparse.config import Config, field_types

pytestmark = (
    pytest.mark.subprocess
)  # starts Python processes: skipped by a quick run (-m "not subprocess")

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--model=lenet12",
    "--algebra=quat",
    "--rounds=2",
    "--epochs=3",
    "--train_subset=300",
    "--test_subset=100",
    "--batch_size=60",
    "--checkpoint_every_secs=0",
]
TIMING = {"seconds", "images_per_sec"}


@pytest.fixture(scope="module")
def imp(mnist_dir, modules):
    """Start the command on a workdir in a subprocess: ``imp(workdir, *flags, fault=None,
    wait=True)``."""

    def start(workdir: Path, *flags: str, fault: str | None = None, wait: bool = True):
        args = [*ARGS, f"--data_dir={mnist_dir}", f"--workdir={workdir}", *flags]
        env = modules.env(fault=fault)
        if wait:
            return modules.run("experiments.imp", *args, env=env)
        return modules.start("experiments.imp", *args, env=env)

    return start


@pytest.fixture(scope="module")
def here(mnist_dir):
    """The run the command makes, made in this process: ``here(workdir, *flags)`` returns its log
    lines as stdout and the warnings it logs as stderr (what the command prints)."""
    kinds = field_types()

    def run(workdir: Path, *flags: str) -> types.SimpleNamespace:
        pairs = (f.removeprefix("--").split("=", 1) for f in [*ARGS, *flags])
        config = Config(data_dir=str(mnist_dir), **{k: kinds[k](v) for k, v in pairs})
        lines = []
        warnings = logging.StreamHandler(io.StringIO())
        warnings.setLevel(logging.WARNING)
        logging.getLogger().addHandler(warnings)
        try:
            lottery.run(config, workdir, log=lines.append)
        finally:
            logging.getLogger().removeHandler(warnings)
        return types.SimpleNamespace(stdout="\n".join(lines), stderr=warnings.stream.getvalue())

    return run


def run_dir(workdir: Path) -> Path:
    (only,) = [p for p in workdir.iterdir() if p.is_dir()]
    return only


def rounds(workdir: Path, replicate: int = 0) -> list[Path]:
    return sorted((run_dir(workdir) / f"replicate_{replicate}").glob("round_*"))


def metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rundir.read_jsonl(path)]


def arrays(folder: Path) -> list[np.ndarray]:
    """A checkpoint's arrays read with Orbax alone (no qsparse code on the reading side)."""
    with ocp.StandardCheckpointer() as reader:
        return [np.asarray(x) for x in jax.tree.leaves(reader.restore(folder.absolute()))]


def assert_same_run(a: Path, b: Path, replicate: int = 0) -> None:
    """Bit-identical masks, final params and metrics (timings aside) in every round."""
    ra, rb = rounds(a, replicate), rounds(b, replicate)
    assert [r.name for r in ra] == [r.name for r in rb] == ["round_00", "round_01", "round_02"]
    for x, y in zip(ra, rb):
        with np.load(x / "masks.npz") as mx, np.load(y / "masks.npz") as my:
            assert mx.files == my.files and all(np.array_equal(mx[k], my[k]) for k in mx.files), (
                x.name
            )
        fx, fy = arrays(x / "final"), arrays(y / "final")
        assert len(fx) == len(fy) == 18 and all(np.array_equal(p, q) for p, q in zip(fx, fy)), (
            x.name
        )
        assert metrics(x / "metrics.jsonl") == metrics(y / "metrics.jsonl"), x.name
        assert rundir.read_json(x / "done.json") == rundir.read_json(y / "done.json"), x.name
    assert rundir.read_json(run_dir(a) / "summary.json") == rundir.read_json(
        run_dir(b) / "summary.json"
    )


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def damage(path: Path, how: str) -> None:
    """Flip a byte in the middle of ``path`` (the largest file of a folder), or cut it in half."""
    if path.is_dir():
        path = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(here, tmp_path_factory):
    """The uninterrupted run every other run must equal, bit for bit."""
    workdir = tmp_path_factory.mktemp("reference")
    here(workdir)
    return workdir


def wait_until_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached its fault point"
        time.sleep(0.05)


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # Orbax's loop after a failed read
def test_no_damaged_checkpoint_or_masks_file_reads_back_as_valid(tmp_path, caplog):
    """Flip a byte in, or cut, each file in turn: reading it raises CorruptFileError or returns the
    original exactly (a file the reader does not use); never other data. Orbax alone fails this."""
    tree = {"w": np.arange(3000, dtype=np.float32).reshape(30, 100), "b": np.ones(7, np.float32)}
    good = tmp_path / "good"
    ckpt.save_tree(good, tree, extra={"history": [{"epoch": 1}]})
    caught = 0
    for i, name in enumerate(
        sorted(str(p.relative_to(good)) for p in good.rglob("*") if p.is_file())
    ):
        for how in ("flip", "cut"):
            bad = tmp_path / f"bad_{i}_{how}"
            shutil.copytree(good, bad)
            damage(bad / name, how)
            try:
                back, extra = ckpt.load_tree_extra(bad, tree)
            except rundir.CorruptFileError as e:
                assert str(bad) in str(e)
                caught += 1
                continue
            assert extra == {"history": [{"epoch": 1}]} and all(
                np.array_equal(back[k], tree[k]) for k in tree
            ), name
    assert caught >= 8
    # a folder written before checksums existed is read, with a warning naming it
    (good / ckpt.META).unlink()
    assert np.array_equal(ckpt.load_tree(good, tree)["w"], tree["w"]) and str(good) in caplog.text

    masks = {"a": np.arange(60).reshape(6, 10) % 3 == 0, "b": np.ones(5, bool)}
    ckpt.save_masks(tmp_path / "masks.npz", masks)
    raw = (tmp_path / "masks.npz").read_bytes()
    variants = [raw[:n] for n in range(0, len(raw), 3)]
    variants += [raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :] for i in range(len(raw))]
    for data in variants:
        (tmp_path / "bad.npz").write_bytes(data)
        try:
            back = ckpt.load_masks(tmp_path / "bad.npz", masks)
        except rundir.CorruptFileError:
            continue
        assert all(np.array_equal(back[k], masks[k]) for k in masks)


def test_second_process_is_refused_then_killed_run_resumes(imp, here, reference, tmp_path):
    # the first process freezes itself after epoch 2 of round 0, holding the run's lock
    first = imp(tmp_path, fault="epoch_end:2:STOP", wait=False)
    wait_until_stopped(first)
    before = snapshot(tmp_path)
    second = imp(tmp_path)
    assert second.returncode == 1 and second.stdout == ""
    lines = second.stderr.splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: run directory")
        and "in use by another process" in lines[0]
    )
    assert f"pid {first.pid}" in lines[0]
    assert snapshot(tmp_path) == before  # the refused process wrote nothing
    # now kill the first mid-round: epoch 2 is in metrics.jsonl but only epoch 1 was checkpointed
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    rd = rounds(tmp_path)[0]
    assert len(rundir.read_jsonl(rd / "metrics.jsonl")) == 2 and ckpt.EpochCheckpoints(
        rd / "ckpt"
    ).epochs() == [1]
    # the command's flags name the run, and store the config, that this process's runs have
    assert run_dir(tmp_path).name == run_dir(reference).name
    assert rundir.read_json(run_dir(tmp_path) / "config.json") == rundir.read_json(
        run_dir(reference) / "config.json"
    )
    assert "round 0: resuming after epoch 1" in here(tmp_path).stdout
    assert_same_run(reference, tmp_path)


def test_killed_at_each_point_and_restarted_equals_uninterrupted(imp, here, reference, tmp_path):
    def killed(fault):
        result = imp(tmp_path, fault=fault)
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr)
        return rounds(tmp_path)

    # inside the write of round 0's epoch-2 checkpoint (write 1 is θ₀): complete but not renamed
    rd = killed("checkpoint_write:3")[0]
    assert (rd / "ckpt" / ".epoch_0002.tmp").is_dir() and ckpt.EpochCheckpoints(
        rd / "ckpt"
    ).epochs() == [1]
    # between rounds: round 0 done, round 1 not started
    rds = killed("round_end:1")
    assert [r.name for r in rds] == ["round_00"] and (rds[0] / "done.json").exists()
    # inside the write of round 1's final state (after its 3 epoch checkpoints)
    rd = killed("checkpoint_write:4")[1]
    assert (
        (rd / ".final.tmp").is_dir()
        and not (rd / "final").exists()
        and not (rd / "done.json").exists()
    )
    # at a random instant once round 2 has started (it may also finish first)
    proc = imp(tmp_path, wait=False)
    metrics_2 = run_dir(tmp_path) / "replicate_0" / "round_02" / "metrics.jsonl"
    while not metrics_2.exists() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL)
    here(tmp_path)
    assert_same_run(reference, tmp_path)


def test_replicates_trained_together_resume_bit_identical(imp, here, tmp_path_factory):
    """--replicates=2 trains both in one compiled epoch; kills that leave the two replicates at
    different points (one's checkpoint written, the other's not; one's round done, the other's
    not) resume to the uninterrupted run bit for bit: slot r always trains replicate r."""
    reference = tmp_path_factory.mktemp("reference_2")
    here(reference, "--replicates=2")
    workdir = tmp_path_factory.mktemp("killed_2")

    def killed(fault):
        result = imp(workdir, "--replicates=2", fault=fault)
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr)
        return [rounds(workdir, r) for r in (0, 1)]

    # writes 1-2 are the two θ₀; write 4 is replicate 1's epoch-1 checkpoint, replicate 0's is done
    (rd0, *_), (rd1, *_) = killed("checkpoint_write:4")
    assert (
        ckpt.EpochCheckpoints(rd0 / "ckpt").epochs() == [1]
        and ckpt.EpochCheckpoints(rd1 / "ckpt").epochs() == []
    )
    # the two train at different epochs of round 0 side by side; killed in round 1's first epoch
    killed("epoch_end:7")
    # counted from this restart: rounds 1 of both, then replicate 0's round 2 done, not 1's
    r0, r1 = killed("round_end:3")
    assert (r0[2] / "done.json").exists() and not (r1[2] / "done.json").exists()
    here(workdir, "--replicates=2")
    for r in (0, 1):
        assert_same_run(reference, workdir, replicate=r)
    assert len(rundir.read_json(run_dir(workdir) / "summary.json")) == 6


def test_damaged_files_are_named_and_recomputed(here, reference, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    rep = run_dir(tmp_path) / "replicate_0"
    r0, r1, r2 = rounds(tmp_path)
    damaged = [
        rep / "init",
        r0 / "final",
        r1 / "masks.npz",
        r1 / "metrics.jsonl",
        r2 / "done.json",
        r2 / "ckpt" / "epoch_0003",
    ]
    for path, how in zip(damaged, ["flip", "flip", "cut", "cut", "flip", "flip"]):
        damage(path, how)
    shutil.rmtree(r2 / "final")  # so round 2 must go back to its (damaged) latest epoch checkpoint
    result = here(tmp_path)
    for path in damaged:
        assert str(path) in result.stderr, path
    assert "round 2: resuming after epoch 2" in result.stdout
    assert_same_run(reference, tmp_path)


def test_damaged_config_stops_the_run_naming_it(imp, reference, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    config = run_dir(tmp_path) / "config.json"
    damage(config, "cut")
    before = snapshot(tmp_path)
    result = imp(tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()] and str(config) in result.stderr
    assert result.stderr.startswith("error: ")
    assert snapshot(tmp_path) == before


def test_checkpoints_of_another_model_stop_the_run_and_stay(imp, reference, tmp_path):
    """A run whose θ₀ another model wrote (another qsparse version, say) is not damage: the run
    stops with one line naming the checkpoint and no file is recomputed or deleted."""
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    init = run_dir(tmp_path) / "replicate_0" / "init"
    ckpt.save_tree(init, {"Dense_0": {"kernel": np.zeros((784, 8), np.float32)}})
    replicate = init.parent
    before = snapshot(replicate)
    result = imp(tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"error: checkpoint {init} holds 1 arrays where this model")
    assert snapshot(replicate) == before  # the invocation itself is recorded (runs.jsonl)


def test_nonfinite_loss_stops_the_round_and_is_reported(here, tmp_path):
    result = here(tmp_path, "--lr=1e30")
    assert "non-finite loss in replicate 0 round 0" in result.stdout
    assert "non-finite loss or weights in epoch 1" in result.stderr
    (rd,) = rounds(tmp_path)  # no further rounds
    rows = rundir.read_jsonl(rd / "metrics.jsonl")
    assert (
        len(rows) == 1 and rows[0]["nonfinite"] is True and not np.isfinite(rows[0]["train_loss"])
    )
    assert rundir.read_json(rd / "done.json")["status"] == "nonfinite"
    assert [r["status"] for r in rundir.read_json(run_dir(tmp_path) / "summary.json")] == [
        "nonfinite"
    ]
    # killed before the round's end: the resumed run does not train past the divergence
    (rd / "done.json").unlink()
    shutil.rmtree(rd / "final")
    again = here(tmp_path, "--lr=1e30")
    assert "resuming after epoch 1" in again.stdout and "epoch   2/3" not in again.stdout
    assert rundir.read_json(rd / "done.json")["status"] == "nonfinite"


def test_same_seed_identical_other_seed_different_and_provenance(
    here, reference, mnist_dir, tmp_path
):
    here(tmp_path / "same")
    here(tmp_path / "other", "--seed=1")
    assert_same_run(reference, tmp_path / "same")
    ref, oth = rounds(reference), rounds(tmp_path / "other")
    with np.load(ref[1] / "masks.npz") as a, np.load(oth[1] / "masks.npz") as b:
        assert any(not np.array_equal(a[k], b[k]) for k in a.files)
    assert metrics(ref[0] / "metrics.jsonl") != metrics(oth[0] / "metrics.jsonl")
    # provenance: the full config, package versions, devices and the qsparse commit
    stored = rundir.read_json(run_dir(reference) / "config.json")
    assert set(stored) == set(Config.__dataclass_fields__)
    assert Config.from_json(stored) == experiment.resolve(
        Config(
            model="lenet12",
            algebra="quat",
            rounds=2,
            epochs=3,
            train_subset=300,
            test_subset=100,
            batch_size=60,
            checkpoint_every_secs=0,
            data_dir=str(mnist_dir),
        )
    )
    info = json.loads((run_dir(reference) / "runs.jsonl").read_text().splitlines()[0])
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert info["packages"][name] == metadata.version(name)
    assert info["device_kind"] == jax.local_devices()[0].device_kind
    assert info["device_count"] == jax.local_device_count()
    assert re.fullmatch("[0-9a-f]{40}", info["git_commit"]) and isinstance(info["git_dirty"], bool)
    kind = subprocess.run(
        ["git", "cat-file", "-t", info["git_commit"]], cwd=REPO, capture_output=True, text=True
    )
    assert kind.stdout.strip() == "commit"
