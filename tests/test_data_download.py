"""Datasets for users who are online: absent archives are downloaded (here from a server on
127.0.0.1, never the internet), checked byte for byte, and refused fast, in one line, when the
host cannot be reached; offline never opens a connection; a cloud data_dir (gs://) stays the
string it is on its way to tfds.

The suite runs offline (conftest sets QSPARSE_OFFLINE), so each download here asks for it.
"""

import functools
import http.server
import io
import os
import shutil
import socket
import tarfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qsparse import data, experiment
from qsparse.config import Config
from qsparse.datasets import archives

CIFAR10 = data.DATASETS["cifar10"].archives[0]


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "served"``; records the paths asked."""
    folder = tmp_path / "served"
    folder.mkdir()
    asked = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            asked.append(self.path)

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=folder)
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield types.SimpleNamespace(
            folder=folder, url=f"http://127.0.0.1:{httpd.server_port}", asked=asked
        )
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def closed_port():
    """A local URL on which nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mirror"


class NetworkAccessAttempted(RuntimeError):
    """Raised by the blocked sockets; not an OSError, so nothing retries or hides it."""


@pytest.fixture
def no_connections(monkeypatch):
    """Any lookup or connection raises at once."""

    def refuse(*args, **kwargs):
        raise NetworkAccessAttempted(f"network access attempted: {args[:2]}")

    for owner, name in (
        (socket, "getaddrinfo"),
        (socket, "create_connection"),
        (socket.socket, "connect"),
        (socket.socket, "connect_ex"),
    ):
        monkeypatch.setattr(owner, name, refuse)


def tiny_cifar10() -> bytes:
    """A CIFAR-10 archive in the original binary format with 3 images: not the original."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in [
            ("batches.meta.txt", b"airplane\nautomobile\n"),
            ("data_batch_1.bin", bytes(3 * (1 + 32 * 32 * 3))),
        ]:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def listing(folder) -> list[str]:
    """Every file and folder under ``folder``, relative (empty if it does not exist)."""
    return sorted(
        os.path.relpath(os.path.join(root, n), folder)
        for root, dirs, files in os.walk(folder)
        for n in dirs + files
    )


# --- downloads --------------------------------------------------------------------------------


def test_absent_archives_are_downloaded_and_built(server, mnist_dir, tmp_path, monkeypatch):
    """MNIST's archives served by the local mirror named in $QSPARSE_DOWNLOAD_URL: downloaded
    into the empty manual_dir, byte for byte, before tfds is asked to build from that folder.
    (The build itself, the session's MNIST from the same archives, stands in for tfds's here:
    building 70,000 images again would only time tfds.)"""
    mirror = server.folder / "mnist"
    mirror.mkdir()
    for archive in data.DATASETS["mnist"].archives:
        (mirror / archive.filename).write_bytes(
            (data.SHIPPED_MNIST_DIR / archive.filename).read_bytes()
        )
    monkeypatch.setenv(archives.URL_ENV, f"{server.url}/mnist/")
    monkeypatch.delenv(archives.OFFLINE_ENV)
    manual = tmp_path / "manual"
    builds = []

    def build(builder, download_config):
        """tfds's build, done already for the session: the manual_dir it was given, recorded."""
        folder = Path(download_config.manual_dir)
        builds.append({f: (folder / f).read_bytes() for f in os.listdir(folder)})
        shutil.copytree(
            mnist_dir / "mnist" / "mnist", Path(builder.data_dir).parent, dirs_exist_ok=True
        )
        builder.info.read_from_directory(builder.data_dir)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", build)
    ds = data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)

    filenames = sorted(a.filename for a in data.DATASETS["mnist"].archives)
    assert sorted(server.asked) == [f"/mnist/{f}" for f in filenames]
    assert sorted(os.listdir(manual)) == filenames  # no temporary file left beside them
    assert builds == [{f: (mirror / f).read_bytes() for f in filenames}]
    reference = data.load("mnist", data_dir=mnist_dir)
    assert ds.train_images.shape == (60000, 28, 28, 1)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(ds, field), getattr(reference, field))

    server.asked.clear()  # prepared now: a second load asks nothing and builds nothing
    data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual, test_subset=10)
    assert server.asked == [] and len(builds) == 1


def test_served_bytes_that_are_not_the_original_are_refused(server, tmp_path):
    """A well-formed CIFAR-10 archive of 3 images is not the original: refused by its size and
    sha256, and not left in manual_dir."""
    (server.folder / CIFAR10.filename).write_bytes(tiny_cifar10())
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load("cifar10", data_dir=tmp_path / "data", offline=False, download_url=server.url)
    message = str(err.value)
    assert server.asked == [f"/{CIFAR10.filename}"]
    for needle in (
        f"{server.url}/{CIFAR10.filename}: served {len(tiny_cifar10()):,} bytes",
        f"not the original {CIFAR10.filename} ({CIFAR10.size:,} bytes, sha256 {CIFAR10.sha256})",
        "cifar-10-binary.tar.gz  (missing;",
    ):
        assert needle in message
    manual = tmp_path / "data" / "cifar10" / "downloads" / "manual"
    assert listing(manual) == []


def test_http_error_is_one_line_naming_the_url(server, tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load("cifar10", data_dir=tmp_path / "data", offline=False, download_url=server.url)
    assert f"could not be downloaded ({server.url}/{CIFAR10.filename}: HTTP 404" in str(err.value)


def test_unreachable_host_fails_fast_and_writes_nothing(closed_port, tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load("cifar10", data_dir=tmp_path / "data", offline=False, download_url=closed_port)
    assert time.perf_counter() - start < 3
    message = str(err.value)
    manual = tmp_path / "data" / "cifar10" / "downloads" / "manual"
    for needle in (
        "Dataset 'cifar10' is not prepared in",
        f"could not be downloaded ({closed_port}/{CIFAR10.filename}: ",
        "refused",
        f"needed in {manual}:",
        f"{CIFAR10.filename}  (missing; {CIFAR10.size:,} bytes",
        "manual_dir",
    ):
        assert needle in message
    assert listing(tmp_path / "data") == []


def command_env(modules, **extra: str) -> dict:
    """The command's environment: downloads allowed (the suite sets $QSPARSE_OFFLINE)."""
    env = modules.env(**extra)
    env.pop(archives.OFFLINE_ENV, None)
    return env


def test_the_command_fails_fast_in_one_line(modules, closed_port, tmp_path):
    # in its own interpreter: experiments.imp's flags are not to meet other commands' in this one
    env = command_env(modules, **{archives.URL_ENV: closed_port})
    start = time.perf_counter()
    done = modules.run("experiments.imp", *CIFAR_RUN(tmp_path), env=env)
    assert time.perf_counter() - start < 30  # the interpreter's start and the command's checks
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.splitlines()[-1] == errors[0]  # tfds may warn first
    err = errors[0]
    assert err.startswith("error: Dataset 'cifar10'")
    assert f"could not be downloaded ({closed_port}/{CIFAR10.filename}: " in err
    assert listing(tmp_path) == []


def CIFAR_RUN(tmp_path) -> list[str]:
    return [
        "--model=conv4",
        "--algebra=quat",
        "--dataset=cifar10",
        f"--data_dir={tmp_path / 'data'}",
        f"--workdir={tmp_path / 'runs'}",
    ]


# --- offline ----------------------------------------------------------------------------------


def offline_message(name: str, root, manual) -> str:
    return (
        f"Dataset {name!r} is not prepared in {root} and cannot be built offline: these original"
        f" archives are needed in {manual}:"
    )


@pytest.mark.parametrize("how", ["keyword", "environment"])
def test_offline_refuses_without_a_connection(how, server, tmp_path, monkeypatch, no_connections):
    """Offline by the keyword (the environment saying otherwise) or by $QSPARSE_OFFLINE; a
    mirror is set, and would serve the file, yet nothing is asked of it."""
    (server.folder / CIFAR10.filename).write_bytes(b"x")
    monkeypatch.setenv(archives.URL_ENV, server.url)
    if how == "keyword":
        monkeypatch.setenv(archives.OFFLINE_ENV, "0")
    kwargs = {"offline": True} if how == "keyword" else {}
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load("cifar10", data_dir=tmp_path / "data", **kwargs)
    root = tmp_path / "data" / "cifar10"
    assert str(err.value).startswith(offline_message("cifar10", root, root / "downloads/manual"))
    assert server.asked == []
    assert listing(tmp_path / "data") == []


def test_offline_command_exits_2_without_a_connection(modules, server, tmp_path):
    """The flag alone (no $QSPARSE_OFFLINE); a mirror that would serve the file is asked
    nothing."""
    (server.folder / CIFAR10.filename).write_bytes(b"x")
    env = command_env(modules, **{archives.URL_ENV: server.url})
    done = modules.run("experiments.imp", *CIFAR_RUN(tmp_path), "--offline", env=env)
    assert done.returncode == 2, done.stderr
    root = tmp_path / "data" / "cifar10"
    expected = offline_message("cifar10", root, root / "downloads" / "manual")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}")
    assert server.asked == []
    assert listing(tmp_path / "data") == [] and listing(tmp_path / "runs") == []


@pytest.mark.parametrize(
    "value, offline", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)]
)
def test_offline_environment_values(value, offline, monkeypatch):
    monkeypatch.setenv(archives.OFFLINE_ENV, value)
    assert archives.offline_from_env() is offline


# --- cloud data_dir ---------------------------------------------------------------------------

BUCKET = "gs://bucket/tensorflow_datasets"


class FakeBuilder:
    """tfds.builder's stand-in: records the data_dir it was given; prepared where told."""

    def __init__(self, calls, prepared, name, data_dir):
        calls.append(data_dir)
        self.name, self.data_dir, self.prepared = name, data_dir, prepared

    def is_prepared(self):
        return self.data_dir in self.prepared


@pytest.fixture
def fake_tfds(monkeypatch, no_connections):
    """tfds.builder, split reading and file writing replaced: nothing is read or written."""
    calls, prepared = [], set()
    monkeypatch.setattr(
        data.tfds, "builder", lambda name, data_dir: FakeBuilder(calls, prepared, name, data_dir)
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int32)

    def read_split(builder, split):
        n = 6 if split == "train" else 4
        return images[:n], labels[:n]

    monkeypatch.setattr(data, "_read_split", read_split)

    def no_write(path, *args, **kwargs):
        raise AssertionError(f"wrote {path}")

    monkeypatch.setattr(data.files, "atomic_write", no_write)
    return types.SimpleNamespace(calls=calls, prepared=prepared, images=images, labels=labels)


@pytest.mark.parametrize("layout", ["tfds", "qsparse"])
def test_cloud_data_dir_is_read_unmangled(layout, fake_tfds):
    where = BUCKET if layout == "tfds" else f"{BUCKET}/cifar10"
    fake_tfds.prepared.add(where)
    ds = data.load("cifar10", data_dir=BUCKET + "/")
    assert fake_tfds.calls == [BUCKET, f"{BUCKET}/cifar10"][: 1 if layout == "tfds" else 2]
    assert all(type(c) is str for c in fake_tfds.calls)
    np.testing.assert_array_equal(ds.train_images, fake_tfds.images[:6])
    np.testing.assert_array_equal(ds.test_labels, fake_tfds.labels[:4])


def test_unprepared_cloud_data_dir_is_named_in_the_refusal(fake_tfds):
    with pytest.raises(data.DatasetUnavailableError) as e:
        data.load("cifar10", data_dir=BUCKET)
    message = str(e.value)
    assert message.startswith(
        f"Dataset 'cifar10' is not prepared in {BUCKET} (nor in {BUCKET}/cifar10)"
    )
    assert "gs:/b" not in message and "\n" not in message
    assert fake_tfds.calls == [BUCKET, f"{BUCKET}/cifar10"]


def test_cloud_data_dir_survives_config_and_environment(monkeypatch):
    config = Config(model="conv4", dataset="cifar10", data_dir=BUCKET, offline=True)
    again = Config.from_json(config.to_json())
    assert again == config and again.data_dir == BUCKET
    assert config.run_name() == Config(model="conv4", dataset="cifar10").run_name()
    given = {}
    monkeypatch.setattr(experiment.qdata, "load", lambda name, **kw: given.update(kw))
    experiment._load_dataset(config)
    assert (given["data_dir"], given["offline"]) == (BUCKET, True)
    experiment._load_dataset(Config(model="conv4", dataset="cifar10"))
    assert given["offline"] is None  # no --offline: $QSPARSE_OFFLINE decides

    monkeypatch.setenv(data.DATA_DIR_ENV, BUCKET)
    assert data.default_data_dir() == BUCKET
