r"""Figures like the paper's Fig. 4 from IMP run directories, plus layer densities per run.

    python -m experiments.plot --runs=runs --out=figures
    python -m experiments.plot --out=figures \
        --runs=runs/lenet12_real_mnist_xxx,runs/lenet12_quat_mnist_yyy

Writes accuracy_<model>_<dataset>_{own,real}.{png,svg} (x as % of the model's own weights, and
as % of the real model's weights, the paper's convention; the paper's digitized curve dashed
where it has one) and density_<run>.{png,svg}.
"""

from __future__ import annotations

import sys

from absl import app, flags

from qsparse import plots

flags.DEFINE_list("runs", ["runs"], "run directories, or folders holding run directories")
flags.DEFINE_string("out", "figures", "folder for the PNG and SVG files")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        written = plots.write_figures(FLAGS.runs, FLAGS.out)
    except FileNotFoundError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print("\n".join(map(str, written)))


if __name__ == "__main__":
    app.run(main)
