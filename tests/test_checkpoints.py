"""qsparse.checkpoints on tiny pytrees: atomic text/JSON/JSONL writes, masks files, checksummed
Orbax trees, per-epoch checkpoints with fallback, the run lock, the writer-only rule and the
fault hook (with ``os.kill`` replaced: nothing is really killed)."""

import builtins
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import checkpoints as ckpt
from qsparse import masks as M
from qsparse import models, rundir, train
from qsparse.files import WriteError

# Orbax's event loop may report an exception after a failed read (as in tests/test_faults.py)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def run_lock(run_dir):
    return ckpt.RunLock(rundir.Run(run_dir).lock)


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def same_bits(a, b):
    """Same tree structure, and every leaf of the same dtype, shape and bytes."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.shape(x) == np.shape(y)
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def small_tree(value=0.0):
    return {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4) + value,
        "b": {"x": np.array([1, -2, 3], np.int32), "m": np.array([True, False])},
    }


# ------------------------------------------------------------------ masks files


def tiny_masks():
    rng = np.random.default_rng(0)
    return {
        "QDense_0": {"qkernel": rng.random((4, 5, 3)) < 0.5, "bias": np.ones(12, bool)},
        "output": {"kernel": rng.random((12, 2)) < 0.5, "bias": np.ones(2, bool)},
    }


def test_masks_round_trip_and_are_readable_with_numpy_alone(tmp_path):
    masks = tiny_masks()
    path = tmp_path / "r" / "masks.npz"
    ckpt.save_masks(path, masks)
    back = ckpt.load_masks(path, M.ones(masks))
    assert same_bits(back, masks)
    with np.load(path) as f:
        assert sorted(f.files) == [
            "QDense_0/bias",
            "QDense_0/qkernel",
            "output/bias",
            "output/kernel",
        ]
        assert np.array_equal(f["QDense_0/qkernel"], masks["QDense_0"]["qkernel"])
    ckpt.save_masks(path, jax.tree.map(np.logical_not, masks))  # replaced, no temporaries
    assert same_bits(ckpt.load_masks(path, masks), jax.tree.map(np.logical_not, masks))
    assert files(tmp_path) == ["r", "r/masks.npz"]


def test_masks_are_deflated_and_uncompressed_files_still_load(tmp_path):
    rng = np.random.default_rng(1)
    masks = {"dense": {"kernel": rng.random((300, 100)) < 0.1, "bias": np.ones(100, bool)}}
    ckpt.save_masks(tmp_path / "new.npz", masks)
    with zipfile.ZipFile(tmp_path / "new.npz") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    raw = masks["dense"]["kernel"].nbytes + masks["dense"]["bias"].nbytes
    assert (tmp_path / "new.npz").stat().st_size < raw / 3
    np.savez(tmp_path / "old.npz", **M.by_path(masks))  # as versions before compression wrote them
    for name in ("new.npz", "old.npz"):
        assert same_bits(ckpt.load_masks(tmp_path / name, M.ones(masks)), masks)


def test_masks_file_of_other_params_or_damaged_raises_corrupt(tmp_path):
    masks = tiny_masks()
    path = tmp_path / "masks.npz"
    ckpt.save_masks(path, masks)
    other_shape = {**masks, "output": {**masks["output"], "kernel": np.ones((12, 3), bool)}}
    more_leaves = {**masks, "extra": {"kernel": np.ones(2, bool)}}
    for like in (other_shape, more_leaves):
        with pytest.raises(rundir.CorruptFileError, match=f"{path}.*(output|extra)/kernel"):
            ckpt.load_masks(path, like)
    np.savez(tmp_path / "uint8.npz", **M.by_path(masks, np.uint8))
    with pytest.raises(rundir.CorruptFileError, match="wrong shape/dtype"):
        ckpt.load_masks(tmp_path / "uint8.npz", masks)
    (tmp_path / "text.npz").write_text("not a zip")
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    for name in ("text.npz", "cut.npz", "missing.npz"):
        with pytest.raises(rundir.CorruptFileError, match=str(tmp_path / name)):
            ckpt.load_masks(tmp_path / name, masks)


# ------------------------------------------------------------------ Orbax trees


def test_train_state_round_trips_bit_for_bit(tmp_path):
    model = models.create("lenet12", "quat", features=(4,))
    params = models.init_params(model, jax.random.key(0), (4, 4, 1))
    masks = jax.tree.map(lambda p: np.random.default_rng(1).random(p.shape) < 0.7, params)
    like = train.create_train_state(model, params, masks, train.make_optimizer("adam", 1e-3))
    # every leaf made distinct from the fresh state, so a restore that returns `like` fails
    rng = np.random.default_rng(2)
    state = jax.tree.map(
        lambda x: (
            rng.normal(size=x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        ),
        like,
    )
    state = state.replace(step=jnp.int32(7), masks=jax.tree.map(np.logical_not, masks))
    extra = {"history": [{"epoch": 1, "acc": 0.5}], "note": "ü"}
    ckpt.save_tree(tmp_path / "s", state, extra)
    back, back_extra = ckpt.load_tree_extra(tmp_path / "s", like)
    assert same_bits(back, state) and not same_bits(back, like) and back_extra == extra
    assert isinstance(back, train.TrainState) and int(back.step) == 7
    x = jnp.linspace(-1, 1, 2 * 16).reshape(2, 4, 4, 1)
    np.testing.assert_array_equal(
        back.apply_fn({"params": back.params}, x), model.apply({"params": state.params}, x)
    )
    assert same_bits(ckpt.load_tree(tmp_path / "s", like), state)


def test_save_tree_replaces_a_folder_whole_and_leaves_no_temporaries(tmp_path):
    ckpt.save_tree(tmp_path / "t", small_tree(0.0), {"v": 1})
    ckpt.save_tree(tmp_path / "t", small_tree(5.0), {"v": 2})
    back, extra = ckpt.load_tree_extra(tmp_path / "t", small_tree())
    assert same_bits(back, small_tree(5.0)) and extra == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_a_refused_save_whose_other_writes_land_late_leaves_no_temporaries(tmp_path, monkeypatch):
    """Orbax raises at the first refused array write while the save's other writes are still in
    flight; one landing after the first clean-up is cleaned up too."""
    late = []

    class RefusingCheckpointer(contextlib.AbstractContextManager):
        def __exit__(self, *exc):
            return None

        def save(self, tmp, tree):
            def write_late():
                time.sleep(0.05)
                d = tmp.with_name(f"{tmp.name}.orbax-checkpoint-tmp-1") / "ocdbt.process_0" / "d"
                d.mkdir(parents=True)
                (d / "part").write_bytes(b"late")

            late.append(threading.Thread(target=write_late))
            late[0].start()
            raise ValueError("Error writing: No space left on device [os_error_code=28]")

    monkeypatch.setattr(ckpt, "_checkpointer", RefusingCheckpointer)
    with pytest.raises(WriteError, match="No space left on device"):
        ckpt.save_tree(tmp_path / "t", small_tree(0.0))
    late[0].join()
    assert list(tmp_path.iterdir()) == []


def test_checksum_covers_the_extra_and_the_arrays(tmp_path):
    ckpt.save_tree(tmp_path / "a", small_tree(0.0), {"history": [{"epoch": 1}]})
    ckpt.save_tree(tmp_path / "b", small_tree(1.0), {"history": [{"epoch": 1}]})
    meta = tmp_path / "a" / ckpt.META
    good = meta.read_text()
    rundir.write_json(meta, {**json.loads(good), "extra": {"history": [{"epoch": 2}]}})
    with pytest.raises(rundir.CorruptFileError, match=f"{tmp_path / 'a'} fails its checksum"):
        ckpt.load_tree_extra(tmp_path / "a", small_tree())
    # the other folder's (valid) checksum file does not vouch for these arrays
    meta.write_text((tmp_path / "b" / ckpt.META).read_text())
    with pytest.raises(rundir.CorruptFileError, match=str(tmp_path / "a")):
        ckpt.load_tree(tmp_path / "a", small_tree())
    meta.write_text(good)
    assert same_bits(ckpt.load_tree(tmp_path / "a", small_tree()), small_tree(0.0))


def test_load_tree_into_another_structure_fails_naming_the_folder(tmp_path):
    ckpt.save_tree(tmp_path / "t", small_tree())
    fewer = {"w": small_tree()["w"]}
    wider = {**small_tree(), "w": np.zeros((3, 5), np.float32)}
    for like in (fewer, wider):  # other arrays: another model wrote it, not damage
        with pytest.raises(ckpt.CheckpointMismatchError, match=f"{tmp_path / 't'} holds 3 arrays"):
            ckpt.load_tree(tmp_path / "t", like)
    # the same arrays in another container: Orbax cannot restore it
    with pytest.raises(rundir.CorruptFileError, match=f"{tmp_path / 't'}.*do not match"):
        ckpt.load_tree(tmp_path / "t", [small_tree()["w"], small_tree()["b"]])
    with pytest.raises(rundir.CorruptFileError, match=str(tmp_path / "missing")):
        ckpt.load_tree(tmp_path / "missing", small_tree())
    assert same_bits(ckpt.load_tree(tmp_path / "t", small_tree()), small_tree())  # unharmed


# ------------------------------------------------------------------ per-epoch checkpoints


def history(epoch):
    return [{"epoch": e, "loss": 1.0 / e} for e in range(1, epoch + 1)]


def test_epoch_checkpoints_keep_the_newest_and_restore_the_latest(tmp_path):
    manager = ckpt.EpochCheckpoints(tmp_path / "ckpt", max_to_keep=2)
    assert manager.restore_latest(small_tree()) is None  # the folder does not even exist yet
    for epoch in range(1, 6):
        manager.save(epoch, small_tree(epoch), history(epoch))
        assert manager.epochs() == list(range(max(1, epoch - 1), epoch + 1))
    # an interrupted save and a deletion in progress are not committed epochs
    (tmp_path / "ckpt" / ".epoch_0006.tmp").mkdir()
    (tmp_path / "ckpt" / ".epoch_0003.deleting").mkdir()
    (tmp_path / "ckpt" / "epoch_notes").write_text("")
    assert manager.epochs() == [4, 5]
    epoch, state, hist = manager.restore_latest(small_tree())
    assert epoch == 5 and same_bits(state, small_tree(5)) and hist == history(5)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("epoch_0*")) == [
        "epoch_0004",
        "epoch_0005",
    ]


def test_restore_latest_for_another_model_raises_and_deletes_nothing(tmp_path):
    manager = ckpt.EpochCheckpoints(tmp_path / "ckpt")
    for epoch in (1, 2):
        manager.save(epoch, small_tree(epoch), history(epoch))
    other = {**small_tree(), "w": np.zeros((4, 4), np.float32)}
    with pytest.raises(ckpt.CheckpointMismatchError, match="epoch_0002 holds 3 arrays"):
        manager.restore_latest(other)
    assert manager.epochs() == [1, 2]
    epoch, state, _ = manager.restore_latest(small_tree())
    assert epoch == 2 and same_bits(state, small_tree(2))


def test_restore_latest_falls_back_past_damaged_checkpoints_and_deletes_them(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    manager = ckpt.EpochCheckpoints(directory, max_to_keep=10)
    for epoch in range(1, 4):
        manager.save(epoch, small_tree(epoch), history(epoch))
    manager.save(4, small_tree(4), history(3))  # its history does not end at epoch 4
    meta = directory / "epoch_0003" / ckpt.META
    rundir.write_json(meta, {**rundir.read_json(meta), "sha256": "0" * 64})
    epoch, state, hist = manager.restore_latest(small_tree())
    assert epoch == 2 and same_bits(state, small_tree(2)) and hist == history(2)
    assert manager.epochs() == [1, 2] and sorted(p.name for p in directory.iterdir()) == [
        "epoch_0001",
        "epoch_0002",
    ]
    assert str(directory / "epoch_0003") in caplog.text and "epoch_0004" in caplog.text
    for epoch in (1, 2):  # every one damaged: nothing to resume from, nothing kept
        (directory / f"epoch_{epoch:04d}" / ckpt.META).write_text("{")
    assert manager.restore_latest(small_tree()) is None and manager.epochs() == []


# ------------------------------------------------------------------ run lock


def test_run_lock_refuses_a_second_holder_and_is_released_on_exit(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        assert (run_dir / ".lock").read_text() == str(os.getpid())
        with pytest.raises(ckpt.RunLockedError, match=f"{run_dir} is in use .*pid {os.getpid()}"):
            with run_lock(run_dir):
                pass
    with run_lock(run_dir) as lock:  # released: taken again at once
        assert lock._fd is not None
    with pytest.raises(RuntimeError):  # released on an exception too
        with run_lock(run_dir):
            raise RuntimeError("boom")
    with run_lock(run_dir):
        pass


def test_run_lock_held_by_another_process_until_it_dies(tmp_path):
    """A child (plain Python, no jax) takes the same flock; killing it frees the directory."""
    lock_file = tmp_path / ".lock"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(lock_file)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.RunLockedError, match=f"{tmp_path} .*pid {child.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        child.kill()
        child.wait(timeout=10)
    with run_lock(tmp_path):
        assert lock_file.read_text() == str(os.getpid())


# ------------------------------------------------------------------ writer rule, fault hook


def writer(monkeypatch, value):
    for module in (ckpt, rundir):
        monkeypatch.setattr(module, "is_writer", lambda: value)


def test_a_process_other_than_0_writes_nothing(tmp_path, monkeypatch):
    writer(monkeypatch, False)
    out = tmp_path / "out"
    rundir.write_text(out / "a.txt", "x")
    rundir.write_json(out / "a.json", {})
    rundir.write_jsonl(out / "a.jsonl", [{}])
    ckpt.save_masks(out / "m.npz", tiny_masks())
    ckpt.save_tree(out / "t", small_tree())
    ckpt.EpochCheckpoints(out / "ckpt").save(1, small_tree(), history(1))
    with run_lock(out):
        pass
    assert not out.exists()
    # and it does not delete what process 0 wrote
    writer(monkeypatch, True)
    manager = ckpt.EpochCheckpoints(out / "ckpt", max_to_keep=1)
    manager.save(1, small_tree(1), history(1))
    writer(monkeypatch, False)
    manager.save(2, small_tree(2), history(2))
    assert manager.epochs() == [1]


def test_fault_point_fires_only_at_its_name_and_count(monkeypatch):
    kills = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setattr(ckpt, "_fault_counts", {})
    monkeypatch.delenv(ckpt.FAULT_ENV, raising=False)
    ckpt.fault_point("epoch_end")
    monkeypatch.setenv(ckpt.FAULT_ENV, "checkpoint_write:1")
    for _ in range(3):
        ckpt.fault_point("epoch_end")
    assert kills == [] and ckpt._fault_counts == {}
    monkeypatch.setenv(ckpt.FAULT_ENV, "epoch_end:3")
    for i in range(5):
        ckpt.fault_point("epoch_end")
        ckpt.fault_point("round_end")
        assert kills == ([(os.getpid(), signal.SIGKILL)] if i >= 2 else []), i
    monkeypatch.setattr(ckpt, "_fault_counts", {})
    kills.clear()
    monkeypatch.setenv(ckpt.FAULT_ENV, "round_end:1:STOP")
    ckpt.fault_point("round_end")
    assert kills == [(os.getpid(), signal.SIGSTOP)]


def test_a_refused_orbax_write_names_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    """ENOSPC on the files Orbax writes through Python (its metadata) comes out as a one-line
    WriteError naming the checkpoint folder; the previous checkpoint and no temporary remain."""
    path = tmp_path / "t"
    ckpt.save_tree(path, small_tree(1.0))
    real_open = builtins.open

    def full(file, mode="r", *args, **kwargs):
        if str(tmp_path) in str(file) and any(c in mode for c in "wax"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(WriteError) as e:
        ckpt.save_tree(path, small_tree(2.0))
    monkeypatch.undo()
    assert str(e.value) == f"cannot write {path}: No space left on device"
    assert same_bits(ckpt.load_tree(path, small_tree()), small_tree(1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["t"]
