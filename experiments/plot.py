r"""Figures like the paper's Fig. 4 from IMP run directories, plus layer densities per run.

    python -m experiments.plot --runs=runs --out=figures
    python -m experiments.plot --out=figures \
        --runs=runs/lenet12_real_mnist_xxx,runs/lenet12_quat_mnist_yyy
    python -m experiments.plot --deployment=deploy --out=figures   # deployment figures only

Writes accuracy_<model>_<dataset>_{own,real}.{png,svg} (x as % of the model's own weights, and
as % of the real model's weights, the paper's convention; one curve per algebra and config,
labelled R, Q or the algebra's name; the paper's digitized real and quaternion curves dashed
where it has them) and density_<run>.{png,svg}. ``--deployment`` (folders holding the
deployment.json files of ``python -m experiments.deployment``) adds
deployment_{bytes,latency}_<model>_<dataset>.{png,svg}: test accuracy against the exported
file's bytes and against the sparse runtime's batch-1 latency (log x), every curve (each
algebra, each grouping) on one axis; given alone (without ``--runs``), only those.
"""

from __future__ import annotations

from absl import flags

from experiments import cli
from qsparse import accounting, plots
from qsparse.files import WriteError

cli.define_sources("figures")
flags.DEFINE_string("out", "figures", "folder for the PNG and SVG files")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    cli.require(argv)
    written = []
    try:
        deployments = accounting.load(FLAGS.deployment) if FLAGS.deployment else []
        if cli.reads_runs():
            written += plots.write_figures(FLAGS.runs, FLAGS.out)
        if deployments:
            written += plots.write_deployment_figures(deployments, FLAGS.out)
    except (FileNotFoundError, accounting.DeploymentFileError) as e:
        cli.fail(str(e))
    except WriteError as e:
        cli.fail(str(e), status=1)
    print("\n".join(map(str, written)))


if __name__ == "__main__":
    cli.run(main)
