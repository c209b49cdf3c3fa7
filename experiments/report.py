r"""A Markdown report of IMP runs: per (model, dataset), accuracy per round beside the paper's.

python -m experiments.report --runs=runs                 # to stdout
python -m experiments.report --runs=runs --out=report.md  # also to a file
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from qsparse import report, results

flags.DEFINE_list("runs", ["runs"], "run directories, or folders holding run directories")
flags.DEFINE_string("out", None, "also write the report to this file")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        text = report.markdown_report(results.load(FLAGS.runs))
    except FileNotFoundError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    sys.stdout.write(text)
    if FLAGS.out:
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.out).write_text(text)


if __name__ == "__main__":
    app.run(main)
