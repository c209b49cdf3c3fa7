"""The original archives of the datasets: their table, and the two ways to get them besides
placing them by hand: Fashion-MNIST rebuilt from Debian's package, and downloads.

A download is one request per archive with a timeout, from its original URL or from
``<base>/<file name>`` of a mirror (:data:`URL_ENV`), checked against the size and sha256 that
tfds registers for the original and renamed into place only when complete, so a placed archive
is always the original. tfds then builds the dataset from the folder as from archives placed by
hand. tfds's own downloader is not used: it retries a refused or dropped connection about ten
times with growing pauses and has no timeout, so a machine without network would wait minutes,
and it cannot fetch from another host than the one its builder names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import sys
import types
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from qsparse import files

__all__ = [
    "ARCHIVES",
    "OFFLINE_ENV",
    "TIMEOUT_SECONDS",
    "URL_ENV",
    "Archive",
    "DatasetUnavailableError",
    "DownloadError",
    "archive_urls",
    "fetch",
    "offline_from_env",
    "rebuild_from_debian",
]

#: Set to 1 (or true, yes, on) to never download: absent archives are refused, as offline.
OFFLINE_ENV = "QSPARSE_OFFLINE"

#: A base URL that replaces the archives' original hosts: ``<base>/<file name>`` (http, https or
#: file), for a mirror, or a local server in tests.
URL_ENV = "QSPARSE_DOWNLOAD_URL"

#: Seconds to wait for a connection and for each read: the most a dead network costs.
TIMEOUT_SECONDS = 20.0

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Archive:
    """One original archive that tfds expects in ``manual_dir`` (from its ``url_checksums``)."""

    filename: str
    size: int
    sha256: str


#: Each dataset's original archives, as tfds 4.9.10 registers them.
ARCHIVES: Mapping[str, tuple[Archive, ...]] = types.MappingProxyType(
    {
        "mnist": (
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
        "fashion_mnist": (
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
        "cifar10": (
            Archive(
                "cifar-10-binary.tar.gz",
                170_052_171,
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
            ),
        ),
        "cifar100": (
            Archive(
                "cifar-100-binary.tar.gz",
                168_513_733,
                "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
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
    checked against :data:`ARCHIVES` before any is written, each through a temporary file, so
    ``dst`` never holds a wrong or partial archive. Returns the paths written.

    Raises:
      DatasetUnavailableError: a file is missing from ``src``, does not start with Debian's
        gzip header, or rebuilds to another sha256 than the original's.
    """
    src, dst = Path(src), Path(dst)
    rebuilt = {}
    for archive in ARCHIVES["fashion_mnist"]:
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


class DownloadError(ValueError):
    """An archive could not be downloaded: ``<url>: <reason>``, on one line."""


def offline_from_env() -> bool:
    """Whether :data:`OFFLINE_ENV` asks for no downloads."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def archive_urls(originals: Mapping[str, str], base: str | None) -> dict[str, str]:
    """Each archive's URL by file name: the original, or ``<base>/<file name>`` when ``base`` (or
    else :data:`URL_ENV`) is set."""
    base = base or os.environ.get(URL_ENV)
    if not base:
        return dict(originals)
    return {filename: f"{base.rstrip('/')}/{filename}" for filename in originals}


def fetch(
    archives: Sequence[Archive],
    urls: Mapping[str, str],
    folder: Path,
    timeout: float = TIMEOUT_SECONDS,
) -> list[Path]:
    """Download each archive that is absent from ``folder`` or of the wrong size.

    Nothing is written for an archive whose host cannot be reached or whose bytes are not the
    original's; an archive already complete stays. Returns the paths written.

    Raises:
      DownloadError: a host unreachable, an HTTP error, a timeout, or other bytes than the
        original's (size or sha256).
    """
    written = []
    for archive in archives:
        path = folder / archive.filename
        if path.is_file() and path.stat().st_size == archive.size:
            continue
        _fetch_one(urls[archive.filename], archive, path, timeout)
        written.append(path)
    return written


def _fetch_one(url: str, archive: Archive, path: Path, timeout: float) -> None:
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError) as e:  # refused, unresolvable, timed out; a malformed URL
        raise DownloadError(f"{url}: {_reason(e)}") from None
    sys.stderr.write(f"qsparse: downloading {url} ({archive.size:,} bytes)\n")

    def write(f) -> None:
        digest, size = hashlib.sha256(), 0
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as e:  # the network failed, not the file
                raise DownloadError(f"{url}: {_reason(e)} after {size:,} bytes") from None
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            f.write(chunk)
        if (size, digest.hexdigest()) != (archive.size, archive.sha256):
            raise DownloadError(
                f"{url}: served {size:,} bytes with sha256 {digest.hexdigest()}, not the original "
                f"{archive.filename} ({archive.size:,} bytes, sha256 {archive.sha256})"
            )

    with response:
        files.atomic_write(path, write)


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e  # URLError wraps the socket's error
    return " ".join(str(reason).split()) or type(reason).__name__
