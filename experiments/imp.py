r"""Lottery-ticket iterative magnitude pruning of a real or quaternion model.

    python -m experiments.imp --model=lenet300_100 --algebra=quat --workdir=runs
    python -m experiments.imp --model=conv4 --algebra=quat --dataset=cifar10 \
        --manual_dir=/path/with/cifar-10-binary.tar.gz --workdir=runs

Several processes, one per host (or several on one host), train one run together through JAX's
multi-controller runtime; start the same command in each, with its own --process_id:

    python -m experiments.imp --model=lenet12 --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=0
    python -m experiments.imp --model=lenet12 --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=1

(``--distributed`` instead lets SLURM, Open MPI, Kubernetes or Cloud TPU fill these in.) Every
process loads the dataset and feeds its devices; only process 0 writes the run directory, which
every process must be able to read (a shared filesystem). A process that dies makes the others
stop within about a minute instead of waiting for it.

Every field of qsparse.config.Config is a flag; unset training flags take the paper's values
for the model. Rerunning the same command resumes: finished rounds are skipped and an
interrupted round continues from its last checkpoint. Bad values exit with status 2 before
anything is written, with one line on stderr naming the value and the valid choices; a run
directory in use by another process or a damaged file that cannot be recomputed exits with 1.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import NoReturn

import jax
from absl import app, flags, logging

from experiments.cli import fail, parse
from qsparse import config as config_schema
from qsparse import lottery
from qsparse.checkpoints import CheckpointMismatchError, RunLockedError
from qsparse.config import Config, ConfigError
from qsparse.data import DatasetUnavailableError
from qsparse.rundir import CorruptFileError

_DEFINE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    tuple: flags.DEFINE_list,
}

for _field in dataclasses.fields(Config):
    _kind = config_schema.field_types()[_field.name]
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

# A process that stops sending heartbeats for this long is declared dead and the others stop.
HEARTBEAT_TIMEOUT_S = 30


def config_from_flags() -> Config:
    values = {
        name: FLAGS[name].value
        for name, kind in config_schema.field_types().items()
        if kind is not tuple
    }
    try:
        hidden = tuple(int(width) for width in FLAGS.hidden)
    except ValueError:
        raise ConfigError(
            f"hidden={FLAGS.hidden} must be integer widths, e.g. --hidden=300,100"
        ) from None
    overrides = []
    for item in FLAGS.layer_fractions:
        pattern, _, fraction = item.rpartition("=")
        try:
            overrides.append((pattern, float(fraction)))
        except ValueError:
            raise ConfigError(f"layer_fractions entry {item!r} is not glob=fraction") from None
        if not pattern:
            raise ConfigError(f"layer_fractions entry {item!r} is not glob=fraction")
    return Config(**values, layer_fractions=tuple(overrides), hidden=hidden)


def distributed_args() -> dict | None:
    """``jax.distributed.initialize`` arguments from the flags; None for a single-process run."""
    given = {
        name: FLAGS[name].value
        for name in ("coordinator_address", "num_processes", "process_id")
        if FLAGS[name].value is not None
    }
    if FLAGS.distributed:
        if given:
            raise ConfigError(
                f"--distributed takes its settings from the cluster; drop {sorted(given)}"
            )
        return {}
    if not given:
        return None
    missing = {"coordinator_address", "num_processes", "process_id"} - set(given)
    if missing:
        raise ConfigError(
            f"a multi-process run needs --coordinator_address, --num_processes and --process_id; "
            f"missing {sorted(missing)}"
        )
    host, _, port = FLAGS.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator_address={FLAGS.coordinator_address!r} is not host:port")
    if FLAGS.num_processes < 1 or not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise ConfigError(
            f"process_id={FLAGS.process_id} must be in [0, num_processes={FLAGS.num_processes})"
        )
    return given


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    try:
        config = config_from_flags()
        distributed = distributed_args()
    except ConfigError as e:
        fail(str(e))
    if distributed is not None:  # before anything touches a device
        jax.distributed.initialize(**distributed, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    try:
        lottery.run(config, FLAGS.workdir, run_dir=FLAGS.run_dir)
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    except (RunLockedError, CorruptFileError, CheckpointMismatchError) as e:
        fail(str(e), status=1)
    except jax.errors.JaxRuntimeError as e:
        if distributed is None:
            raise
        peer_stopped(e)


def peer_stopped(error: Exception) -> NoReturn:
    """A collective of a multi-process run failed: another process stopped. Exit at once with one
    line: a normal exit would wait in JAX's shutdown barrier for the dead process, then abort."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    sys.stdout.flush()
    sys.stderr.write(
        f"error: process {jax.process_index()} of {jax.process_count()}: another process of "
        f"this run stopped ({' '.join(first.split())}); rerun every process to resume\n"
    )
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse)
