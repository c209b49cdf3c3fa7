r"""Two curves of the same model and dataset at matched real-weight counts (2-SE rule).

    python -m experiments.compare --runs=results/paper_mnist --a=algebra=real --b=algebra=quat
    python -m experiments.compare --runs=results/paper_mnist,results/science \
        --a=algebra=quat --b=algebra=quat,prune_output=False --label_a=Q --label_b="Q, output kept"

``--a`` and ``--b`` pick one curve each per (model, dataset) among the runs found under
``--runs``, by ``key=value`` pairs of their config (what ``python -m experiments.report`` shows
as curve fields). Each round of ``b`` meets the round of ``a`` nearest in % of the real model's
weights (at most ``--max_ratio`` apart); a difference is called only where it exceeds two
standard errors (:mod:`qsparse.compare`). ``--layer=output/kernel`` adds that layer's weights
alive (mean over replicates, from sparsity.json) on each side. Prints one Markdown table per
(model, dataset); ``--out`` also writes it to a file, and ``--figure=DIR/STEM`` draws both curves
(and the layer's survivors) to STEM_<model>_<dataset>.{png,svg}.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from experiments.cli import fail, parse
from qsparse import compare, plots, results

flags.DEFINE_list("runs", None, "run directories, or folders holding run directories")
flags.DEFINE_list(
    "a", None, "key=value config pairs picking the reference curve, e.g. algebra=real"
)
flags.DEFINE_list("b", None, "key=value config pairs picking the compared curve, e.g. algebra=quat")
flags.DEFINE_string("label_a", "a", "name of curve a in the table")
flags.DEFINE_string("label_b", "b", "name of curve b in the table")
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
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    for name in ("runs", "a", "b"):
        if not FLAGS[name].value:
            fail(f"--{name} is required")
    if FLAGS.max_ratio < 1:
        fail(f"--max_ratio={FLAGS.max_ratio}: must be at least 1")
    where_a, where_b = _pairs("a", FLAGS.a), _pairs("b", FLAGS.b)
    try:
        curves = results.load(FLAGS.runs)
    except FileNotFoundError as e:
        fail(str(e))
    parts, figures = [], []
    for (model, dataset), group in results.by_pair(curves).items():
        if FLAGS.model and model not in FLAGS.model:
            continue
        a, b = compare.select(group, where_a), compare.select(group, where_b)
        if not a or not b:
            continue
        for name, chosen in (("a", a), ("b", b)):
            if len(chosen) > 1:
                fail(
                    f"--{name} matches {len(chosen)} curves of {model}/{dataset}: "
                    f"{results.labels(group)}; add key=value pairs to pick one"
                )
        matches = compare.matched(a[0], b[0], max_ratio=FLAGS.max_ratio)
        alive = None
        if FLAGS.layer:
            try:
                alive = (FLAGS.layer, *(compare.alive(c[0], FLAGS.layer) for c in (a, b)))
            except KeyError as e:
                fail(e.args[0])
        if FLAGS.figure:
            stem = Path(f"{FLAGS.figure}_{model}_{dataset}")
            stem.parent.mkdir(parents=True, exist_ok=True)
            labels = (FLAGS.label_a, FLAGS.label_b)
            fig = plots.comparison_figure(a[0], b[0], labels, alive, f"{model} / {dataset}")
            figures += plots.save(fig, stem)
        parts.append(
            f"## {model} / {dataset}: {FLAGS.label_b} vs {FLAGS.label_a}\n\n"
            f"- {FLAGS.label_a}: {', '.join(a[0].runs)}\n- {FLAGS.label_b}: {', '.join(b[0].runs)}"
            f"\n\n{compare.markdown(matches, FLAGS.label_a, FLAGS.label_b, alive)}"
        )
    if not parts:
        fail(f"no model under {FLAGS.runs} has both a curve with {where_a} and one with {where_b}")
    text = "\n".join(parts)
    print(text, end="")
    if FLAGS.out:
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.out).write_text(text)
    for path in figures:  # on stderr: stdout stays the Markdown tables
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=parse)
