"""Run directories → tidy rows → accuracy-vs-sparsity curves, masks statistics, the paper's tables.

Pure Python and numpy (no jax, no matplotlib), so results can be read anywhere the run
directories are: a laptop, a notebook, CI. The layout read is the one written by
:mod:`qsparse.lottery` (see its module docstring).

Conventions (the paper, §4):

* ``x_own`` is the percentage of the model's *own* parameters left, biases included (the
  paper's "% weights left"); ``x_real`` is the same count of stored weights as a percentage of
  the *real* model's parameters, which is how the paper plots quaternion curves and how curves
  of any two algebras meet on one axis. For a real model the two are equal.
* The algebra is one more config field: curves of any set of algebras aggregate side by side,
  ordered as the algebras are registered (real first) and labelled by their names, the paper's
  letters R and Q kept for ``real`` and ``quat``.
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

from qsparse import algebras, ops, rundir
from qsparse.config import MODEL_DEFAULTS, NON_SEMANTIC, Config

# Config fields that do not define a curve: replicates of one experiment (seed, replicates),
# how far or how often it ran, and bookkeeping. Every other config field does.
NOT_CURVE_FIELDS = ("seed", "replicates", "rounds", "stop_accuracy", "eval_every", *NON_SEMANTIC)

# Per-(replicate, round) values of a tidy row (the rest are the run's config fields).
ROW_FIELDS = frozenset({"run", *rundir.SUMMARY_FIELDS, "epochs_run"} - {"epochs"})

# The quaternion's component names (r, i, j, k), as the notebook labels its columns.
COMPONENTS = algebras.COMPONENTS

# The paper's names of its two algebras; every other algebra is labelled by its own name.
PAPER_LETTERS = {"real": "R", "quat": "Q"}

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
            if rundir.is_run(Path(root), files, dirs):
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
    run = rundir.Run(run_dir)
    config = rundir.read_json(run.config)
    done = rundir.summary_rows(run)
    if not done and run.summary_json.exists():
        done = rundir.read_json(run.summary_json)
    rows = []
    for d in sorted(done, key=lambda d: (d["replicate"], d["round"])):
        d = dict(d)
        d["epochs_run"] = d.pop("epochs", None)
        rows.append({"run": str(run_dir), **config, **d})
    return rows


def load_rows(paths: Iterable[PathLike]) -> list[dict]:
    """Tidy rows of every run found under ``paths``."""
    return [row for run in find_runs(paths) for row in read_rows(run)]


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
        key = tuple(sorted((k, _hashable(v)) for k, v in curve_config(row).items()))
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
        curves.append(
            Curve(
                config=dict(key),
                runs=tuple(dict.fromkeys(r["run"] for r in members)),
                rounds=np.array(rounds),
                **{k: np.array(v, dtype=int if k == "n" else float) for k, v in cols.items()},
            )
        )
    return sorted(curves, key=order)


def order(curve: Any) -> tuple:
    """Sort key of a curve (or anything with ``.config``): model, dataset, the algebra in
    registration order (real first; an algebra not registered here last), then the config."""
    names = algebras.names()
    algebra = curve.config["algebra"]
    rank = names.index(algebra) if algebra in names else len(names)
    return (curve.config["model"], curve.config["dataset"], rank, _sort_key(curve.config))


def load(paths: Iterable[PathLike]) -> list[Curve]:
    """Curves of every run found under ``paths``."""
    return aggregate(load_rows(paths))


def by_pair(curves: Iterable[Curve]) -> dict[tuple[str, str], list[Curve]]:
    """Curves by (model, dataset): what one paper figure (and one report table) shows."""
    out: dict[tuple[str, str], list[Curve]] = {}
    for c in curves:
        out.setdefault((c.model, c.dataset), []).append(c)
    return out


def algebra_label(algebra: str) -> str:
    """'R' and 'Q' for the paper's real and quaternion networks, any other algebra's name."""
    return PAPER_LETTERS.get(algebra, algebra)


def labels(curves: Sequence[Curve]) -> list[str]:
    """:func:`algebra_label` plus the curve fields that differ among ``curves``, e.g.
    'Q (grouping=quaternion)', 'tessarine (grouping=number)'."""
    fields = sorted({k for c in curves for k in c.config} - {"model", "dataset", "algebra"})
    varying = [k for k in fields if len({_hashable(c.config.get(k)) for c in curves}) > 1]
    out = []
    for c in curves:
        name = algebra_label(c.algebra)
        extra = ", ".join(f"{k}={config_text(c.config.get(k))}" for k in varying)
        out.append(f"{name} ({extra})" if extra else name)
    return out


def curve_config(config: dict) -> dict[str, Any]:
    """The curve fields of a run's config (or of a tidy row), a field the run predates at its
    default: such a run ran as the default (the convention that keeps run names valid,
    :meth:`qsparse.config.Config.run_name`), so it pools and compares with newer runs."""
    every = {**Config().to_json(), **MODEL_DEFAULTS}  # what the paper's models resolve to
    defaults = {k: v for k, v in every.items() if k not in NOT_CURVE_FIELDS}
    return {**defaults, **{k: v for k, v in config.items() if k not in _NOT_CURVE}}


_NOT_CURVE = frozenset(NOT_CURVE_FIELDS) | ROW_FIELDS


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list | tuple) else v


def config_text(v: Any) -> str:
    """A config value as text: JSON for lists (as a flag takes them), ``str`` otherwise."""
    return json.dumps(v) if isinstance(v, list | tuple) else str(v)


def _sort_key(config: dict) -> list[tuple[str, str]]:
    return sorted((k, config_text(v)) for k, v in config.items())


# -- layers and masks -----------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LayerDensity:
    """Per-layer density of one replicate across rounds, from the rounds' sparsity.json.

    ``density`` is alive/total real weights of each prunable leaf; for hypercomplex kernels,
    ``number_full`` is the fraction of numbers (quaternions, ...) with all components alive and
    ``number_alive`` the fraction with at least one.
    """

    rounds: list[int]
    density: dict[str, np.ndarray]
    number_full: dict[str, np.ndarray]
    number_alive: dict[str, np.ndarray]


def _number_counts(leaf: dict) -> tuple[int, int, int] | None:
    """(alive, full, total) hypercomplex numbers of a sparsity.json leaf; its keys were
    ``quat_*`` before there were other algebras."""
    for prefix in ("number", "quat"):
        if f"{prefix}_total" in leaf:
            return tuple(leaf[f"{prefix}_{k}"] for k in ("alive", "full", "total"))
    return None


def layer_density(run_dir: PathLike, replicate: int = 0) -> LayerDensity:
    rounds = [
        rd for rd in rundir.Run(run_dir).replicate(replicate).rounds() if rd.sparsity.exists()
    ]
    reports = [rundir.read_json(rd.sparsity)["leaves"] for rd in rounds]
    names = [k for k, v in reports[0].items() if v["prunable"]] if reports else []
    hyper = [k for k in names if _number_counts(reports[0][k])]
    counts = {k: np.array([_number_counts(r[k]) for r in reports], float) for k in hyper}
    return LayerDensity(
        rounds=[rd.level for rd in rounds],
        density={k: np.array([r[k]["alive"] / r[k]["total"] for r in reports]) for k in names},
        number_full={k: c[:, 1] / c[:, 2] for k, c in counts.items()},
        number_alive={k: c[:, 0] / c[:, 2] for k, c in counts.items()},
    )


def mask_rounds(run_dir: PathLike, replicate: int = 0) -> list[int]:
    """Rounds of a replicate whose masks.npz exists."""
    return [
        rd.level for rd in rundir.Run(run_dir).replicate(replicate).rounds() if rd.masks.exists()
    ]


def load_masks(run_dir: PathLike, replicate: int = 0, round: int = 0) -> dict[str, np.ndarray]:
    """A round's masks by parameter path ('QDense_0/qkernel'), as numpy bool arrays."""
    return rundir.load_masks(rundir.Run(run_dir).replicate(replicate).round(round))


def number_states(mask: np.ndarray, n: int = 4) -> dict[str, float]:
    """Fractions of numbers (``n`` components on axis 0: quaternions by default) with all
    components alive, some, or none (sum to 1)."""
    alive = np.asarray(mask).reshape(n, -1).sum(axis=0)
    return {
        "full": float(np.mean(alive == n)),
        "partial": float(np.mean((alive > 0) & (alive < n))),
        "pruned": float(np.mean(alive == 0)),
    }


def pruned_by_component(mask: np.ndarray, n: int = 4) -> np.ndarray:
    """Number of pruned weights in each of the ``n`` components (r, i, j, k of a quaternion)."""
    return (~np.asarray(mask, bool)).reshape(n, -1).sum(axis=1)


def number_summary(run_dir: PathLike, replicate: int = 0) -> list[dict]:
    """Per round, over all hypercomplex kernels: number states and the pruned components' shares.

    Element grouping can leave numbers partly alive; number (or quaternion) grouping never does.
    The shares (``share_<component>``, the run's algebra's component names, e.g. ``share_r``
    ... ``share_k`` for quat; NaN before anything is pruned) tell whether pruning favours a
    component (e.g. spares the real part). A real run has none: an empty list.
    """
    names = _component_names(run_dir)
    out = []
    for level in mask_rounds(run_dir, replicate):
        found = load_masks(run_dir, replicate, level)
        kernels = [m for k, m in found.items() if k.split("/")[-1] in ops.COMPONENT_KERNELS]
        if not kernels:
            continue
        n = kernels[0].shape[0]
        mask = np.concatenate([m.reshape(n, -1) for m in kernels], axis=1)
        pruned = pruned_by_component(mask, n)
        total = int(pruned.sum())
        components = names if len(names) == n else tuple(f"e{c}" for c in range(n))
        out.append(
            {
                "round": level,
                **number_states(mask, n),
                **{
                    f"share_{c}": int(p) / total if total else math.nan
                    for c, p in zip(components, pruned)
                },
            }
        )
    return out


quaternion_summary = number_summary  # its name from before there were other algebras


def _component_names(run_dir: PathLike) -> tuple[str, ...]:
    """The component names of the run's algebra; none for an algebra not registered here."""
    algebra = rundir.read_json(rundir.Run(run_dir).config)["algebra"]
    return algebras.get(algebra).components if algebra in algebras.names() else ()
