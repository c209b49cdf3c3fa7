"""qsparse.files: atomic writes keep the old file on failure, new files get open()'s mode, and a
run, every file of which is written through it, stops on a full disk with one line and resumes."""

import collections
import contextlib
import errno
import os
import re
import resource
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
from test_faults import assert_same_run

from qsparse import checkpoints as ckpt
from qsparse import data, files, lottery
from qsparse.config import Config


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_text_replaces_whole_with_the_umask_mode(tmp_path, umask):
    path = tmp_path / "a" / "b.txt"
    files.write_text(path, "one")
    files.write_text(path, "two")
    assert path.read_text() == "two"
    assert mode(path) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / "b.bin"
    files.write_bytes(path, b"old")

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(files.WriteError) as e:
        files.atomic_write(path, full)
    assert str(e.value) == f"cannot write {path}: No space left on device"
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["b.bin"]


def test_atomic_dir_swaps_whole_or_not_at_all(tmp_path, umask):
    dest = tmp_path / "out"
    with files.atomic_dir(dest) as d:
        (d / "x").write_text("1")
    assert mode(dest) == 0o777 & ~umask
    with pytest.raises(RuntimeError), files.atomic_dir(dest) as d:
        (d / "y").write_text("2")
        raise RuntimeError("stop")
    assert sorted(p.name for p in dest.iterdir()) == ["x"]
    with files.atomic_dir(dest) as d:
        (d / "z").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in dest.iterdir()) == ["z"]


def test_check_writable(tmp_path):
    files.check_writable(tmp_path / "new" / "deeper")
    (tmp_path / "file").write_text("")
    files.check_writable(tmp_path / "file")  # replacing a file is writing its folder
    with pytest.raises(files.WriteError, match="is not a directory"):
        files.check_writable(tmp_path / "file" / "below")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match=f"cannot write the output: {ro} is not writable"):
            files.check_writable(ro / "x", ValueError, "the output")


# -- every file of a run, under a umask; a run whose disk fills up --------------------------------

SIZE = dict(rounds=2, epochs=2, train_subset=300, test_subset=100, batch_size=60)


@contextlib.contextmanager
def umask_set(value):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def kinds(root):
    """Each file under ``root`` by its kind: the name, with digits and Orbax's hashes blanked."""
    out = collections.defaultdict(list)
    for p in root.rglob("*"):
        if p.is_file():
            kind = "events" if p.name.startswith("events.out.tfevents") else p.name
            if p.parent.name == "d":  # Orbax's array data files are named by their hash
                kind = "ocdbt data"
            out[re.sub(r"\d", "#", kind)].append(p)
    return out


def contents(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny(mnist_dir, tmp_path_factory):
    """An uninterrupted tiny run made under umask 0o027: ``(config, workdir)``."""
    config = Config(model="lenet12", algebra="quat", data_dir=str(mnist_dir), **SIZE)
    workdir = tmp_path_factory.mktemp("uninterrupted")
    with umask_set(0o027):
        lottery.run(config, workdir, log=lambda s: None)
    return config, workdir


def assert_modes(root, umask):
    """Every file of every kind a run writes has open()'s mode (0o666 less the umask)."""
    found = kinds(root)
    expected = {"config.json", "runs.jsonl", "summary.json", "summary.csv", ".lock", "events"}
    expected |= {"masks.npz", "sparsity.json", "metrics.jsonl", "done.json", ckpt.META}
    expected |= {"ocdbt data", "manifest.ocdbt", "_METADATA", "_CHECKPOINT_METADATA"}
    assert expected <= set(found), sorted(expected - set(found))
    wrong = {str(p): oct(mode(p)) for ps in found.values() for p in ps if mode(p) != 0o666 & ~umask}
    assert not wrong, wrong
    folders = [p for p in root.rglob("*") if p.is_dir()]
    assert all(mode(p) == 0o777 & ~umask for p in folders), {
        str(p): oct(mode(p)) for p in folders if mode(p) != 0o777 & ~umask
    }


def test_every_file_of_a_run_has_the_umask_mode(tiny):
    assert_modes(tiny[1], 0o027)


def test_dataset_cache_has_the_umask_mode_and_a_failed_write_leaves_none(
    mnist_dir, tmp_path, monkeypatch
):
    """The .npz cache, written from tfds's prepared data (read as a few examples, to be quick);
    a refused write leaves no cache behind, and a cache written later has open()'s mode."""
    shutil.copytree(mnist_dir / "mnist" / "mnist", tmp_path / "mnist" / "mnist")
    split = (np.zeros((3, 28, 28, 1), np.uint8), np.arange(3, dtype=np.int32))
    monkeypatch.setattr(data, "_read_split", lambda builder, name: split)
    with disk_full(), pytest.raises(files.WriteError) as e:
        data.load("mnist", data_dir=tmp_path)
    (cache,) = re.fullmatch(r"cannot write (\S+): File too large", str(e.value)).groups()
    assert Path(cache).parent == tmp_path / "mnist" and cache.endswith(".npz")
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == ["mnist"]
    with umask_set(0o002):
        data.load("mnist", data_dir=tmp_path)
    assert mode(cache) == 0o664
    with np.load(cache) as arrays:
        assert np.array_equal(arrays["test_labels"], split[1])


@contextlib.contextmanager
def disk_full(limit=0):
    """From here on, no file of this process may grow past ``limit`` bytes (RLIMIT_FSIZE): every
    write the process makes, in Python or in TensorStore's C++, is refused by the kernel as a
    full disk would refuse it (EFBIG, 'File too large', standing in for ENOSPC, which needs a
    real small filesystem: root). SIGXFSZ, which would kill the process, is ignored meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# The write that follows each fault point of a tiny run (qsparse.checkpoints.fault_point), in the
# order the run reaches them: after epoch 1 of round 0 is logged, its Orbax checkpoint; after
# round 0 is done, round 1's masks.
NEXT_WRITE = {
    "epoch_end": "replicate_0/round_00/ckpt/epoch_0001",
    "round_end": "replicate_0/round_01/masks.npz",
}


# Orbax's asyncio loop, closed by the refused write, reports its pending callbacks as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_stops_the_run_naming_the_file_and_a_rerun_resumes(tiny, tmp_path, monkeypatch):
    """The disk fills at a fault point: one line names the file and nothing written before is
    touched. Rerun, the run fills the disk at the next point; rerun with space, it ends where
    the uninterrupted run ends, bit for bit."""
    config, reference = tiny
    for point, target in NEXT_WRITE.items():
        before = {}
        stack = contextlib.ExitStack()

        def fill(name, point=point, before=before, stack=stack):
            if name == point and not before:
                before.update(contents(tmp_path))
                stack.enter_context(disk_full())

        monkeypatch.setattr(ckpt, "fault_point", fill)
        with stack, umask_set(0o002), pytest.raises(files.WriteError) as e:
            lottery.run(config, tmp_path, log=lambda s: None)
        (run,) = tmp_path.iterdir()
        assert str(e.value) == f"cannot write {run / target}: File too large"
        assert contents(tmp_path) == before  # no file changed, none half written, no temporaries
    monkeypatch.undo()
    with umask_set(0o002):
        lottery.run(config, tmp_path, log=lambda s: None)
    assert_same_run(reference, tmp_path)
    assert_modes(tmp_path, 0o002)
