"""qsparse.files: atomic writes keep the old file on failure, and new files get open()'s mode."""

import errno
import os
import stat

import pytest

from qsparse import files


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
