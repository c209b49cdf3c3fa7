"""Tests for qsparse.data: shipped MNIST, Debian's Fashion-MNIST, offline tfds loading, splits,
JAX preprocessing.

One real MNIST build (the session's, in conftest) and one real Fashion-MNIST build are shared by
the loading tests; the network is blocked while they run, so any attempt by tfds to go online
fails the build instead of hanging.
"""

import collections
import gzip
import hashlib
import os
import shutil
import socket
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from qsparse import augment, data

# Class counts of the real MNIST splits (LeCun et al.), e.g. 980 zeros in the test set.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FASHION_ARCHIVES = data.DATASETS["fashion_mnist"].archives


def read_idx(path):
    """Independent reader for (gzipped) idx files: magic 0x0000080N, N big-endian dims, bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    assert raw[:3] == b"\x00\x00\x08", path
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def examples(images, labels):
    """Order-free view of a split: the sorted list of (label, pixels) byte strings."""
    flat = np.concatenate(
        [labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1
    )
    return sorted(row.tobytes() for row in flat)


class NetworkAccessAttempted(RuntimeError):
    """Raised by the blocked sockets; not an OSError, so no HTTP client retries it."""


def block_network(mp):
    """Make any socket lookup or connection raise at once."""

    def refuse(*args, **kwargs):
        raise NetworkAccessAttempted(f"network access attempted: {args[:2]}")

    mp.setattr(socket, "getaddrinfo", refuse)
    mp.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def no_network(monkeypatch):
    block_network(monkeypatch)


def build_offline(name, tmp_path_factory):
    """Build a real dataset once into a fresh data_dir with the network blocked."""
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        ds = data.load(name, data_dir=data_dir)
    return types.SimpleNamespace(data_dir=data_dir, ds=ds)


@pytest.fixture(scope="module")
def mnist(mnist_build):
    """Real MNIST, from the shipped archives: the session's build (conftest), loaded."""
    ds = data.load("mnist", data_dir=mnist_build.data_dir)
    return types.SimpleNamespace(data_dir=mnist_build.data_dir, ds=ds)


@pytest.fixture(scope="module")
def debian_fashion_mnist():
    """Debian's Fashion-MNIST folder. .ci/run installs the package and sets
    ``QSPARSE_REQUIRE_FASHION_MNIST``, so there its absence fails the tests that need it;
    elsewhere (no apt, not root) they skip."""
    folder = data.DEBIAN_FASHION_MNIST_DIR
    missing = [a.filename for a in FASHION_ARCHIVES if not (folder / a.filename).is_file()]
    if missing:
        reason = (
            f"{', '.join(missing)} missing from {folder}: apt-get install dataset-fashion-mnist"
        )
        if os.environ.get("QSPARSE_REQUIRE_FASHION_MNIST"):
            pytest.fail(f"{reason} (QSPARSE_REQUIRE_FASHION_MNIST is set)")
        pytest.skip(f"{reason} (skipped because QSPARSE_REQUIRE_FASHION_MNIST is unset)")
    return folder


@pytest.fixture(scope="module")
def fashion_mnist(debian_fashion_mnist, tmp_path_factory):
    """Real Fashion-MNIST, from Debian's files."""
    return build_offline("fashion_mnist", tmp_path_factory)


# --- archives ---------------------------------------------------------------------------------


def test_shipped_mnist_archives_are_the_originals():
    for archive in data.DATASETS["mnist"].archives:
        blob = (data.SHIPPED_MNIST_DIR / archive.filename).read_bytes()
        assert len(blob) == archive.size
        assert hashlib.sha256(blob).hexdigest() == archive.sha256


def test_debian_fashion_mnist_rebuilds_the_original_archives(debian_fashion_mnist, tmp_path):
    written = data.rebuild_from_debian(debian_fashion_mnist, tmp_path / "manual")
    assert written == [tmp_path / "manual" / a.filename for a in FASHION_ARCHIVES]
    assert sorted(os.listdir(tmp_path / "manual")) == sorted(a.filename for a in FASHION_ARCHIVES)
    for archive in FASHION_ARCHIVES:
        blob = (tmp_path / "manual" / archive.filename).read_bytes()
        assert len(blob) == archive.size, archive.filename
        assert hashlib.sha256(blob).hexdigest() == archive.sha256, archive.filename


@pytest.mark.parametrize("damage", ["header", "body", "missing"])
def test_damaged_debian_fashion_mnist_fails_clearly_and_writes_nothing(
    debian_fashion_mnist, tmp_path, monkeypatch, no_network, damage
):
    """The last file is damaged, so the other three rebuild fine first: still nothing is written."""
    src = tmp_path / "debian"
    shutil.copytree(debian_fashion_mnist, src)
    last = FASHION_ARCHIVES[-1]
    path = src / last.filename
    blob = bytearray(path.read_bytes())
    if damage == "header":
        blob[3] = 0x08  # FNAME set: not Debian's header (e.g. an original archive)
        path.write_bytes(blob)
        expected = "not Debian's gzip header"
    elif damage == "body":
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(blob)
        expected = rf"sha256 [0-9a-f]{{64}}, expected {last.sha256}"
    else:
        path.unlink()
        expected = "is missing"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", src)
    with pytest.raises(data.DatasetUnavailableError, match=expected) as err:
        data.load("fashion_mnist", data_dir=tmp_path / "data")
    assert last.filename in str(err.value)
    manual = tmp_path / "data" / "fashion_mnist" / "downloads" / "manual"
    assert not manual.exists() or not any(manual.iterdir())


def test_fashion_mnist_without_debian_or_archives_names_the_package(
    tmp_path, monkeypatch, no_network
):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load("fashion_mnist", data_dir=tmp_path / "data")
    message = str(err.value)
    for needle in ("train-images-idx3-ubyte.gz", "apt-get install dataset-fashion-mnist"):
        assert needle in message


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_archive_table_matches_tfds(name):
    expected = {
        (info.filename, int(info.size), info.checksum)
        for info in tfds.builder_cls(name).url_infos.values()
    }
    assert {(a.filename, a.size, a.sha256) for a in data.DATASETS[name].archives} == expected


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_dataset_spec_consistent(name, tmp_path):
    spec = data.DATASETS[name]
    assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]
    assert spec.augment == name.startswith("cifar")
    builder_features = tfds.builder(name, data_dir=tmp_path).info.features
    assert tuple(builder_features["image"].shape) == spec.image_shape
    assert builder_features["label"].num_classes == spec.num_classes


# --- loading ----------------------------------------------------------------------------------


def test_mnist_loads_real_data_offline(mnist):
    ds = mnist.ds
    assert (ds.name, ds.num_classes, ds.mean, ds.std, ds.augment) == (
        "mnist",
        10,
        (0.1307,),
        (0.3081,),
        False,
    )
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (
        10000,
        28,
        28,
        1,
    )
    assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
    assert ds.val_images.shape == (0, 28, 28, 1) and ds.val_labels.shape == (0,)
    assert np.bincount(ds.train_labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.test_labels, minlength=10).tolist() == MNIST_TEST_COUNTS

    folder = data.SHIPPED_MNIST_DIR
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        loaded = examples(getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels"))
        assert loaded == examples(images, labels), split  # same examples; tfds reorders them


def test_fashion_mnist_builds_offline_from_debian(fashion_mnist, debian_fashion_mnist):
    ds = fashion_mnist.ds
    assert (ds.name, ds.num_classes, ds.mean, ds.std) == ("fashion_mnist", 10, (0.2860,), (0.3530,))
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
    assert np.bincount(ds.train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels, minlength=10).tolist() == [1000] * 10
    # Fashion-MNIST, not MNIST (same file names, same shapes): the pixel mean is the spec's.
    mean = ds.train_images.mean() / 255
    assert abs(mean - ds.mean[0]) < 1e-3, mean
    assert abs(mean - data.DATASETS["mnist"].mean[0]) > 0.1, mean
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(debian_fashion_mnist / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(debian_fashion_mnist / f"{prefix}-labels-idx1-ubyte.gz")
        loaded = examples(getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels"))
        assert loaded == examples(images, labels), split
    manual = fashion_mnist.data_dir / "fashion_mnist" / "downloads" / "manual"
    assert sorted(os.listdir(manual)) == sorted(a.filename for a in FASHION_ARCHIVES)


def test_second_load_reads_the_cache_and_is_identical(mnist, monkeypatch):
    def untouched(*args, **kwargs):
        raise AssertionError("a load with its .npz cache present went to tfds")

    monkeypatch.setattr(data, "_prepare", untouched)
    monkeypatch.setattr(data, "_read_split", untouched)
    again = data.load("mnist", data_dir=mnist.data_dir)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(again, field), getattr(mnist.ds, field))


def test_prepared_data_needs_no_archives(mnist, tmp_path, no_network):
    """A data_dir holding tfds's prepared MNIST (but no .npz cache) loads without any archive."""
    shutil.copytree(mnist.data_dir / "mnist" / "mnist", tmp_path / "mnist" / "mnist")
    empty = tmp_path / "no-archives"
    empty.mkdir()
    ds = data.load("mnist", data_dir=tmp_path, manual_dir=empty)
    np.testing.assert_array_equal(ds.test_images, mnist.ds.test_images)
    np.testing.assert_array_equal(ds.train_labels, mnist.ds.train_labels)
    assert list(tmp_path.glob("mnist/mnist-*.npz")), "the .npz cache was not written"


def test_loads_started_together_build_the_dataset_once(mnist, tmp_path, monkeypatch):
    """Two loads of a dataset not built yet (a grid launched in parallel on a new machine): one
    has tfds build it, the other waits and finds it built. Unlocked, both build, and tfds's
    second rename of its finished folder fails. (The build stands in for tfds's, as in
    test_data_download: the session's prepared MNIST copied into place, slowly.)"""
    builds = []

    def build(builder, download_config):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # the other load arrives while this one builds
        prepared = mnist.data_dir / "mnist" / "mnist"
        shutil.copytree(prepared, Path(builder.data_dir).parent, dirs_exist_ok=True)
        builder.info.read_from_directory(builder.data_dir)

    images, labels = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1), np.array([3, 1])
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", build)

    def read_split(builder, split):
        builder.info.splits[split]  # as tfds's reader: a builder made before the build has none
        return images, labels

    monkeypatch.setattr(data, "_read_split", read_split)
    start, out = threading.Barrier(2), {}

    def load(i):
        start.wait()
        out[i] = data._load_splits("mnist", tmp_path / "mnist", None, None)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert sorted(out) == [0, 1]
    for a, b in zip(out[0], out[1], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out[1][0], images)


def test_validation_and_subsets_are_seeded_and_disjoint(mnist):
    load = lambda **kw: data.load("mnist", data_dir=mnist.data_dir, **kw)  # noqa: E731
    held = load(validation_size=5000, seed=1)
    assert held.val_images.shape == (5000, 28, 28, 1) and held.train_images.shape == (
        55000,
        28,
        28,
        1,
    )
    # Validation + remaining train is exactly the original train split; test is untouched.
    assert sorted(
        examples(held.val_images, held.val_labels) + examples(held.train_images, held.train_labels)
    ) == (examples(mnist.ds.train_images, mnist.ds.train_labels))
    np.testing.assert_array_equal(held.test_images, mnist.ds.test_images)

    small = load(validation_size=5000, seed=1, train_subset=1000, test_subset=500)
    assert len(small.train_labels) == 1000 and len(small.test_labels) == 500
    np.testing.assert_array_equal(
        small.val_images, held.val_images
    )  # subset does not move the hold-out
    remaining = collections.Counter(examples(held.train_images, held.train_labels))
    assert not collections.Counter(examples(small.train_images, small.train_labels)) - remaining
    full_test = collections.Counter(examples(mnist.ds.test_images, mnist.ds.test_labels))
    assert not collections.Counter(examples(small.test_images, small.test_labels)) - full_test
    assert (
        len(set(small.train_labels.tolist())) == 10
    )  # a random draw, not the first 1000 of one class

    same = load(validation_size=5000, seed=1, train_subset=1000, test_subset=500)
    other = load(validation_size=5000, seed=2, train_subset=1000, test_subset=500)
    for field in ("train_images", "val_images", "test_images"):
        np.testing.assert_array_equal(getattr(same, field), getattr(small, field))
        assert not np.array_equal(getattr(other, field), getattr(small, field)), field


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(validation_size=60000),
        dict(validation_size=-1),
        dict(train_subset=0),
        dict(validation_size=10, train_subset=59991),
        dict(test_subset=10001),
    ],
)
def test_bad_split_sizes_raise(mnist, kwargs):
    with pytest.raises(ValueError):
        data.load("mnist", data_dir=mnist.data_dir, **kwargs)


def test_missing_dataset_fails_fast_with_instructions(tmp_path, no_network):
    manual = tmp_path / "manual"
    manual.mkdir()
    start = time.perf_counter()
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load("cifar10", data_dir=tmp_path / "data", manual_dir=manual)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    for needle in ("cifar10", "cifar-10-binary.tar.gz", str(manual), "manual_dir"):
        assert needle in message


def test_default_manual_dir_and_wrong_size_archive(tmp_path, no_network):
    manual = tmp_path / "cifar100" / "downloads" / "manual"  # the default for non-shipped data
    manual.mkdir(parents=True)
    (manual / "cifar-100-binary.tar.gz").write_bytes(b"\0" * 1000)
    with pytest.raises(data.DatasetUnavailableError, match="168,513,733") as err:
        data.load("cifar100", data_dir=tmp_path)
    assert str(manual) in str(err.value)


def test_mnist_without_shipped_archives_is_unavailable(tmp_path, no_network):
    with pytest.raises(data.DatasetUnavailableError, match="train-images-idx3-ubyte.gz"):
        data.load("mnist", data_dir=tmp_path / "data", manual_dir=tmp_path)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        data.load("svhn")
    assert not isinstance(err.value, data.DatasetUnavailableError)
    for name in data.DATASETS:
        assert name in str(err.value)


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QSPARSE_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("QSPARSE_DATA_DIR")
    assert data.default_data_dir().parts[-3:] == (".cache", "qsparse", "tfds")


# --- JAX preprocessing ------------------------------------------------------------------------


def random_images(seed, shape=(8, 32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def numpy_crop_and_flip(images, offsets, flips, padding=4):
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h, w = images.shape[1:3]
    out = np.stack(
        [p[dy : dy + h, dx : dx + w] for p, (dy, dx) in zip(padded, offsets, strict=True)]
    )
    return np.where(np.asarray(flips)[:, None, None, None], out[:, :, ::-1], out)


def test_normalize_matches_numpy():
    images = random_images(0)
    spec = data.DATASETS["cifar10"]
    expected = (images.astype(np.float64) / 255 - np.array(spec.mean)) / np.array(spec.std)
    for x in (images, images.astype(np.float32)):
        out = jax.jit(augment.normalize, static_argnums=(1, 2))(x, spec.mean, spec.std)
        assert out.dtype == jnp.float32 and out.shape == images.shape
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_crop_and_flip_matches_numpy_for_given_offsets():
    images = random_images(1)
    offsets = np.array([[0, 0], [8, 8], [4, 4], [0, 8], [8, 0], [3, 5], [7, 1], [4, 4]], np.int32)
    flips = np.array([False, True, False, True, False, True, False, True])
    out = augment.crop_and_flip(images, offsets, flips)
    np.testing.assert_array_equal(out, numpy_crop_and_flip(images, offsets, flips))
    np.testing.assert_array_equal(out[2], images[2])  # centre crop, no flip: identity
    np.testing.assert_array_equal(out[0, :4], 0)  # top-left corner crop: 4 rows of zero padding


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_matches_reference_and_is_deterministic(dtype):
    images = random_images(2, (64, 28, 28, 1)).astype(dtype)
    keys = jax.random.split(jax.random.key(0), 64)
    out = jax.jit(augment.augment)(keys, images)
    assert out.shape == images.shape and out.dtype == dtype
    np.testing.assert_array_equal(out, augment.augment(keys, images))

    offsets, flips = augment.sample_augmentation(keys)
    assert offsets.shape == (64, 2) and flips.shape == (64,)
    assert 0 <= int(offsets.min()) and int(offsets.max()) <= 8
    assert len(np.unique(np.asarray(offsets), axis=0)) > 10 and 0 < int(flips.sum()) < 64
    np.testing.assert_array_equal(
        out, numpy_crop_and_flip(images, np.asarray(offsets), np.asarray(flips))
    )

    other = augment.augment(jax.random.split(jax.random.key(1), 64), images)
    assert not np.array_equal(other, out)


def test_augment_per_example_keys_split_across_batches():
    images = random_images(3)
    keys = jax.random.split(jax.random.key(42), 8)
    whole = augment.augment(keys, images)
    halves = [augment.augment(keys[i : i + 4], images[i : i + 4]) for i in (0, 4)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_augment_rejects_raw_keys():
    with pytest.raises(TypeError, match="typed PRNG keys"):
        augment.augment(jax.random.split(jax.random.PRNGKey(0), 8), random_images(4))
