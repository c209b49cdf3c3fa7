r"""Two curves of the same model and dataset at matched x: Welch's t per point, Holm per table.

    python -m experiments.compare --runs=results/paper_mnist --a=algebra=real --b=algebra=quat
    python -m experiments.compare --runs=runs --a=algebra=quat --b=algebra=tessarine --x=own
    python -m experiments.compare --runs=runs --a=algebra=quat --b=algebra=real,hidden=3,9
    python -m experiments.compare --runs=results/paper_mnist,results/science \
        --a=algebra=quat --b=algebra=quat,prune_output=False --label_a=Q --label_b="Q, output kept"
    python -m experiments.compare --aa=results/paper_mnist,results/deployment_lenet300_100

``--a`` and ``--b`` pick one curve each per (model, dataset) among the runs found under
``--runs``, by ``key=value`` pairs of their config (what ``python -m experiments.report`` shows
as curve fields; the algebra is one of them, so any two algebras compare). Their names in the
table are ``--label_a``/``--label_b``, by default the curves' own labels (R, Q, tessarine, ...,
with the fields in which the two differ). Each round of ``b`` meets the round of ``a`` nearest on
the axis ``--x`` (``real``: % of the real model's weights; ``own``: each model's own density), at
most ``--max_ratio`` apart. Each pair gets Welch's t (df, p, a t-based 95 % interval); the
table's p-values are Holm-adjusted together and the verdict uses the adjusted p < 0.05
(:mod:`qsparse.compare`). ``--band=LO,HI`` adds the mean difference over that band of x (in log
x, per replicate, a t interval over replicates; a bootstrap too where n >= 5); ``--near=3,1.5``
adds, for each value, the matched round of ``b`` nearest it (within ``--max_ratio``) with its
difference, interval, p and the table's Holm p: the cells of a summary table. ``--stopped``
says how replicates that stopped early count: ``drop`` (their later rounds average the
survivors, flagged "2 of 3"; the band is cut to what every replicate reached) or ``chance``
(at ``--chance`` % accuracy from the round after their last). ``--layer=output/kernel`` adds
that layer's weights alive (mean over replicates, from sparsity.json) on each side. Prints one
Markdown table per (model, dataset); ``--out`` also writes it to a file, and
``--figure=DIR/STEM`` draws both curves (and the layer's survivors) at % of the real model's
weights to STEM_<model>_<dataset>.{png,svg}.

``--aa=DIR1,DIR2`` is the A/A mode, the noise floor: every curve of DIR1 against the curve of
DIR2 with the same config (two runs of one configuration), one table each, then how many matched
points are called at p < 0.05 before and after Holm.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from experiments.cli import fail, require, run
from qsparse import compare, files, plots, results
from qsparse.replicates import AXES, STOPPED, replicates
from qsparse.report import markdown_table
from qsparse.results import Curve

flags.DEFINE_list("runs", None, "run directories, or folders holding run directories")
flags.DEFINE_list(
    "a", None, "key=value config pairs picking the reference curve, e.g. algebra=real"
)
flags.DEFINE_list("b", None, "key=value config pairs picking the compared curve, e.g. algebra=quat")
flags.DEFINE_string("label_a", None, "name of curve a in the table (default: its label, e.g. R)")
flags.DEFINE_string("label_b", None, "name of curve b in the table (default: its label, e.g. Q)")
flags.DEFINE_list("model", [], "only these models (default: every model with both curves)")
flags.DEFINE_string(
    "layer", None, "also show this layer's weights alive per round, e.g. output/kernel"
)
flags.DEFINE_enum("x", "real", list(AXES), "pair rounds at equal % of R's weights or own density")
flags.DEFINE_list("band", [], "LO,HI: also the mean b - a over this band of x (%), e.g. 1.5,3.5")
flags.DEFINE_list("near", [], "X,...: also the matched round nearest each X % of x, e.g. 3,1.5")
flags.DEFINE_enum("stopped", "drop", list(STOPPED), "how replicates that stopped early count")
flags.DEFINE_float("chance", 10.0, "accuracy (%) a stopped replicate counts at, --stopped=chance")
flags.DEFINE_list("aa", [], "DIR1,DIR2: A/A mode, each curve of DIR1 against its twin in DIR2")
flags.DEFINE_float("max_ratio", compare.MAX_RATIO, "largest x ratio of a matched pair")
flags.DEFINE_string("out", None, "also write the tables to this file")
flags.DEFINE_string(
    "figure", None, "also draw each compared pair to FIGURE_<model>_<dataset>.{png,svg}"
)
FLAGS = flags.FLAGS


def _pairs(name: str, items: list[str]) -> dict[str, str]:
    try:
        return compare.parse_where(items)
    except ValueError:
        fail(f"--{name}={','.join(items)}: expected key=value pairs, e.g. --{name}=algebra=real")


def _band() -> tuple[float, float] | None:
    """``--band`` as (lo, hi), or None."""
    if not FLAGS.band:
        return None
    try:
        lo, hi = map(float, FLAGS.band)
    except ValueError:
        lo = hi = -1.0
    if not 0 < lo < hi:
        fail(
            f"--band={','.join(FLAGS.band)}: expected LO,HI with 0 < LO < HI (% of x), e.g. 1.5,3.5"
        )
    return lo, hi


def _near() -> list[float]:
    """``--near`` as floats (% of x)."""
    try:
        near = [float(v) for v in FLAGS.near]
    except ValueError:
        near = [-1.0]
    if any(not v > 0 for v in near):
        fail(f"--near={','.join(FLAGS.near)}: expected positive % of x, e.g. 3,1.5")
    return near


def main(argv: list[str]) -> None:
    if FLAGS.max_ratio < 1:
        fail(f"--max_ratio={FLAGS.max_ratio}: must be at least 1")
    band, near, figures = _band(), _near(), []
    try:
        text = _aa(band, near) if FLAGS.aa else _ab(argv, band, near, figures)
        if FLAGS.out:
            files.write_text(FLAGS.out, text)
    except files.WriteError as e:
        fail(str(e), status=1)
    print(text, end="")
    for path in figures:  # on stderr: stdout stays the Markdown tables
        print(f"wrote {path}", file=sys.stderr)


def _ab(
    argv: list[str], band: tuple[float, float] | None, near: list[float], figures: list[Path]
) -> str:
    """The tables of ``--a`` against ``--b``, one per (model, dataset)."""
    require(argv, "runs", "a", "b")
    where = {"--a": _pairs("a", FLAGS.a), "--b": _pairs("b", FLAGS.b)}
    try:
        pairs = compare.pick(results.load(FLAGS.runs), where, FLAGS.model)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not pairs:
        a, b = where.values()
        fail(f"no model under {FLAGS.runs} has both a curve with {a} and one with {b}")
    parts = []
    for (model, dataset), chosen in pairs.items():
        a, b = chosen["--a"], chosen["--b"]
        own_a, own_b = results.labels([a, b])
        labels = FLAGS.label_a or own_a, FLAGS.label_b or own_b
        title = f"{model} / {dataset}: {labels[1]} vs {labels[0]}"
        text, _, alive = _section(title, a, b, labels, band, near)
        if FLAGS.figure:
            stem = Path(f"{FLAGS.figure}_{model}_{dataset}")
            stem.parent.mkdir(parents=True, exist_ok=True)
            figure = plots.comparison_figure(a, b, labels, alive, f"{model} / {dataset}")
            figures += plots.save(figure, stem)
        parts.append(text)
    return "\n".join(parts)


def _aa(band: tuple[float, float] | None, near: list[float]) -> str:
    """Each curve of the first --aa folder against its twin in the second, then the calls."""
    if len(FLAGS.aa) != 2 or FLAGS.a or FLAGS.b or FLAGS.runs:
        fail(f"--aa={','.join(FLAGS.aa)}: expected two run folders DIR1,DIR2 and no --runs/--a/--b")
    first, second = FLAGS.aa
    try:
        pairs, alone = compare.aa_pairs(first, second)
    except FileNotFoundError as e:
        fail(str(e))
    if not pairs:
        fail(f"--aa={first},{second}: no curve of {first} has the same config as one of {second}")
    names = (Path(first).name, Path(second).name)
    parts, counts = [f"# A/A: {names[1]} vs {names[0]}, two runs of each config\n"], []
    for a, b in pairs:
        label = results.labels([a])[0]
        title = f"{a.model} / {a.dataset}, {label}: {names[1]} vs {names[0]}"
        text, matches, _ = _section(title, a, b, names, band, near)
        parts.append(text)
        counts.append([f"{a.model} / {a.dataset}, {label}", *compare.calls(matches).values()])
    counts.append(["all", *(sum(row[i] for row in counts) for i in range(1, 6))])
    header = ["curves", "matched points", "tested", "p < 0.05", "Holm p < 0.05"]
    header += ["beyond 2 SE (not a test)"]
    parts.append(f"## Noise floor ({AXES[FLAGS.x]})\n\n{markdown_table(header, counts)}\n")
    if alone:
        parts.append("Without a twin: " + "; ".join(f"{c.model} {c.runs[0]}" for c in alone) + "\n")
    return "\n".join(parts)


def _section(
    title: str,
    a: Curve,
    b: Curve,
    labels: tuple[str, str],
    band: tuple[float, float] | None,
    near: list[float],
) -> tuple[str, list[compare.Match], tuple | None]:
    """One comparison's heading, sources, table, band line and ``--near`` lines; its matches;
    the ``--layer``'s survivors of each side (None without ``--layer``)."""
    label_a, label_b = labels
    reps_a, reps_b = (replicates(c, FLAGS.stopped, FLAGS.chance) for c in (a, b))
    matches = compare.matched(reps_a, reps_b, x=FLAGS.x, max_ratio=FLAGS.max_ratio)
    alive = None
    if FLAGS.layer:
        try:
            alive = (FLAGS.layer, compare.alive(a, FLAGS.layer), compare.alive(b, FLAGS.layer))
        except KeyError as e:
            fail(e.args[0])
    stopped = (
        "dropped (a cell 'k of n' averages the survivors)"
        if FLAGS.stopped == "drop"
        else f"counted at chance, {FLAGS.chance:g} %"
    )
    text = (
        f"## {title}, x = {AXES[FLAGS.x]}\n\n"
        f"- {label_a}: {', '.join(a.runs)}\n- {label_b}: {', '.join(b.runs)}\n"
        f"- stopped replicates: {stopped}; verdicts at Holm-adjusted p < 0.05 within this table"
        f"\n\n{compare.markdown(matches, label_a, label_b, alive, x=FLAGS.x)}"
    )
    if band is not None:
        try:
            found = compare.band(reps_a, reps_b, *band, x=FLAGS.x)
            text += "\n" + compare.band_text(found, label_a, label_b, FLAGS.x) + "\n"
        except ValueError as e:
            text += f"\nBand {band[0]:g}-{band[1]:g} {AXES[FLAGS.x]}: no statistic: {e}\n"
    for target in near:
        line = compare.near_text(
            matches, target, label_a, label_b, x=FLAGS.x, max_ratio=FLAGS.max_ratio
        )
        text += f"\n{line}\n"
    return text, matches, alive


if __name__ == "__main__":
    run(main)
