r"""A Markdown report of IMP runs: per (model, dataset), accuracy per round beside the paper's.

python -m experiments.report --runs=runs                 # to stdout
python -m experiments.report --runs=runs --out=report.md  # also to a file
python -m experiments.report --runs=runs --deployment=deploy  # + every round's deployment costs

``--deployment`` (folders holding the deployment.json files of ``python -m
experiments.deployment``, or the files) appends their tables: per round, bytes, FLOPs and CPU
latency; given alone (without ``--runs``), the report is those tables only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from qsparse import accounting, report, results

flags.DEFINE_list("runs", ["runs"], "run directories, or folders holding run directories")
flags.DEFINE_string("out", None, "also write the report to this file")
flags.DEFINE_list(
    "deployment",
    [],
    "folders holding deployment.json files (python -m experiments.deployment): their tables",
)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parts = []
    try:
        if FLAGS["runs"].present or not FLAGS.deployment:
            parts.append(report.markdown_report(results.load(FLAGS.runs)))
        if FLAGS.deployment:
            parts.append(accounting.markdown(accounting.load(FLAGS.deployment)))
    except (FileNotFoundError, accounting.DeploymentFileError) as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        sys.exit(2)
    text = "\n".join(parts)
    sys.stdout.write(text)
    if FLAGS.out:
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.out).write_text(text)


if __name__ == "__main__":
    app.run(main)
