r"""Two curves of the same model and dataset at matched real-weight counts (2-SE rule).

    python -m experiments.compare --runs=results/paper_mnist --a=algebra=real --b=algebra=quat
    python -m experiments.compare --runs=runs --a=algebra=quat --b=algebra=tessarine
    python -m experiments.compare --runs=results/paper_mnist,results/science \
        --a=algebra=quat --b=algebra=quat,prune_output=False --label_a=Q --label_b="Q, output kept"

``--a`` and ``--b`` pick one curve each per (model, dataset) among the runs found under
``--runs``, by ``key=value`` pairs of their config (what ``python -m experiments.report`` shows
as curve fields; the algebra is one of them, so any two algebras compare). Their names in the
table are ``--label_a``/``--label_b``, by default the curves' own labels (R, Q, tessarine, ...,
with the fields in which the two differ). Each round of ``b`` meets the round of ``a`` nearest
in % of the real model's weights (at most ``--max_ratio`` apart); a difference is called only
where it exceeds two standard errors (:mod:`qsparse.compare`). ``--layer=output/kernel`` adds
that layer's weights alive (mean over replicates, from sparsity.json) on each side. Prints one
Markdown table per (model, dataset); ``--out`` also writes it to a file, and
``--figure=DIR/STEM`` draws both curves (and the layer's survivors) to
STEM_<model>_<dataset>.{png,svg}.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from experiments.cli import fail, require, run
from qsparse import compare, files, plots, results
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
flags.DEFINE_float("max_ratio", compare.MAX_RATIO, "largest x ratio of a matched pair")
flags.DEFINE_string("out", None, "also write the tables to this file")
flags.DEFINE_string(
    "figure", None, "also draw each compared pair to FIGURE_<model>_<dataset>.{png,svg}"
)
FLAGS = flags.FLAGS


def _pairs(name: str, items: list[str]) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in items if "=" in item)
    bad = [item for item in items if "=" not in item]
    if bad or not pairs:
        fail(f"--{name}={','.join(items)}: expected key=value pairs, e.g. --{name}=algebra=real")
    return pairs


def main(argv: list[str]) -> None:
    require(argv, "runs", "a", "b")
    if FLAGS.max_ratio < 1:
        fail(f"--max_ratio={FLAGS.max_ratio}: must be at least 1")
    where = {"--a": _pairs("a", FLAGS.a), "--b": _pairs("b", FLAGS.b)}
    try:
        pairs = compare.pick(results.load(FLAGS.runs), where, FLAGS.model)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not pairs:
        a, b = where.values()
        fail(f"no model under {FLAGS.runs} has both a curve with {a} and one with {b}")
    parts, figures = [], []
    try:
        for (model, dataset), chosen in pairs.items():
            parts.append(_section(model, dataset, chosen["--a"], chosen["--b"], figures))
        text = "\n".join(parts)
        if FLAGS.out:
            files.write_text(FLAGS.out, text)
    except files.WriteError as e:
        fail(str(e), status=1)
    print(text, end="")
    for path in figures:  # on stderr: stdout stays the Markdown tables
        print(f"wrote {path}", file=sys.stderr)


def _section(model: str, dataset: str, a: Curve, b: Curve, figures: list[Path]) -> str:
    """The table of one (model, dataset); its figure added to ``figures`` if asked for."""
    own_a, own_b = results.labels([a, b])
    label_a, label_b = FLAGS.label_a or own_a, FLAGS.label_b or own_b
    alive = None
    if FLAGS.layer:
        try:
            alive = (FLAGS.layer, compare.alive(a, FLAGS.layer), compare.alive(b, FLAGS.layer))
        except KeyError as e:
            fail(e.args[0])
    if FLAGS.figure:
        stem = Path(f"{FLAGS.figure}_{model}_{dataset}")
        stem.parent.mkdir(parents=True, exist_ok=True)
        figures += plots.save(
            plots.comparison_figure(a, b, (label_a, label_b), alive, f"{model} / {dataset}"), stem
        )
    matches = compare.matched(a, b, max_ratio=FLAGS.max_ratio)
    return (
        f"## {model} / {dataset}: {label_b} vs {label_a}\n\n"
        f"- {label_a}: {', '.join(a.runs)}\n- {label_b}: {', '.join(b.runs)}"
        f"\n\n{compare.markdown(matches, label_a, label_b, alive)}"
    )


if __name__ == "__main__":
    run(main)
