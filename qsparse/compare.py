"""Two curves compared at matched real-weight counts, with the two-standard-error rule.

Networks of two algebras (real and quaternion, tessarine and quaternion, ...; or one algebra under
two protocols) reach different weight counts round by round, so each round of curve ``b`` is
matched with the round of curve ``a`` whose ``x_real`` (stored weights left, as a percentage of the
real model's parameters: one axis for every algebra) is nearest in ratio; a pair further apart
than ``max_ratio`` is left out. A difference is called only where it exceeds two standard errors
of the difference of the two replicate means, ``sqrt(s_a²/n_a + s_b²/n_b)``; with fewer than two
replicates on either side nothing is called.

Pure numpy (analysis tier): it reads :class:`qsparse.results.Curve`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from qsparse import rundir
from qsparse.report import markdown_table
from qsparse.results import Curve, by_pair, config_text, labels

#: A matched pair more than this factor apart in x_real is not a match (R's rounds are 1.25x apart).
MAX_RATIO = 1.15


@dataclasses.dataclass(frozen=True)
class Point:
    """One round of one curve: x (% of the real model's weights) and accuracy mean, std, n."""

    round: int
    x_real: float
    acc: float
    std: float
    n: int

    def cell(self) -> str:
        spread = f" ± {self.std:.1f}" if self.n > 1 else ""
        return f"{self.acc:.1f}{spread} ({self.n})"


@dataclasses.dataclass(frozen=True)
class Match:
    """Curve ``b`` at one of its rounds against curve ``a`` at the nearest weight count."""

    a: Point
    b: Point

    @property
    def diff(self) -> float:
        """b − a, in accuracy points."""
        return self.b.acc - self.a.acc

    @property
    def se(self) -> float:
        """Standard error of ``diff``; NaN where either side has fewer than two replicates."""
        if self.a.n < 2 or self.b.n < 2:
            return math.nan
        return math.sqrt(self.a.std**2 / self.a.n + self.b.std**2 / self.b.n)

    @property
    def verdict(self) -> str:
        """'b' or 'a' (which is ahead, by more than 2 SE), '=' (within 2 SE), '?' (n < 2)."""
        if math.isnan(self.se):
            return "?"
        if abs(self.diff) <= 2 * self.se:
            return "="
        return "b" if self.diff > 0 else "a"


def points(curve: Curve) -> list[Point]:
    """The rounds of ``curve`` that have at least one finite accuracy."""
    return [
        Point(int(r), float(x), float(acc), float(std), int(n))
        for r, x, acc, std, n in zip(
            curve.rounds, curve.x_real, curve.acc_mean, curve.acc_std, curve.n
        )
        if n > 0
    ]


def matched(a: Curve, b: Curve, *, max_ratio: float = MAX_RATIO) -> list[Match]:
    """Every round of ``b`` with the round of ``a`` nearest in x_real (within ``max_ratio``)."""
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    candidates = points(a)
    if not candidates:
        return []
    log_x = np.log([p.x_real for p in candidates])
    out = []
    for q in points(b):
        distance = np.abs(log_x - math.log(q.x_real))
        nearest = int(np.argmin(distance))
        if distance[nearest] <= math.log(max_ratio):
            out.append(Match(candidates[nearest], q))
    return out


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


def select(curves: Sequence[Curve], where: Mapping[str, Any]) -> list[Curve]:
    """The curves whose config has every ``key=value`` of ``where`` (values compared as text)."""
    return [
        c for c in curves if all(config_text(c.config.get(k)) == str(v) for k, v in where.items())
    ]


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


def markdown(
    matches: Sequence[Match],
    label_a: str,
    label_b: str,
    alive: tuple[str, Mapping[int, float], Mapping[int, float]] | None = None,
) -> str:
    """A table of matched rounds: x, accuracy ± std (n) of each, the difference, 2 SE, verdict.

    ``alive``: (layer, a's and b's mean weights alive per round, see :func:`alive`) adds the
    layer's survivors of each side.
    """
    name = {"a": f"{label_a} ahead", "b": f"{label_b} ahead", "=": "within 2 SE", "?": "n < 2"}
    rows = [
        [
            f"{m.b.x_real:.2f}",
            m.b.round,
            m.b.cell(),
            f"{m.a.x_real:.2f}",
            m.a.round,
            m.a.cell(),
            f"{m.diff:+.1f}",
            "—" if math.isnan(m.se) else f"{2 * m.se:.1f}",
            name[m.verdict],
        ]
        for m in matches
    ]
    if alive is not None:
        layer, alive_a, alive_b = alive
        for row, m in zip(rows, matches):
            row.insert(3, _count(alive_b.get(m.b.round)))
            row.insert(7, _count(alive_a.get(m.a.round)))
    header = [
        f"{label_b}: % of R",
        "round",
        f"{label_b} acc",
        f"{label_a}: % of R",
        "round",
        f"{label_a} acc",
        f"{label_b} − {label_a}",
        "2 SE",
        "verdict",
    ]
    if alive is not None:
        header.insert(3, f"{label_b}: {layer} alive")
        header.insert(7, f"{label_a}: {layer} alive")
    return markdown_table(header, rows) + "\n"


def _count(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}" if v == round(v) else f"{v:,.1f}"
