"""Two curves compared at matched real-weight counts, with the two-standard-error rule.

A real and a quaternion network (or one algebra under two protocols) reach different weight counts
round by round, so each round of curve ``b`` is matched with the round of curve ``a`` whose
``x_real`` (percent of the real model's parameters left) is nearest in ratio; a pair further apart
than ``max_ratio`` is left out. A difference is called only where it exceeds two standard errors
of the difference of the two replicate means, ``sqrt(s_a²/n_a + s_b²/n_b)``; with fewer than two
replicates on either side nothing is called.

Pure numpy (analysis tier): it reads :class:`qsparse.results.Curve`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qsparse.report import markdown_table
from qsparse.results import Curve, config_text

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


def select(curves: Sequence[Curve], where: Mapping[str, Any]) -> list[Curve]:
    """The curves whose config has every ``key=value`` of ``where`` (values compared as text)."""
    return [
        c for c in curves if all(config_text(c.config.get(k)) == str(v) for k, v in where.items())
    ]


def markdown(matches: Sequence[Match], label_a: str, label_b: str) -> str:
    """A table of matched rounds: x, accuracy ± std (n) of each, the difference, 2 SE, verdict."""
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
    return markdown_table(header, rows) + "\n"
