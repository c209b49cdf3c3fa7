r"""What every finished round of a run costs deployed: bytes, FLOPs, CPU latency.

    python -m experiments.deployment --runs=runs/lenet300_100_quat_mnist_0a1b2c3d --out=deploy
    python -m experiments.deployment --runs=runs --out=deploy --replicate=1 --repeats=7
    python -m experiments.deployment --runs=runs/conv4_real_... --out=deploy --batches=1,64

For each run directory (``--runs``: runs, or folders holding runs) exports every finished round
of the replicate and measures it (:mod:`benchmarks.deployment`): weights and parameters alive,
the exported file's bytes on disk and a dense float32 file's, dense and sparse-effective FLOPs
per image, and the median latency of the dense JAX model, of the runtime on a dense export and on
the sparse one at each of ``--batches`` (default 1 and 256) on the CPU. Writes
``<out>/<run>/replicate_<r>/deployment.json``, ``deployment.md`` and the exported
``round_<LL>.npz`` files, and prints the table of them all.
``python -m experiments.report --deployment=<out>`` and ``python -m experiments.plot
--deployment=<out>`` read them back.

Bad input (no run found, a replicate without finished rounds, an output that exists without
--overwrite or cannot be written) exits with status 2 and one ``error:`` line, before anything
is written; a damaged run file, or a write that fails (a full disk), exits with status 1: the
runs accounted before it keep their records, its own previous record is left intact.
"""

from __future__ import annotations

from absl import flags, logging

from benchmarks import deployment
from experiments.cli import fail, require, run
from qsparse import accounting, results, rundir
from qsparse.files import WriteError

# --out, --replicate and --overwrite are also experiments.export's flags; allow_override lets both
# commands be imported into one process (the tests do), each meaning its own.
flags.DEFINE_list("runs", None, "run directories, or folders holding run directories")
flags.DEFINE_string(
    "out", None, "folder for <run>/replicate_<r>/deployment.json", allow_override=True
)
flags.DEFINE_integer("replicate", 0, "the replicate to account for", allow_override=True)
flags.DEFINE_integer(
    "repeats", deployment.REPEATS, "timed calls per latency (median; after one warm-up call)"
)
flags.DEFINE_list("batches", [str(b) for b in deployment.BATCHES], "batch sizes timed")
flags.DEFINE_bool("overwrite", False, "replace a run's existing record", allow_override=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    require(argv, "runs", "out")
    if FLAGS.repeats < 1:
        fail(f"--repeats={FLAGS.repeats}: at least one timed call")
    try:
        batches = [int(b) for b in FLAGS.batches]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        fail(f"--batches={','.join(FLAGS.batches)}: positive integers, e.g. 1,64,256")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    try:
        runs = results.find_runs(FLAGS.runs)
    except FileNotFoundError as e:
        fail(str(e))
    names = [run.name for run in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        fail(f"runs of the same name in different folders would share an output: {twice}")
    try:
        for run in runs:  # every run checked before anything is written
            deployment.check(run, FLAGS.out, FLAGS.replicate, FLAGS.overwrite)
        written = []
        for run in runs:
            deployment.account_run(
                run,
                FLAGS.out,
                replicate=FLAGS.replicate,
                repeats=FLAGS.repeats,
                batches=batches,
                overwrite=FLAGS.overwrite,
            )
            written.append(deployment.target(FLAGS.out, run, FLAGS.replicate) / accounting.FILE)
    except deployment.AccountingError as e:
        fail(str(e))
    except (rundir.CorruptFileError, RuntimeError) as e:
        fail(str(e), status=1)
    except WriteError as e:
        fail(f"{e}; nothing of this run was written: its previous record is intact", status=1)
    print(accounting.markdown(accounting.load(written)), end="")


if __name__ == "__main__":
    run(main)
