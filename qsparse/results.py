"""Run directories → tidy rows → accuracy-vs-sparsity curves, masks statistics, the paper's tables.

Pure Python and numpy (no jax, no matplotlib), so results can be read anywhere the run
directories are: a laptop, a notebook, CI. The layout read is the one written by
:mod:`qsparse.lottery` (see its module docstring).

Conventions (paper.md §4):

* ``x_own`` is the percentage of the model's *own* parameters left, biases included (the
  paper's "% weights left"); ``x_real`` is the same count as a percentage of the *real*
  model's parameters, which is how the paper plots quaternion curves. For a real model the two
  are equal.
* Accuracies of curves are in percent; the spread over replicates is the sample standard
  deviation (ddof=1, as the paper's plotting code, pandas ``std``), NaN with one replicate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

COMPONENTS = ("r", "i", "j", "k")

# Config fields that do not define a curve: replicates of one experiment (seed, replicates),
# how far or how often it ran, and bookkeeping. Every other config field does.
NOT_CURVE_FIELDS = (
    "seed", "replicates", "rounds", "stop_accuracy", "eval_every",
    "data_dir", "manual_dir", "checkpoint_every_secs", "eval_batch", "log_every",
)

# Per-(replicate, round) values of a tidy row (the rest are the run's config fields).
ROW_FIELDS = frozenset({
    "run", "replicate", "round", "status", "density_prunable", "weights_remaining_pct",
    "weights_remaining_pct_of_real", "test_acc", "val_acc", "train_acc", "train_loss", "epochs_run",
})

PathLike = str | os.PathLike


# -- reading runs ---------------------------------------------------------------------------


def find_runs(paths: Iterable[PathLike]) -> list[Path]:
    """Run directories among ``paths``: each is a run or a folder holding runs at any depth."""
    found: list[Path] = []
    for top in map(Path, paths):
        if not top.is_dir():
            raise FileNotFoundError(f"{top} is not a directory")
        before = len(found)
        for root, dirs, files in os.walk(top):
            dirs.sort()
            if "config.json" in files and ("summary.json" in files or any(d.startswith("replicate_") for d in dirs)):
                found.append(Path(root))
                dirs.clear()  # a run's checkpoints hold no further runs; don't walk them
        if len(found) == before:
            raise FileNotFoundError(f"no run directory (config.json + replicate_*/) under {top}")
    return list(dict.fromkeys(found))


def read_rows(run_dir: PathLike) -> list[dict]:
    """Tidy rows of one run: one per finished (replicate, round), with the run's config fields.

    Read from the rounds' ``done.json`` (live while a run is in progress); ``summary.json`` is
    the fallback for a run copied without its round folders. The requested epochs stay
    ``epochs``; the epochs actually trained are ``epochs_run``.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    done = []
    for rd in sorted(run_dir.glob("replicate_*/round_*/done.json")):
        entry = json.loads(rd.read_text())
        done.append({"replicate": _index(rd.parent.parent), "round": _index(rd.parent), **entry})
    if not done and (run_dir / "summary.json").exists():
        done = json.loads((run_dir / "summary.json").read_text())
    rows = []
    for d in sorted(done, key=lambda d: (d["replicate"], d["round"])):
        d = dict(d)
        d["epochs_run"] = d.pop("epochs", None)
        rows.append({"run": str(run_dir), **config, **d})
    return rows


def load_rows(paths: Iterable[PathLike]) -> list[dict]:
    """Tidy rows of every run found under ``paths``."""
    return [row for run in find_runs(paths) for row in read_rows(run)]


def _index(path: Path) -> int:
    return int(path.name.split("_")[1])


# -- curves ---------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Curve:
    """Accuracy vs weights remaining of one experiment, aggregated per round over replicates.

    Replicates are pooled over every run with the same curve fields (a run's replicates, and
    runs that differ only in seed). ``n`` counts the replicates with a finite accuracy.
    """

    config: dict[str, Any]  # the curve fields (every config field but NOT_CURVE_FIELDS)
    runs: tuple[str, ...]
    rounds: np.ndarray
    n: np.ndarray
    x_own: np.ndarray  # % of the model's own parameters left (mean over replicates)
    x_real: np.ndarray  # % of the real model's parameters
    acc_mean: np.ndarray  # test accuracy, %
    acc_std: np.ndarray  # sample std (ddof=1), %; NaN where n < 2

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def dataset(self) -> str:
        return self.config["dataset"]

    @property
    def algebra(self) -> str:
        return self.config["algebra"]


def aggregate(rows: Iterable[dict]) -> list[Curve]:
    """Group tidy rows into curves and take mean ± std over replicates per round."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple(sorted((k, _hashable(v)) for k, v in row.items() if k in _curve_fields(row)))
        groups.setdefault(key, []).append(row)
    curves = []
    for key, members in groups.items():
        rounds = sorted({r["round"] for r in members})
        cols: dict[str, list] = {k: [] for k in ("n", "x_own", "x_real", "acc_mean", "acc_std")}
        for level in rounds:
            at = [r for r in members if r["round"] == level]
            acc = np.array([100 * r["test_acc"] for r in at], dtype=float)
            acc = acc[np.isfinite(acc)]
            cols["n"].append(acc.size)
            cols["x_own"].append(np.mean([r["weights_remaining_pct"] for r in at]))
            cols["x_real"].append(np.mean([r["weights_remaining_pct_of_real"] for r in at]))
            cols["acc_mean"].append(acc.mean() if acc.size else math.nan)
            cols["acc_std"].append(acc.std(ddof=1) if acc.size > 1 else math.nan)
        curves.append(Curve(
            config=dict(key), runs=tuple(dict.fromkeys(r["run"] for r in members)), rounds=np.array(rounds),
            **{k: np.array(v, dtype=int if k == "n" else float) for k, v in cols.items()},
        ))
    return sorted(curves, key=lambda c: (c.model, c.dataset, c.algebra != "real", _sort_key(c.config)))


def load(paths: Iterable[PathLike]) -> list[Curve]:
    """Curves of every run found under ``paths``."""
    return aggregate(load_rows(paths))


def by_pair(curves: Iterable[Curve]) -> dict[tuple[str, str], list[Curve]]:
    """Curves by (model, dataset): what one paper figure (and one report table) shows."""
    out: dict[tuple[str, str], list[Curve]] = {}
    for c in curves:
        out.setdefault((c.model, c.dataset), []).append(c)
    return out


def labels(curves: Sequence[Curve]) -> list[str]:
    """'R' / 'Q', plus the curve fields that differ among ``curves`` (e.g. 'Q (grouping=quaternion)')."""
    fields = sorted({k for c in curves for k in c.config} - {"model", "dataset", "algebra"})
    varying = [k for k in fields if len({_hashable(c.config.get(k)) for c in curves}) > 1]
    out = []
    for c in curves:
        name = "R" if c.algebra == "real" else "Q"
        extra = ", ".join(f"{k}={_show(c.config.get(k))}" for k in varying)
        out.append(f"{name} ({extra})" if extra else name)
    return out


def _curve_fields(row: dict) -> set[str]:
    return set(row) - set(NOT_CURVE_FIELDS) - ROW_FIELDS



def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list | tuple) else v


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | tuple) else str(v)


def _sort_key(config: dict) -> list[tuple[str, str]]:
    return sorted((k, _show(v)) for k, v in config.items())


# -- layers and masks -----------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LayerDensity:
    """Per-layer density of one replicate across rounds, from the rounds' sparsity.json.

    ``density`` is alive/total real weights of each prunable leaf; for quaternion kernels,
    ``quat_full`` is the fraction of quaternions with all four components alive and
    ``quat_alive`` the fraction with at least one.
    """

    rounds: list[int]
    density: dict[str, np.ndarray]
    quat_full: dict[str, np.ndarray]
    quat_alive: dict[str, np.ndarray]


def layer_density(run_dir: PathLike, replicate: int = 0) -> LayerDensity:
    paths = sorted((Path(run_dir) / f"replicate_{replicate}").glob("round_*/sparsity.json"))
    reports = [json.loads(p.read_text())["leaves"] for p in paths]
    names = [k for k, v in reports[0].items() if v["prunable"]] if reports else []
    quat = [k for k in names if "quat_total" in reports[0][k]]
    return LayerDensity(
        rounds=[_index(p.parent) for p in paths],
        density={k: np.array([r[k]["alive"] / r[k]["total"] for r in reports]) for k in names},
        quat_full={k: np.array([r[k]["quat_full"] / r[k]["quat_total"] for r in reports]) for k in quat},
        quat_alive={k: np.array([r[k]["quat_alive"] / r[k]["quat_total"] for r in reports]) for k in quat},
    )


def mask_rounds(run_dir: PathLike, replicate: int = 0) -> list[int]:
    """Rounds of a replicate whose masks.npz exists."""
    return sorted(_index(p.parent) for p in (Path(run_dir) / f"replicate_{replicate}").glob("round_*/masks.npz"))


def load_masks(run_dir: PathLike, replicate: int = 0, round: int = 0) -> dict[str, np.ndarray]:
    """A round's masks by parameter path ('QDense_0/qkernel'), as numpy bool arrays."""
    with np.load(Path(run_dir) / f"replicate_{replicate}" / f"round_{round:02d}" / "masks.npz") as f:
        return {k: f[k] for k in f.files}


def is_qkernel(name: str) -> bool:
    """Quaternion kernels hold the four components (r, i, j, k) on axis 0."""
    return name.split("/")[-1] == "qkernel"


def quaternion_states(mask: np.ndarray) -> dict[str, float]:
    """Fractions of quaternions with all four components alive, some, or none (sum to 1)."""
    alive = np.asarray(mask).reshape(4, -1).sum(axis=0)
    return {"full": float(np.mean(alive == 4)), "partial": float(np.mean((alive > 0) & (alive < 4))),
            "pruned": float(np.mean(alive == 0))}


def pruned_by_component(mask: np.ndarray) -> np.ndarray:
    """Number of pruned weights in each component (r, i, j, k) of a quaternion kernel."""
    return (~np.asarray(mask, bool)).reshape(4, -1).sum(axis=1)


def quaternion_summary(run_dir: PathLike, replicate: int = 0) -> list[dict]:
    """Per round, over all quaternion kernels: quaternion states and the pruned components' shares.

    Element grouping can leave quaternions partly alive; quaternion grouping never does. The
    shares (``share_r`` ...; NaN before anything is pruned) tell whether pruning favours a
    component (e.g. spares the real part).
    """
    out = []
    for level in mask_rounds(run_dir, replicate):
        kernels = [m.reshape(4, -1) for k, m in load_masks(run_dir, replicate, level).items() if is_qkernel(k)]
        if not kernels:
            continue
        mask = np.concatenate(kernels, axis=1)
        pruned = pruned_by_component(mask)
        total = int(pruned.sum())
        out.append({"round": level, **quaternion_states(mask),
                    **{f"share_{c}": int(p) / total if total else math.nan for c, p in zip(COMPONENTS, pruned)}})
    return out


# -- paper reference (paper.md §5.3) ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PaperCurve:
    """One digitized figure of the paper: x columns exact, accuracies ±0.3 pp, None = no point.

    ``qr_ratio`` is the Q/R parameter ratio the figure's x axis used for the quaternion curve
    (the CIFAR-100 panels used the 10-class ratios, paper.md §4).
    """

    figure: str
    model: str
    dataset: str
    qr_ratio: float
    rounds: tuple[int, ...]
    r_x: tuple[float, ...]  # R: % weights left
    r_acc: tuple[float | None, ...]
    q_x_of_real: tuple[float, ...]  # Q: % of R params (x as plotted)
    q_x_own: tuple[float, ...]  # Q: % of own params
    q_acc: tuple[float | None, ...]

    def nearest(self, algebra: str, x_own: float) -> tuple[int, float | None]:
        """(paper round, accuracy %) at the paper's x nearest ``x_own`` on a log scale."""
        xs, accs = (self.r_x, self.r_acc) if algebra == "real" else (self.q_x_own, self.q_acc)
        i = int(np.argmin(np.abs(np.log(np.array(xs)) - math.log(x_own))))
        return self.rounds[i], accs[i]


def _paper(figure: str, model: str, dataset: str, qr_ratio: float, table: str) -> PaperCurve:
    """Columns: round, R x, R acc, Q x (% of R), Q x (own), Q acc; '-' = no point."""
    rows = [line.split() for line in table.strip().splitlines()]
    cols = list(zip(*rows))

    def num(col):
        return tuple(None if v == "-" else float(v) for v in col)

    return PaperCurve(figure, model, dataset, qr_ratio, tuple(int(v) for v in cols[0]),
                      num(cols[1]), num(cols[2]), num(cols[3]), num(cols[4]), num(cols[5]))


_FIG4A = """
0 100.00 98.1 25.40 100.00 97.7
1 80.03 98.1 20.35 80.12 97.8
2 64.06 98.2 16.31 64.22 97.8
3 51.27 98.1 13.08 51.50 97.8
4 41.05 98.1 10.49 41.32 97.8
5 32.87 98.2 8.43 33.18 97.7
6 26.33 98.2 6.77 26.66 97.5
7 21.09 98.2 5.45 21.45 97.4
8 16.91 98.2 4.39 17.28 97.0
9 13.56 98.1 3.54 13.95 96.6
10 10.87 98.1 2.86 11.28 85.4
11 8.73 97.9 2.32 9.14 63.2
12 7.02 97.8 1.89 7.44 44.2
13 5.64 97.7 1.54 6.07 -
14 4.54 97.5 1.26 4.98 -
15 3.67 97.3 1.04 4.10 -
16 2.96 96.6 0.86 3.40 -
17 2.40 83.4 0.72 2.84 -
18 1.95 64.8 0.61 2.40 -
"""

_FIG4B = """
0 100.00 80.0 25.06 100.00 76.7
1 80.00 78.4 20.05 80.01 76.5
2 64.01 78.7 16.04 64.02 76.5
3 51.21 79.3 12.84 51.23 76.5
4 40.97 79.6 10.27 41.00 76.6
5 32.78 79.4 8.22 32.81 76.4
6 26.23 79.1 6.58 26.26 75.1
7 20.98 78.8 5.27 21.02 74.0
8 16.79 78.3 4.22 16.83 73.1
9 13.43 77.0 3.38 13.47 71.4
10 10.75 75.3 2.70 10.79 70.1
11 8.60 74.2 2.17 8.65 68.7
12 6.89 73.2 1.74 6.93 66.9
13 5.51 71.5 1.39 5.55 65.6
14 4.41 70.5 1.12 4.46 63.6
15 3.53 69.0 0.90 3.58 62.4
16 2.83 67.6 0.72 2.87 60.2
17 2.27 65.5 0.58 2.31 58.5
18 1.82 63.7 0.47 1.86 56.4
19 1.46 62.3 0.38 1.50 55.2
20 1.17 59.8 0.30 1.21 54.1
"""

_FIG4C = """
0 100.00 86.7 25.11 100.00 82.5
1 80.01 85.3 20.10 80.03 82.6
2 64.01 86.1 16.09 64.05 83.5
3 51.22 86.2 12.88 51.27 82.8
4 40.98 86.4 10.31 41.05 82.5
5 32.79 86.3 8.25 32.87 81.6
6 26.24 85.6 6.61 26.32 80.8
7 21.00 85.1 5.30 21.09 79.7
8 16.81 84.2 4.24 16.90 77.7
9 13.45 82.8 3.40 13.55 75.5
10 10.77 80.6 2.73 10.87 73.3
11 8.62 78.3 2.19 8.73 71.1
12 6.91 75.6 1.76 7.01 68.6
13 5.53 72.1 1.42 5.64 64.1
14 4.43 68.1 1.14 4.54 52.3
15 3.55 62.7 0.92 3.66 43.1
16 2.85 61.8 0.74 2.96 39.9
17 2.29 56.8 0.60 2.40 40.3
18 1.84 43.5 0.49 1.95 -
19 1.48 30.8 0.40 1.59 -
"""

_FIG4D = """
0 100.00 88.6 25.14 100.00 85.2
1 80.01 86.6 20.12 80.05 85.3
2 64.02 88.0 16.11 64.09 85.2
3 51.23 88.0 12.90 51.32 85.2
4 41.00 88.3 10.33 41.11 84.5
5 32.81 87.7 8.28 32.94 82.8
6 26.26 87.5 6.64 26.40 37.9
7 21.02 86.5 5.32 21.17 -
8 16.83 85.3 4.27 16.98 -
9 13.48 83.6 3.43 13.64 -
10 10.79 80.9 2.76 10.96 -
11 8.65 62.0 2.22 8.82 -
"""

_FIG4E = """
0 100.00 56.3 25.11 100.00 51.2
1 80.01 51.5 20.10 80.03 50.5
2 64.01 53.4 16.09 64.06 51.9
3 51.22 54.3 12.88 51.28 51.6
4 40.98 54.5 10.31 41.05 50.5
5 32.80 54.5 8.26 32.87 48.6
6 26.24 53.3 6.61 26.33 46.6
7 21.00 51.5 5.30 21.10 43.5
8 16.81 48.5 4.25 16.91 41.0
9 13.46 46.6 3.40 13.56 37.8
10 10.77 42.2 2.73 10.88 34.7
11 8.63 38.4 2.19 8.73 -
12 6.91 33.5 1.76 7.02 -
"""

_FIG4F = """
0 100.00 56.7 25.14 100.00 53.3
1 80.01 53.1 20.12 80.05 52.8
2 64.02 56.2 16.11 64.09 54.4
3 51.23 56.0 12.90 51.32 53.5
4 41.00 57.0 10.33 41.11 53.0
5 32.81 56.2 8.28 32.94 51.6
6 26.26 55.9 6.64 26.40 49.5
7 21.02 53.9 5.32 21.17 46.2
8 16.83 39.8 4.27 16.99 43.7
9 13.48 45.8 3.43 13.64 36.2
"""

_FIG6 = """
0 100.00 80.3 25.06 100.00 78.0
1 80.00 79.2 20.05 80.01 77.6
2 64.01 79.5 16.04 64.02 78.5
3 51.21 80.1 12.84 51.23 78.4
4 40.97 80.4 10.27 41.00 78.5
5 32.78 80.6 8.22 32.81 78.0
6 26.23 80.1 6.58 26.26 78.3
7 20.98 80.9 5.27 21.02 77.8
8 16.79 80.3 4.22 16.83 78.0
9 13.43 80.6 3.38 13.47 77.9
10 10.75 80.4 2.70 10.79 77.2
11 8.60 80.5 2.17 8.65 76.1
12 6.89 80.3 1.74 6.93 75.1
13 5.51 79.8 1.39 5.55 74.6
14 4.41 79.6 1.12 4.46 72.3
15 3.53 79.5 0.90 3.58 70.5
16 2.83 78.7 0.72 2.87 69.8
17 2.27 77.4 0.58 2.31 67.8
18 1.82 76.8 0.47 1.86 65.9
19 1.46 75.6 0.38 1.50 65.6
20 1.17 73.8 0.30 1.21 63.5
"""

# Fig. 4 (final-epoch accuracy of tickets retrained from θ₀, mean of 5 trials), by (model, dataset).
# Fig. 5b (Lenet-12) is withheld on purpose: qsparse's Lenet-12 run is checked against it blind.
PAPER: dict[tuple[str, str], PaperCurve] = {
    ("lenet300_100", "mnist"): _paper("4a", "lenet300_100", "mnist", 0.2540, _FIG4A),
    ("conv2", "cifar10"): _paper("4b", "conv2", "cifar10", 0.2506, _FIG4B),
    ("conv4", "cifar10"): _paper("4c", "conv4", "cifar10", 0.2511, _FIG4C),
    ("conv6", "cifar10"): _paper("4d", "conv6", "cifar10", 0.2514, _FIG4D),
    ("conv4", "cifar100"): _paper("4e", "conv4", "cifar100", 0.2511, _FIG4E),
    ("conv6", "cifar100"): _paper("4f", "conv6", "cifar100", 0.2514, _FIG4F),
}

# Fig. 6: Conv-2 / CIFAR-10 with early stopping (min validation loss, patience 10); qsparse has no
# early stopping, so no run is matched to it automatically.
PAPER_EARLY_STOPPING: dict[tuple[str, str], PaperCurve] = {
    ("conv2", "cifar10"): _paper("6", "conv2", "cifar10", 0.2506, _FIG6),
}


# -- Markdown report ------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(curves: Sequence[Curve]) -> str:
    """One table per (model, dataset): per round, x and accuracy of each curve, the paper beside.

    The paper's value is the one at its x nearest ours (the same round at prune_fraction 0.2);
    its round is noted when it differs.
    """
    parts = ["# Accuracy vs weights remaining",
             "Test accuracy (%) as mean ± std (ddof=1) over replicates; `(n=k)` marks a round with fewer "
             "replicates than the curve. '% left' counts biases; Q's '% of R' is its count as a percentage "
             "of the real model's parameters (the paper's x axis). Paper values are digitized (±0.3 pp); "
             "'—' = no point in the paper."]
    for (model, dataset), group in by_pair(curves).items():
        paper = PAPER.get((model, dataset))
        names = labels(group)
        parts.append(f"## {model} / {dataset}")
        parts.append(f"Paper: Fig. {paper.figure}." if paper else "Paper: no digitized figure for this pair.")
        parts.append("\n".join(f"- **{name}**: {', '.join(c.runs)} (up to {c.n.max()} replicates)"
                               for name, c in zip(names, group)))
        header, columns = ["round"], []
        for name, c in zip(names, group):
            xs = [f"{name}: % left"] if c.algebra == "real" else [f"{name}: % own", f"{name}: % of R"]
            header += xs + [f"{name} acc"] + (["paper"] if paper else [])
            columns.append(_columns(c, paper))
        rounds = sorted({int(r) for c in group for r in c.rounds})
        width = {id(col): len(next(iter(col.values()))) for col in columns}
        rows = [[level, *(v for col in columns for v in col.get(level, [""] * width[id(col)]))] for level in rounds]
        parts.append(markdown_table(header, rows))
    return "\n\n".join(parts) + "\n"


def _columns(c: Curve, paper: PaperCurve | None) -> dict[int, list[str]]:
    """Cells of one curve by round: x value(s), accuracy, paper accuracy."""
    out = {}
    for i, level in enumerate(c.rounds):
        xs = [f"{c.x_own[i]:.2f}"] + ([] if c.algebra == "real" else [f"{c.x_real[i]:.2f}"])
        acc = "—" if not c.n[i] else f"{c.acc_mean[i]:.1f}"
        if c.n[i] > 1:
            acc += f" ± {c.acc_std[i]:.1f}"
        if c.n[i] < c.n.max():
            acc += f" (n={c.n[i]})"
        cells = xs + [acc]
        if paper:
            p_round, p_acc = paper.nearest(c.algebra, c.x_own[i])
            cell = "—" if p_acc is None else f"{p_acc:.1f}"
            cells.append(cell if p_round == level else f"{cell} (r{p_round})")
        out[int(level)] = cells
    return out
