"""Markdown tables of curves of any algebras, with the paper's digitized values beside qsparse's
(for the paper's two algebras, real and quat)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from qsparse.paper import PAPER, PaperCurve
from qsparse.results import PAPER_LETTERS, Curve, by_pair, labels


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(curves: Sequence[Curve]) -> str:
    """One table per (model, dataset): per round, x and accuracy of each curve, the paper beside.

    A real curve has one x ('% left'); any other algebra's two: '% own' (the model's own
    density) and '% of R' (its stored weights alive as a percentage of the real model's
    parameters). The paper's value (real and quat curves only) is the one at its x nearest ours
    (the same round at prune_fraction 0.2); its round is noted when it differs.
    """
    parts = [
        "# Accuracy vs weights remaining",
        "Test accuracy (%) as mean ± std (ddof=1) over replicates; `(n=k)` marks a round with "
        "fewer replicates than the curve. '% left' counts biases; Q's '% of R' is its count as "
        "a percentage of the real model's parameters (the paper's x axis). Paper values are "
        "digitized (±0.3 pp); '—' = no point in the paper." + _other_algebras_note(curves),
    ]
    for (model, dataset), group in by_pair(curves).items():
        paper = PAPER.get((model, dataset))
        names = labels(group)
        parts.append(f"## {model} / {dataset}")
        parts.append(
            f"Paper: Fig. {paper.figure}." if paper else "Paper: no digitized figure for this pair."
        )
        parts.append(
            "\n".join(
                f"- **{name}**: {', '.join(c.runs)} (up to {c.n.max()} replicates)"
                for name, c in zip(names, group)
            )
        )
        header, columns = ["round"], []
        for name, c in zip(names, group):
            xs = (
                [f"{name}: % left"]
                if c.algebra == "real"
                else [f"{name}: % own", f"{name}: % of R"]
            )
            beside = paper if c.algebra in PAPER_LETTERS else None
            header += xs + [f"{name} acc"] + (["paper"] if beside else [])
            columns.append(_columns(c, beside))
        rounds = sorted({int(r) for c in group for r in c.rounds})
        width = {id(col): len(next(iter(col.values()))) for col in columns}
        rows = [
            [level, *(v for col in columns for v in col.get(level, [""] * width[id(col)]))]
            for level in rounds
        ]
        parts.append(markdown_table(header, rows))
    return "\n\n".join(parts) + "\n"


def _other_algebras_note(curves: Sequence[Curve]) -> str:
    """A sentence on the algebras beyond the paper's two, when there are any."""
    others = sorted({c.algebra for c in curves} - set(PAPER_LETTERS))
    if not others:
        return ""
    return (
        f" Likewise for {', '.join(others)}: '% own' is the model's own density, '% of R' its "
        "stored weights alive as a percentage of the real model's parameters; the paper has "
        "no curve of these algebras."
    )


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
