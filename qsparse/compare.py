"""Two curves compared at matched x, point by point and over a band, with Welch's t and Holm.

Networks of two algebras (real and quaternion, tessarine and quaternion, ...; or one algebra under
two protocols) reach different weight counts round by round, so each round of curve ``b`` is
matched with the round of curve ``a`` nearest in ratio on one x axis (a pair further apart than
``max_ratio`` is left out):

* ``x="real"``: stored weights left as a percentage of the *real* model's parameters (equal
  weight budgets: one axis for every algebra);
* ``x="own"``: each model's own density (equal rounds for two curves of one model and algebra).

At each matched pair the difference of the replicate means is tested with Welch's t
(:mod:`qsparse.stats`: Student's t with Welch–Satterthwaite df, a t-based 95 % interval); a
table's p-values are Holm-adjusted together and only an adjusted p < 0.05 is called. A pair with
fewer than two replicates on either side gets no test. :func:`band` gives one number per pair of
curves: the mean difference over a band of x, in log x, per replicate, with a t interval over
replicates (and a percentile bootstrap where n >= 5).

Stopped replicates (a layer about to empty, or the accuracy stop) have no later rounds, so a
collapsing curve's later means average its survivors only, biased upward. Two rules
(:func:`qsparse.replicates.with_stopped`): ``"drop"`` (default) keeps the survivors, flags every
cell with fewer replicates than the curve started with ("2 of 3"), and cuts the band to the x
range that every replicate of both curves reached; ``"chance"`` counts a stopped replicate at
chance accuracy at every later round of its curve (the cell says how many: "3, 1 at chance").

numpy and scipy (analysis tier): it reads :class:`qsparse.results.Curve` and the run rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from qsparse import rundir, stats
from qsparse.replicates import AXES, Replicates, band_means, coverage
from qsparse.report import markdown_table
from qsparse.results import Curve, PathLike, by_pair, config_text, labels, load

#: A matched pair more than this factor apart in x is not a match (R's rounds are 1.25x apart).
MAX_RATIO = 1.15

#: Significance level of a call, on Holm-adjusted p-values.
ALPHA = 1 - stats.LEVEL


@dataclasses.dataclass(frozen=True, eq=False)
class Point:
    """One round of one curve: its x on both axes and its replicates' accuracies (%)."""

    round: int
    x_real: float
    x_own: float
    values: np.ndarray  # finite accuracies of this round
    filled: int  # how many of them count a stopped replicate at chance
    started: int  # replicates at the curve's first round

    def x(self, axis: str) -> float:
        return self.x_real if axis == "real" else self.x_own

    @property
    def sample(self) -> stats.Sample:
        return stats.Sample.of(self.values)

    @property
    def n(self) -> int:
        return self.values.size

    def cell(self) -> str:
        s = self.sample
        spread = f" ± {s.std:.1f}" if s.n > 1 else ""
        if self.filled:
            count = f"{s.n}, {self.filled} at chance"
        elif s.n < self.started:
            count = f"{s.n} of {self.started}"
        else:
            count = f"{s.n}"
        return f"{s.mean:.1f}{spread} ({count})"


def points(reps: Replicates) -> list[Point]:
    """The rounds of ``reps`` that have at least one finite accuracy."""
    out = []
    for i, level in enumerate(reps.rounds):
        finite = np.isfinite(reps.acc[:, i])
        if finite.any():
            values, filled = reps.acc[finite, i], int(reps.filled[finite, i].sum())
            x_real, x_own = float(reps.x_real[i]), float(reps.x_own[i])
            out.append(Point(int(level), x_real, x_own, values, filled, reps.started))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Match:
    """Curve ``b`` at one of its rounds against curve ``a`` at the nearest x."""

    a: Point
    b: Point

    @property
    def diff(self) -> float:
        """b − a, in accuracy points."""
        return self.b.sample.mean - self.a.sample.mean

    @property
    def test(self) -> stats.Estimate | None:
        """Welch's t of ``diff``; None where either side has fewer than two replicates."""
        if self.a.n < 2 or self.b.n < 2:
            return None
        return stats.welch(self.a.sample, self.b.sample)


def matched(
    a: Replicates, b: Replicates, *, x: str = "real", max_ratio: float = MAX_RATIO
) -> list[Match]:
    """Every round of ``b`` with the round of ``a`` nearest on axis ``x`` (within
    ``max_ratio``)."""
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    a.x(x)  # checks the axis
    candidates = points(a)
    if not candidates:
        return []
    log_x = np.log([p.x(x) for p in candidates])
    out = []
    for q in points(b):
        distance = np.abs(log_x - math.log(q.x(x)))
        nearest = int(np.argmin(distance))
        if distance[nearest] <= math.log(max_ratio):
            out.append(Match(candidates[nearest], q))
    return out


def decomposition(first: Match, second: Match) -> stats.Estimate:
    """``first``'s difference minus ``second``'s, e.g. (Q ticket − Q control) at one x minus
    (R ticket − R control) at the same x, with its Welch-style interval
    (:func:`qsparse.stats.difference_of_differences`)."""
    samples = (first.b.sample, first.a.sample, second.b.sample, second.a.sample)
    return stats.difference_of_differences(*samples)


def holm(matches: Sequence[Match]) -> np.ndarray:
    """The Holm-adjusted p of each match's test, within ``matches`` (NaN: no test)."""
    return stats.holm([m.test.p if m.test else math.nan for m in matches])


def verdicts(matches: Sequence[Match], label_a: str, label_b: str) -> list[str]:
    """Per match: who is ahead at a Holm-adjusted p < 0.05, 'within error', or no test."""
    out = []
    for m, p in zip(matches, holm(matches)):
        if math.isnan(p):
            out.append("no test (n < 2)")
        elif p < ALPHA:
            out.append(f"{label_b if m.diff > 0 else label_a} ahead")
        else:
            out.append("within error")
    return out


def calls(matches: Sequence[Match]) -> dict[str, int]:
    """How many matches are tested, and called at p < 0.05 before and after Holm; and, for
    comparison, how many the rule this replaces would call (beyond two standard errors)."""
    tests = [(m.diff, m.test) for m in matches if m.test]
    return {
        "matched": len(matches),
        "tested": len(tests),
        "p < 0.05": sum(t.p < ALPHA for _, t in tests),
        "Holm p < 0.05": int(np.sum(holm(matches) < ALPHA)),
        "beyond 2 SE": sum(abs(d) > 2 * t.se for d, t in tests),
    }


def markdown(
    matches: Sequence[Match],
    label_a: str,
    label_b: str,
    alive: tuple[str, Mapping[int, float], Mapping[int, float]] | None = None,
    *,
    x: str = "real",
) -> str:
    """A table of matched rounds: x (axis ``x``, named in the header), accuracy ± std (n) of
    each, the difference with its Welch 95 % interval, df, p, Holm-adjusted p and the verdict.

    ``alive``: (layer, a's and b's mean weights alive per round, see :func:`alive`) adds the
    layer's survivors of each side.
    """
    axis = "% of R" if x == "real" else "% own"
    rows = []
    for m, p_holm, verdict in zip(matches, holm(matches), verdicts(matches, label_a, label_b)):
        t = m.test
        test = ["—"] * 4 if t is None else [t.interval(), f"{t.df:.1f}", _p(t.p), _p(p_holm)]
        rows.append(
            [f"{m.b.x(x):.2f}", m.b.round, m.b.cell(), f"{m.a.x(x):.2f}", m.a.round, m.a.cell()]
            + [f"{m.diff:+.1f}", *test, verdict]
        )
    header = [f"{label_b}: {axis}", "round", f"{label_b} acc", f"{label_a}: {axis}", "round"]
    header += [f"{label_a} acc", f"{label_b} − {label_a}", "95 % CI", "df", "p", "p Holm"]
    header += ["verdict"]
    if alive is not None:
        layer, alive_a, alive_b = alive
        for row, m in zip(rows, matches):
            row.insert(3, _count(alive_b.get(m.b.round)))
            row.insert(7, _count(alive_a.get(m.a.round)))
        header.insert(3, f"{label_b}: {layer} alive")
        header.insert(7, f"{label_a}: {layer} alive")
    return markdown_table(header, rows) + "\n"


def nearest(
    matches: Sequence[Match], target: float, *, x: str = "real", max_ratio: float = MAX_RATIO
) -> int | None:
    """Index of the match whose ``b`` round is nearest ``target`` % on axis ``x`` (in log x), or
    None where no round of ``b`` is within ``max_ratio`` of it: a summary "near 3 %" cell reads
    one matched round, never an interpolation."""
    if not matches:
        return None
    distance = [abs(math.log(m.b.x(x) / target)) for m in matches]
    best = int(np.argmin(distance))
    return best if distance[best] <= math.log(max_ratio) else None


def near_text(
    matches: Sequence[Match],
    target: float,
    label_a: str,
    label_b: str,
    *,
    x: str = "real",
    max_ratio: float = MAX_RATIO,
) -> str:
    """One line: the matched round nearest ``target`` (:func:`nearest`), its difference with the
    Welch interval, p, and the p Holm-adjusted within all of ``matches`` (the table's)."""
    head = f"Near {target:g} ({AXES[x]}): {label_b} − {label_a}"
    i = nearest(matches, target, x=x, max_ratio=max_ratio)
    if i is None:
        return f"{head}: no matched round within {max_ratio:g}x of {target:g}"
    m, t = matches[i], matches[i].test
    at = f"at {m.b.x(x):.2f} % (against {m.a.x(x):.2f} %)"
    if t is None:
        return f"{head} {m.diff:+.1f} pp {at}, no test (n < 2)"
    return f"{head} {m.diff:+.1f} pp {t.interval()} {at}, p {_p(t.p)}, Holm {_p(holm(matches)[i])}"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _count(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}" if v == round(v) else f"{v:,.1f}"


@dataclasses.dataclass(frozen=True)
class Band:
    """The mean of b − a over x in [lo, hi] (in log x), per replicate, with its t interval."""

    lo: float  # the part of the band asked for that every replicate of both curves reached
    hi: float
    asked: tuple[float, float]
    n_a: int
    n_b: int
    paired: bool  # replicate r of b against replicate r of a (equal counts), else Welch
    estimate: stats.Estimate
    bootstrap: tuple[float, float] | None  # percentile interval, where n >= 5


def band(a: Replicates, b: Replicates, lo: float, hi: float, *, x: str = "real") -> Band:
    """The curve-level statistic: mean of b − a over the band [lo, hi] % of axis ``x``.

    The band is cut to the x range every replicate of both curves reached (under the ``"drop"``
    rule the survivors' rounds only; :func:`qsparse.replicates.with_stopped`). With equal
    replicate counts the replicates pair by index and the interval is a one-sample t over the
    paired differences (n - 1 df); otherwise Welch's t on the two sets of replicate means. A
    ValueError says why there is no statistic (nothing of the band covered, fewer than two
    replicates).
    """
    if not 0 < lo < hi:
        raise ValueError(f"band [{lo}, {hi}]: need 0 < lo < hi (% of x)")
    (a_lo, a_hi), (b_lo, b_hi) = coverage(a, x), coverage(b, x)
    cut_lo, cut_hi = max(lo, a_lo, b_lo), min(hi, a_hi, b_hi)
    if cut_lo >= cut_hi:
        raise ValueError(
            f"no part of the band [{lo:g}, {hi:g}] is reached by every replicate "
            f"(a: {a_lo:.2f}-{a_hi:.2f}, b: {b_lo:.2f}-{b_hi:.2f})"
        )
    mean_a, mean_b = (band_means(r, cut_lo, cut_hi, x=x) for r in (a, b))
    paired = mean_a.size == mean_b.size
    if paired:
        estimate = stats.mean_interval(mean_b - mean_a)
        enough = mean_a.size >= stats.BOOTSTRAP_MIN_N
        boot = stats.bootstrap_interval(mean_b - mean_a) if enough else None
    else:
        estimate = stats.welch(stats.Sample.of(mean_a), stats.Sample.of(mean_b))
        enough = min(mean_a.size, mean_b.size) >= stats.BOOTSTRAP_MIN_N
        boot = stats.bootstrap_interval(mean_b, mean_a) if enough else None
    return Band(cut_lo, cut_hi, (lo, hi), mean_a.size, mean_b.size, paired, estimate, boot)


def band_text(result: Band, label_a: str, label_b: str, x: str = "real") -> str:
    """One line stating the band statistic, its interval and how it was computed."""
    e = result.estimate
    how = "paired by replicate" if result.paired else "Welch, unpaired"
    n = f"n = {result.n_a}" if result.paired else f"n = {result.n_a} and {result.n_b}"
    boot = (
        f"; bootstrap 95 % [{result.bootstrap[0]:+.2f}, {result.bootstrap[1]:+.2f}]"
        if result.bootstrap
        else "; no bootstrap (n < 5)"
    )
    cut = (result.lo, result.hi) != result.asked
    reached = f" (of {result.asked[0]:g}-{result.asked[1]:g}: what every replicate reached)"
    return (
        f"Mean {label_b} − {label_a} over {result.lo:.2f}-{result.hi:.2f} {AXES[x]}"
        f"{reached if cut else ''} (in log x): "
        f"{e.value:+.2f} pp, 95 % CI {e.interval(2)} (t, df {e.df:.1f}, {how}, {n}), "
        f"p {_p(e.p)}{boot}"
    )


def aa_pairs(first: PathLike, second: PathLike) -> tuple[list[tuple[Curve, Curve]], list[Curve]]:
    """The curves of ``first`` and ``second`` (each a run or a folder of runs, loaded apart so
    that they are not pooled) with identical curve fields, paired; and the curves of either
    without a partner."""
    one, two = load([first]), load([second])
    pairs = [(c, d) for c in one for d in two if c.config == d.config]
    paired = {id(c) for pair in pairs for c in pair}
    return pairs, [c for c in one + two if id(c) not in paired]


def alive(curve: Curve, layer: str) -> dict[int, float]:
    """Mean real weights alive in ``layer`` per round over the curve's replicates (sparsity.json).

    How many output weights survive is what separates the two protocols' curves, so the tables
    can show it beside the accuracies. Rounds without a sparsity.json are left out.
    """
    counts: dict[int, list[int]] = {}
    for run in curve.runs:
        for replicate in rundir.Run(run).replicates():
            for rd in replicate.rounds():
                if rd.sparsity.exists():
                    leaves = rundir.read_json(rd.sparsity)["leaves"]
                    if layer not in leaves:
                        raise KeyError(
                            f"no layer {layer!r} in {rd.sparsity}; layers: {sorted(leaves)}"
                        )
                    counts.setdefault(rd.level, []).append(leaves[layer]["alive"])
    return {level: float(np.mean(c)) for level, c in sorted(counts.items())}


def parse_where(items: Sequence[str]) -> dict[str, str]:
    """``key=value`` items (a comma-separated flag's) as a dict; an item without ``=`` continues
    the value before it, so that a list value reads as its flag does: ``algebra=real,hidden=3,9``
    gives ``{"algebra": "real", "hidden": "3,9"}``. A ValueError where the first has no ``=``."""
    if not items or "=" not in items[0]:
        raise ValueError(f"expected key=value pairs, got {list(items)}")
    joined: list[str] = []
    for item in items:
        if "=" in item:
            joined.append(item)
        else:
            joined[-1] += f",{item}"
    return dict(item.split("=", 1) for item in joined)


def select(curves: Sequence[Curve], where: Mapping[str, Any]) -> list[Curve]:
    """The curves whose config has every ``key=value`` of ``where`` (values compared as text; a
    list also as a flag spells it: ``hidden`` as ``3,9``, ``layer_fractions`` as
    ``output/*=0.1``)."""
    return [c for c in curves if all(_equal(c.config.get(k), str(v)) for k, v in where.items())]


def _equal(value: Any, text: str) -> bool:
    return text in (config_text(value), _flag_text(value))


def _flag_text(value: Any) -> str | None:
    """A list value as its flag spells it (items joined by commas, a pair as ``key=value``)."""
    if not isinstance(value, list | tuple):
        return None
    return ",".join(
        f"{x[0]}={x[1]}" if isinstance(x, list | tuple) and len(x) == 2 else str(x) for x in value
    )


def pick(
    curves: Iterable[Curve],
    where: Mapping[str, Mapping[str, Any]],
    models: Collection[str] = (),
) -> dict[tuple[str, str], dict[str, Curve]]:
    """Per (model, dataset), the one curve that each side ``where[name]`` selects (:func:`select`).

    A (model, dataset) where a side selects nothing is left out, as is a model not in ``models``
    (when given). A side that selects several curves is ambiguous: a ValueError names the side,
    the (model, dataset) and the labels of its curves, so that the caller can narrow ``where``.
    """
    out = {}
    for (model, dataset), group in by_pair(curves).items():
        if models and model not in models:
            continue
        chosen = {name: select(group, w) for name, w in where.items()}
        if not all(chosen.values()):
            continue
        for name, found in chosen.items():
            if len(found) > 1:
                raise ValueError(
                    f"{name} matches {len(found)} curves of {model}/{dataset}: "
                    f"{labels(group)}; add key=value pairs to pick one"
                )
        out[model, dataset] = {name: found[0] for name, found in chosen.items()}
    return out
