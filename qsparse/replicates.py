"""Each replicate of a curve, round by round: what a test between curves needs beyond mean ± std.

:class:`qsparse.results.Curve` keeps per-round means; Welch's t needs each side's (mean, std, n)
and a curve-level statistic needs each replicate's own curve. A replicate that stopped (a layer
about to empty, or the accuracy stop) has no later rounds; :func:`with_stopped` says how such a
replicate counts: ``"drop"`` leaves it out of its later rounds (the survivors' mean, biased upward
on a collapsing curve), ``"chance"`` counts it at chance accuracy there.

numpy only (analysis tier).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from qsparse.results import Curve, read_rows

#: The x axes a comparison pairs on, and how a table names them: stored weights left as a % of
#: the real model's parameters (equal weight budgets, one axis for every algebra), or each
#: model's own density (equal rounds for two curves of one model and algebra).
AXES = {"real": "% of R's weights", "own": "own density %"}

#: How stopped replicates are counted (:func:`with_stopped`).
STOPPED = ("drop", "chance")


@dataclasses.dataclass(frozen=True, eq=False)
class Replicates:
    """One curve's test accuracy (%) per replicate and round, NaN where a replicate has none.

    Replicates are in the order of their runs and replicate numbers, so replicate ``r`` of two
    curves of one seed shares its seed. ``x_real`` and ``x_own`` are per-round means over the
    replicates, as :class:`qsparse.results.Curve` has them; ``filled`` marks values counted at
    chance for a stopped replicate (:func:`with_stopped`).
    """

    rounds: np.ndarray
    x_real: np.ndarray
    x_own: np.ndarray
    acc: np.ndarray  # (replicates, rounds)
    filled: np.ndarray  # (replicates, rounds) bool

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> Replicates:
        """From tidy rows (:func:`qsparse.results.read_rows`) of one curve."""
        rows = list(rows)
        rounds = sorted({r["round"] for r in rows})
        keys = list(dict.fromkeys((r["run"], r["replicate"]) for r in rows))
        acc = np.full((len(keys), len(rounds)), math.nan)
        col = {level: i for i, level in enumerate(rounds)}
        for r in rows:
            acc[keys.index((r["run"], r["replicate"])), col[r["round"]]] = 100 * r["test_acc"]
        x = {
            name: np.array([np.mean([r[field] for r in rows if r["round"] == k]) for k in rounds])
            for name, field in (
                ("real", "weights_remaining_pct_of_real"),
                ("own", "weights_remaining_pct"),
            )
        }
        return cls(np.array(rounds), x["real"], x["own"], acc, np.zeros(acc.shape, bool))

    def x(self, axis: str) -> np.ndarray:
        if axis not in AXES:
            raise ValueError(f"x={axis!r}: valid axes: {', '.join(AXES)}")
        return self.x_real if axis == "real" else self.x_own

    @property
    def started(self) -> int:
        """Replicates with an accuracy at the curve's first round."""
        return int(np.isfinite(self.acc[:, 0]).sum()) if self.acc.size else 0


def replicates(curve: Curve, stopped: str = "drop", chance: float | None = None) -> Replicates:
    """The per-replicate accuracies of ``curve``, read from its runs, stopped ones counted by the
    rule ``stopped`` (:func:`with_stopped`)."""
    rows = [row for run in curve.runs for row in read_rows(run)]
    return with_stopped(Replicates.from_rows(rows), stopped, chance)


def with_stopped(reps: Replicates, rule: str, chance: float | None = None) -> Replicates:
    """``"drop"``: unchanged (a stopped replicate is absent from its later rounds).
    ``"chance"``: each replicate's rounds after its last finite accuracy, up to the curve's last
    round, count at ``chance`` % (a guess: 10 % for ten classes)."""
    if rule not in STOPPED:
        raise ValueError(f"stopped={rule!r}: valid rules: {', '.join(STOPPED)}")
    if rule == "drop":
        return reps
    if chance is None:
        raise ValueError("stopped='chance' needs the chance accuracy (%)")
    finite = np.isfinite(reps.acc)
    columns = reps.acc.shape[1]
    # the column of each replicate's last finite accuracy (a replicate with none: nothing filled)
    last = np.where(finite.any(axis=1), columns - 1 - np.argmax(finite[:, ::-1], axis=1), columns)
    after = np.arange(columns)[None, :] > last[:, None]
    return dataclasses.replace(
        reps, acc=np.where(after, chance, reps.acc), filled=after | reps.filled
    )


def band_means(
    reps: Replicates, lo: float, hi: float, *, x: str = "real", points: int = 33
) -> np.ndarray:
    """Each replicate's accuracy averaged over ``points`` log-spaced x in [lo, hi], linearly
    interpolated in log x between its rounds."""
    grid = np.log(np.geomspace(lo, hi, points))
    log_x = np.log(reps.x(x))
    out = []
    for acc in reps.acc:
        finite = np.isfinite(acc)
        if finite.any():
            order = np.argsort(log_x[finite])
            out.append(np.interp(grid, log_x[finite][order], acc[finite][order]).mean())
    return np.array(out)


def coverage(reps: Replicates, x: str = "real") -> tuple[float, float]:
    """The x range that every replicate with data reached (its rounds' lowest to highest x)."""
    xs = [reps.x(x)[np.isfinite(acc)] for acc in reps.acc if np.isfinite(acc).any()]
    return max(v.min() for v in xs), min(v.max() for v in xs)
