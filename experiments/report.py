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

from absl import flags

from experiments import cli
from qsparse import accounting, files, report, results

cli.define_sources("tables")
flags.DEFINE_string("out", None, "also write the report to this file")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    cli.require(argv)
    parts = []
    try:
        if cli.reads_runs():
            parts.append(report.markdown_report(results.load(FLAGS.runs)))
        if FLAGS.deployment:
            parts.append(accounting.markdown(accounting.load(FLAGS.deployment)))
    except (FileNotFoundError, accounting.DeploymentFileError) as e:
        cli.fail(str(e))
    text = "\n".join(parts)
    sys.stdout.write(text)
    if FLAGS.out:
        try:
            files.write_text(FLAGS.out, text)
        except files.WriteError as e:
            cli.fail(str(e), status=1)


if __name__ == "__main__":
    cli.run(main)
