"""Figures of IMP results: accuracy vs weights remaining (as the paper's Fig. 4), layer densities.

Curves of any algebras share an axis: one curve each, labelled as :func:`qsparse.results.labels`
(R, Q, tessarine, ...), each algebra with its own marker (:func:`marker`) beside the colour cycle.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure``, no
pyplot): they render through Agg (PNG) and the SVG backend without touching a global backend,
and a notebook displays them as any returned Figure. Data comes from :mod:`qsparse.results`,
which does not need matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from qsparse import accounting, algebras, results
from qsparse.paper import PAPER, PaperCurve

# Halvings of 100 % (the paper speaks of the 25 %, 12.5 % and 3.12 % marks).
X_TICKS = [100 / 2**k for k in range(14)]

# The paper's markers for its two algebras (its dashed curves use them too); the others in turn.
PAPER_MARKERS = {"real": "o", "quat": "s"}
OTHER_MARKERS = ("^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def marker(algebra: str) -> str:
    """The marker of ``algebra``'s curves: the paper's for real and quat, then one per other
    algebra in registration order (an algebra not registered here: the last)."""
    if algebra in PAPER_MARKERS:
        return PAPER_MARKERS[algebra]
    others = [a for a in algebras.names() if a not in PAPER_MARKERS]
    rank = others.index(algebra) if algebra in others else len(OTHER_MARKERS) - 1
    return OTHER_MARKERS[rank % len(OTHER_MARKERS)]


X_LABELS = {
    "own": "% of the model's own weights remaining",
    "real": "% weights remaining, relative to the real model",
}


def accuracy_figure(
    curves: Sequence[results.Curve],
    x: str = "real",
    paper: PaperCurve | None = None,
    title: str | None = None,
) -> Figure:
    """Test accuracy (%) vs % weights remaining, log x inverted (100 → small), mean ± std bars.

    ``x='real'`` puts every curve at its stored weights relative to the real model (the paper's
    convention: a quaternion curve starts near 25 %, a complex one near 50 %); ``x='own'`` at
    its model's own fraction. ``paper`` adds the digitized real and quaternion curves of the
    paper, dashed.
    """
    if x not in X_LABELS:
        raise ValueError(f"x={x!r}; valid: {list(X_LABELS)}")
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for name, c in zip(results.labels(curves), curves):
        xs = c.x_own if x == "own" else c.x_real
        ax.errorbar(
            xs,
            c.acc_mean,
            yerr=np.nan_to_num(c.acc_std),
            marker=marker(c.algebra),
            ms=4,
            capsize=2,
            label=name,
        )
    if paper is not None:
        q_x = paper.q_x_own if x == "own" else paper.q_x_of_real
        for algebra, xs, accs, color in (
            ("real", paper.r_x, paper.r_acc, "0.2"),
            ("quat", q_x, paper.q_acc, "0.55"),
        ):
            pts = [(a, b) for a, b in zip(xs, accs) if b is not None]
            ax.plot(
                *zip(*pts),
                ls="--",
                ms=3,
                mfc="none",
                lw=1,
                label=f"paper {results.algebra_label(algebra)} (Fig. {paper.figure})",
                color=color,
                marker=PAPER_MARKERS[algebra],
            )
    _weights_axis(ax, x)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def comparison_figure(
    a: results.Curve,
    b: results.Curve,
    labels: tuple[str, str] = ("a", "b"),
    alive: tuple[str, Mapping[int, float], Mapping[int, float]] | None = None,
    title: str | None = None,
) -> Figure:
    """Two curves against % of the real model's weights (mean ± std), as compared in tables.

    ``alive`` (layer, a's and b's mean weights alive per round, :func:`qsparse.compare.alive`)
    adds a lower panel of that layer's survivors on the same x: where the accuracies part, the
    reader sees whether the output layer parted first. Each curve has its algebra's marker, or
    'o' and 's' when both are of one algebra.
    """
    fig = Figure(figsize=(6.4, 6.4 if alive else 4.4), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1]) if alive else [fig.add_subplot()]
    markers = "os" if a.algebra == b.algebra else [marker(a.algebra), marker(b.algebra)]
    for c, label, symbol in zip((a, b), labels, markers):
        keep = c.n > 0
        axes[0].errorbar(
            c.x_real[keep],
            c.acc_mean[keep],
            yerr=np.nan_to_num(c.acc_std[keep]),
            marker=symbol,
            ms=4,
            capsize=2,
            label=label,
        )
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize="small")
    if alive:
        layer, *counts = alive
        for c, label, symbol, per_round in zip((a, b), labels, markers, counts):
            x_of = dict(zip(c.rounds.tolist(), c.x_real.tolist()))
            rounds = [r for r in per_round if r in x_of]
            axes[1].plot(
                [x_of[r] for r in rounds],
                [per_round[r] for r in rounds],
                marker=symbol,
                ms=4,
                label=label,
            )
        axes[1].set_yscale("log")
        axes[1].set_ylabel(f"{layer}\nweights alive")
    _weights_axis(axes[-1], "real")  # shared: the upper panel follows
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    if title:
        axes[0].set_title(title)
    return fig


def _weights_axis(ax, x: str) -> None:
    """Log x of weights remaining, inverted (100 → small), ticked at the halvings of 100 %."""
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_major_locator(FixedLocator(X_TICKS))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(X_LABELS[x])


def layer_density_figure(density: results.LayerDensity, title: str | None = None) -> Figure:
    """Density of each prunable layer per round; dashed: hypercomplex numbers with all their
    components alive."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, d) in enumerate(density.density.items()):
        ax.plot(density.rounds, 100 * d, marker="o", ms=3, color=f"C{i}", label=name)
        if name in density.number_full:
            ax.plot(
                density.rounds,
                100 * density.number_full[name],
                ls="--",
                color=f"C{i}",
                label=f"{name}: whole numbers",
            )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pruning round")
    ax.set_ylabel("weights alive (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


DEPLOYMENT_X = {
    "bytes": "exported file (float32), bytes",
    "latency": "sparse runtime latency at batch 1 (ms, CPU)",
}


def deployment_figure(
    deployments: Sequence[accounting.Deployment], x: str = "bytes", title: str | None = None
) -> Figure:
    """Test accuracy (%) of every round against its exported file's bytes (``x='bytes'``) or
    the sparse runtime's median batch-1 latency (``x='latency'``), log x; one curve per
    configuration (each algebra, each grouping; :func:`qsparse.accounting.pool`): the mean over
    its replicates at every round they all finished, shaded over their range.
    """
    if x not in DEPLOYMENT_X:
        raise ValueError(f"x={x!r}; valid: {list(DEPLOYMENT_X)}")
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    field = "file_bytes" if x == "bytes" else accounting.latency_field("sparse", 1)
    for curve in accounting.pool(deployments, field):
        xs = curve.x if x == "bytes" else 1e3 * curve.x
        n = curve.replicates
        label = curve.label + (f" (mean of {n}, range shaded)" if n > 1 else "")
        (line,) = ax.plot(xs, curve.acc, marker=marker(curve.algebra), ms=4, label=label)
        if n > 1:
            ax.fill_between(xs, curve.low, curve.high, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel(DEPLOYMENT_X[x])
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def write_deployment_figures(
    deployments: Sequence[accounting.Deployment], out: str | os.PathLike
) -> list[Path]:
    """deployment_{bytes,latency}_<model>_<dataset>.{png,svg}: :func:`deployment_figure` per
    (model, dataset)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (model, dataset), group in results.by_pair(deployments).items():
        for x in DEPLOYMENT_X:
            fig = deployment_figure(group, x, title=f"{model} / {dataset}")
            written += save(fig, out / f"deployment_{x}_{model}_{dataset}")
    return written


def save(fig: Figure, stem: Path) -> list[Path]:
    """``stem``.png and ``stem``.svg."""
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"]
    for p in paths:
        fig.savefig(p, dpi=150)
    return paths


def write_figures(runs: Iterable[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    """Accuracy figures per (model, dataset), in both x conventions, and a layer-density figure
    per run."""
    runs = results.find_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (model, dataset), curves in results.by_pair(
        results.aggregate(row for run in runs for row in results.read_rows(run))
    ).items():
        paper = PAPER.get((model, dataset))
        for x in X_LABELS:
            fig = accuracy_figure(curves, x, paper, title=f"{model} / {dataset}")
            written += save(fig, out / f"accuracy_{model}_{dataset}_{x}")
    for run in runs:
        density = results.layer_density(run)
        if density.rounds:
            written += save(
                layer_density_figure(density, title=run.name), out / f"density_{run.name}"
            )
    return written
