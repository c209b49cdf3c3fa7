"""Small-sample statistics for comparing curves: Welch's t, linear contrasts, Holm, bootstrap.

Replicates are few (3 to 5), so every interval and p-value uses Student's t distribution with
Welch–Satterthwaite degrees of freedom, never a normal approximation: at n = 3 per side a
difference of two standard errors is a two-sided p of 0.12 to 0.18, not 0.05. One function,
:func:`contrast`, covers a one-sample mean, Welch's two-sample difference and a difference of
differences (any linear combination of independent means).

numpy and scipy only (analysis tier).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

#: Confidence level of every interval, and the significance level of every call.
LEVEL = 0.95

#: The smallest number of replicates a percentile bootstrap is given (fewer resample to a handful
#: of distinct means, so its interval is too narrow).
BOOTSTRAP_MIN_N = 5


@dataclasses.dataclass(frozen=True)
class Sample:
    """Mean, sample standard deviation (ddof=1) and size of one group of replicates."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> Sample:
        v = np.asarray(values, float)
        return cls(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, v.size)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A contrast's value with its standard error, degrees of freedom, two-sided p (against 0)
    and t-based confidence interval."""

    value: float
    se: float
    df: float
    p: float
    lo: float
    hi: float

    def interval(self, digits: int = 1) -> str:
        return f"[{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def contrast(terms: Sequence[tuple[float, Sample]], level: float = LEVEL) -> Estimate:
    """``sum(c * mean)`` over independent groups, with SE ``sqrt(sum(c² s² / n))``, Welch–
    Satterthwaite df ``(sum v)² / sum(v² / (n - 1))`` (``v = c² s² / n``), the two-sided p of
    ``value / se`` under Student's t with that df, and the t-based ``level`` interval.

    Every group needs n >= 2. With zero spread everywhere the df is ``sum(n - 1)`` and the
    interval a point (p is 1 for a zero value, 0 otherwise).
    """
    short = [s.n for _, s in terms if s.n < 2]
    if short or not terms:
        raise ValueError(f"every group needs at least 2 replicates, got n = {short or 'none'}")
    value = math.fsum(c * s.mean for c, s in terms)
    v = [c * c * s.std**2 / s.n for c, s in terms]
    se = math.sqrt(math.fsum(v))
    if se == 0:
        p = 1.0 if value == 0 else 0.0
        return Estimate(value, 0.0, float(sum(s.n - 1 for _, s in terms)), p, value, value)
    df = se**4 / math.fsum(vi**2 / (s.n - 1) for vi, (_, s) in zip(v, terms))
    p = float(2 * scipy_stats.t.sf(abs(value) / se, df))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * se
    return Estimate(value, se, df, p, value - half, value + half)


def welch(a: Sample, b: Sample, level: float = LEVEL) -> Estimate:
    """Welch's t for ``b.mean - a.mean`` (unequal variances)."""
    return contrast([(1.0, b), (-1.0, a)], level)


def mean_interval(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> Estimate:
    """One-sample t: the mean of ``values`` with n - 1 df (p against a mean of 0)."""
    return contrast([(1.0, Sample.of(values))], level)


def difference_of_differences(
    b1: Sample, a1: Sample, b2: Sample, a2: Sample, level: float = LEVEL
) -> Estimate:
    """``(b1 - a1) - (b2 - a2)``, four independent groups: e.g. (Q ticket - Q control) -
    (R ticket - R control), or how much of a gap one change of protocol accounts for."""
    return contrast([(1.0, b1), (-1.0, a1), (-1.0, b2), (1.0, a2)], level)


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given; NaN (no test) stays NaN and does
    not count among the tests. The i-th smallest of m p-values becomes
    ``max over j <= i of min(1, (m - j + 1) p_(j))``."""
    p = np.asarray(p, float)
    out = np.full(p.shape, math.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def bootstrap_interval(
    b: Sequence[float] | np.ndarray,
    a: Sequence[float] | np.ndarray | None = None,
    level: float = LEVEL,
    draws: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(b)`` (paired differences), or of ``mean(b) -
    mean(a)`` with each side resampled on its own. Each side needs ``BOOTSTRAP_MIN_N``
    values."""
    sides = [np.asarray(s, float) for s in (b, a) if s is not None]
    short = [s.size for s in sides if s.size < BOOTSTRAP_MIN_N]
    if short:
        raise ValueError(f"a bootstrap needs n >= {BOOTSTRAP_MIN_N} per side, got n = {short}")
    rng = np.random.default_rng(seed)
    means = [s[rng.integers(0, s.size, (draws, s.size))].mean(axis=1) for s in sides]
    stat = means[0] - means[1] if len(means) == 2 else means[0]
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(stat, [tail, 100 - tail])
    return float(lo), float(hi)
