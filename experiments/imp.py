r"""Lottery-ticket iterative magnitude pruning of a real or quaternion model.

    python -m experiments.imp --model=lenet300_100 --algebra=quat --workdir=runs
    python -m experiments.imp --model=conv4 --algebra=quat --dataset=cifar10 \
        --workdir=runs    # downloads CIFAR-10 once; --offline: only local archives

Several processes (one per host, or several on one host) train one run together through JAX's
multi-controller runtime: start the same command in each, with its own --process_id,

    python -m experiments.imp --model=lenet12 --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=0    # and --process_id=1 in the other

or give --distributed where the cluster fills these in (:mod:`qsparse.distributed`). Only process
0 writes the run directory, which every process must be able to read.

Every field of qsparse.config.Config is a flag; unset training flags take the paper's values
for the model. Rerunning the same command resumes: finished rounds are skipped and an
interrupted round continues from its last checkpoint. Bad values exit with status 2 before
anything is written, with one line on stderr naming the value and the valid choices; a run
directory in use by another process, a damaged file that cannot be recomputed or a file that
cannot be written (a full disk: rerun once there is space to resume) exits with 1.
"""

from __future__ import annotations

import dataclasses

import jax
from absl import flags, logging

from experiments.cli import fail, require, run
from qsparse import distributed, lottery
from qsparse.checkpoints import CheckpointMismatchError, RunLockedError
from qsparse.config import Config, ConfigError, field_types, parse_field
from qsparse.data import DatasetUnavailableError
from qsparse.files import WriteError
from qsparse.rundir import CorruptFileError

_DEFINE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    tuple: flags.DEFINE_list,
}

for _field in dataclasses.fields(Config):
    _kind = field_types()[_field.name]
    _DEFINE[_kind](_field.name, [] if _kind is tuple else _field.default, _field.metadata["help"])
flags.DEFINE_string("workdir", "runs", "where run directories are created (one per config)")
flags.DEFINE_string(
    "run_dir", None, "use exactly this run directory instead of one named after the config"
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (jax.distributed)"
)
flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
flags.DEFINE_bool(
    "distributed",
    False,
    "call jax.distributed.initialize() with no arguments: the cluster "
    "(SLURM, Open MPI, Kubernetes, Cloud TPU) provides coordinator, process count and index",
)
FLAGS = flags.FLAGS
RERUN = "free space and rerun the same command to resume"


def main(argv: list[str]) -> None:
    require(argv)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    try:
        config = Config(
            **{
                name: parse_field(name, FLAGS[name].value) if kind is tuple else FLAGS[name].value
                for name, kind in field_types().items()
            }
        )
        processes = distributed.settings(
            **{name: FLAGS[name].value for name in ("distributed", *distributed.SETTINGS)}
        )
    except ConfigError as e:
        fail(str(e))
    distributed.initialize(processes)  # before anything touches a device
    try:
        lottery.run(config, FLAGS.workdir, run_dir=FLAGS.run_dir)
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    except (RunLockedError, CorruptFileError, CheckpointMismatchError) as e:
        fail(str(e), status=1)
    except WriteError as e:
        fail(f"{e}; nothing written before it is lost: {RERUN}", status=1)
    except jax.errors.JaxRuntimeError as e:
        if processes is None:
            raise
        distributed.peer_stopped(e)


if __name__ == "__main__":
    run(main)
