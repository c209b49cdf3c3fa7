r"""The run directory: the name of every file of a run, and the reads and writes of its text files.

One vocabulary for the driver that writes runs and for the readers (:mod:`qsparse.results`,
notebooks) that read them; jax-free, so run directories can be read anywhere. Layout::

    <run>/config.json                 resolved config; a different config here is refused
    <run>/runs.jsonl                  one line per invocation: versions, devices, git commit
    <run>/summary.json, summary.csv   one row per (replicate, round)
    <run>/replicate_<r>/init/         θ₀ (Orbax)          rewind/   θ_k when rewind != init
    <run>/replicate_<r>/stopped.json  why a replicate stopped before its last round
    <run>/replicate_<r>/round_<L>/    masks.npz, sparsity.json, metrics.jsonl, ckpt/epoch_<n>/
                                      (checkpoints with the metrics so far), final/ (trained
                                      state), search/ (protocol 'paper', not the last round),
                                      done.json (written last)
    events.out.tfevents.*             TensorBoard events (:mod:`qsparse.summaries`) in the run,
                                      replicate, round and search folders

Every write goes through :mod:`qsparse.files`: atomic (a process killed at any instant leaves the
old file or the new one, never half of one), and a write the system refuses (a full disk) raises
:class:`qsparse.files.WriteError` naming the file; a file that fails to read back raises
:class:`CorruptFileError` naming it. In a multi-process run only process 0 writes
(:func:`is_writer`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from qsparse import files, ops

SUMMARY_FIELDS = (
    "replicate",
    "round",
    "status",
    "density_prunable",
    "weights_remaining_pct",
    "weights_remaining_pct_of_real",
    "test_acc",
    "val_acc",
    "train_acc",
    "train_loss",
    "epochs",
)
DONE_FIELDS = SUMMARY_FIELDS[2:]  # done.json: a finished round's row, without its coordinates
PACKAGES = (
    "qsparse-jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "numpy",
)


class CorruptFileError(RuntimeError):
    """A run file exists but cannot be read back; the message names it."""


# -- the layout -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Training:
    """The files of one training run to its end: epoch checkpoints, metrics log, final state."""

    path: Path

    @property
    def ckpt(self) -> Path:
        return self.path / "ckpt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.path / "final"


@dataclasses.dataclass(frozen=True)
class Round(Training):
    """A pruning round: its masks and their densities, its ticket's training, its result."""

    @property
    def level(self) -> int:
        return _index(self.path)

    @property
    def masks(self) -> Path:
        return self.path / "masks.npz"

    @property
    def sparsity(self) -> Path:
        return self.path / "sparsity.json"

    @property
    def done(self) -> Path:
        return self.path / "done.json"

    @property
    def search(self) -> Training:
        """Protocol 'paper': the never-rewound trajectory that prunes the next round's masks."""
        return Training(self.path / "search")


@dataclasses.dataclass(frozen=True)
class Replicate:
    """One replicate: its initial weights, rewind point and rounds."""

    path: Path

    @property
    def index(self) -> int:
        return _index(self.path)

    @property
    def init(self) -> Path:
        return self.path / "init"

    @property
    def rewind(self) -> Path:
        return self.path / "rewind"

    @property
    def stopped(self) -> Path:
        return self.path / "stopped.json"

    def round(self, level: int) -> Round:
        return Round(self.path / f"round_{level:02d}")

    def rounds(self) -> list[Round]:
        """The rounds that exist on disk, in order."""
        return sorted(
            (Round(p) for p in self.path.glob("round_*") if p.is_dir()), key=lambda rd: rd.level
        )


@dataclasses.dataclass(frozen=True)
class Run:
    """A run directory: one experiment (a config), its replicates and their rounds."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def runs(self) -> Path:
        return self.path / "runs.jsonl"

    @property
    def summary_json(self) -> Path:
        return self.path / "summary.json"

    @property
    def summary_csv(self) -> Path:
        return self.path / "summary.csv"

    @property
    def ticket(self) -> Path:
        """A control's record of the ticket run it branches from (its path and config)."""
        return self.path / "ticket.json"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    def replicate(self, r: int) -> Replicate:
        return Replicate(self.path / f"replicate_{r}")

    def replicates(self) -> list[Replicate]:
        """The replicates that exist on disk, in order."""
        return sorted(
            (Replicate(p) for p in self.path.glob("replicate_*") if p.is_dir()),
            key=lambda rep: rep.index,
        )


def is_run(path: Path, files: list[str] | None = None, dirs: list[str] | None = None) -> bool:
    """Whether ``path`` is a run directory (``files``/``dirs``: its listing, if already known)."""
    path = Path(path)
    files = os.listdir(path) if files is None else files
    dirs = files if dirs is None else dirs
    return "config.json" in files and (
        "summary.json" in files or any(d.startswith("replicate_") for d in dirs)
    )


def _index(path: Path) -> int:
    return int(path.name.split("_")[1])


# -- atomic writes, checked reads ---------------------------------------------------------------


def is_writer() -> bool:
    """Whether this process writes run directories: process 0 of a multi-process JAX run.

    A process that has not imported JAX is a reader with no peers, hence its own writer.
    """
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def write_text(path: Path, text: str) -> None:
    """A run file, written atomically by process 0 (:func:`qsparse.files.write_text`)."""
    if is_writer():
        files.write_text(path, text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"cannot read {path}: {e}") from e


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"cannot read {path}: {e}") from e
    if not all(isinstance(row, dict) for row in rows):
        raise CorruptFileError(f"cannot read {path}: a line is not a JSON object")
    return rows


# -- what a run records -------------------------------------------------------------------------


def read_done(rd: Round) -> dict:
    """A finished round's done.json, checked to hold every field and to match its metrics log."""
    done = read_json(rd.done)
    if not isinstance(done, dict) or not set(DONE_FIELDS) <= set(done):
        raise CorruptFileError(f"{rd.done} lacks some of the fields {list(DONE_FIELDS)}")
    if len(read_jsonl(rd.metrics)) != done["epochs"]:
        raise CorruptFileError(f"{rd.metrics} does not hold the round's {done['epochs']} epochs")
    return done


def summary_rows(run: Run) -> list[dict]:
    """One row per finished (replicate, round), from the rounds' done.json files."""
    return [
        {"replicate": rep.index, "round": rd.level, **read_json(rd.done)}
        for rep in run.replicates()
        for rd in rep.rounds()
        if rd.done.exists()
    ]


def write_summary(run: Run) -> list[dict]:
    """summary.json and summary.csv from the rounds' done.json files; returns the rows."""
    rows = summary_rows(run)
    write_json(run.summary_json, rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(run.summary_csv, buf.getvalue())
    return rows


def load_masks(rd: Round) -> dict[str, np.ndarray]:
    """A round's masks by parameter path ('QDense_0/qkernel'), as numpy bool arrays."""
    with np.load(rd.masks) as f:
        return {k: f[k] for k in f.files}


def is_kernel(name: str) -> bool:
    """Whether masks.npz entry ``name`` is a kernel, real or a component kernel of any algebra
    (the prunable kind of leaf, as :data:`qsparse.masks.KERNEL_NAMES`)."""
    return name.split("/")[-1] in ops.KERNEL_NAMES


def is_quaternion_kernel(name: str) -> bool:
    """Whether masks.npz entry ``name`` is a quaternion kernel: a ``qkernel`` leaf, its four
    components (r, i, j, k) on axis 0 (what :func:`qsparse.masks.is_quaternion` decides in JAX)."""
    return name.split("/")[-1] == "qkernel"


def provenance(**extra: Any) -> dict:
    """What ran: time, package versions, Python, host, the qsparse commit and whether its
    sources differ from it; ``extra`` (devices) appended."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no", ".")
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "packages": packages,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "host": platform.node(),
        **extra,
    }


def append_invocation(run: Run, entry: dict) -> None:
    """One line of runs.jsonl."""
    previous = run.runs.read_text() if run.runs.exists() else ""
    write_text(run.runs, previous + json.dumps(entry) + "\n")


def _git(*args: str) -> str | None:
    """Output of a read-only git command in the qsparse source folder; None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
