r"""Lottery-ticket iterative magnitude pruning of a real or quaternion model.

    python -m experiments.imp --model=lenet300_100 --algebra=quat --workdir=runs
    python -m experiments.imp --model=conv4 --algebra=quat --dataset=cifar10 \
        --manual_dir=/path/with/cifar-10-binary.tar.gz --workdir=runs

Several processes, one per host (or several on one host), train one run together through JAX's
multi-controller runtime; start the same command in each, with its own --process_id:

    python -m experiments.imp --model=lenet12 --coordinator_address=host0:1234 --num_processes=2 --process_id=0
    python -m experiments.imp --model=lenet12 --coordinator_address=host0:1234 --num_processes=2 --process_id=1

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

from qsparse import lottery
from qsparse.checkpoints import CorruptFileError, RunLockedError
from qsparse.config import Config, ConfigError
from qsparse.data import DatasetUnavailableError

HELP = {
    "model": "lenet300_100 | lenet12 | conv2 | conv4 | conv6",
    "algebra": "real | quat (same real width; quat has ~1/4 of the weights and a real output layer)",
    "hidden": "real widths of the hidden dense layers, e.g. '300,100' (quat: multiples of 4; default: the model's)",
    "dataset": "mnist | fashion_mnist | cifar10 | cifar100 (default: the paper's dataset for the model)",
    "rounds": "pruning rounds after the dense round 0",
    "prune_fraction": "fraction of the *remaining* prunable weights removed per round, in (0, 1)",
    "pruning": "global (one threshold over all layers) | layerwise (the fraction per layer)",
    "grouping": "element (each real component, as the paper) | quaternion (whole quaternions, by norm)",
    "prune_output": "also prune the output layer's weights (the paper does)",
    "layer_fractions": "layerwise overrides as glob=fraction, e.g. 'output/*=0.1'",
    "rewind": "init | <N>it | <N>ep: where survivors are reset to (late resetting)",
    "protocol": "lottery (prune, rewind, retrain) | paper (masks from prune-and-continue training)",
    "optimizer_state": "fresh (new optimizer each round) | carry (keep the previous round's state)",
    "control": "none | reinit (winning mask, new random weights) | shuffle (random mask, same layer densities)",
    "stop_accuracy": "stop a replicate after two rounds below this test accuracy (paper: 0.3; 0 = never)",
    "epochs": "epochs per round (default: paper, 40 or 60 or 20)",
    "batch_size": "global batch size, split over local devices (default: 60)",
    "lr": "learning rate (default: the paper's per-model Adam rate)",
    "optimizer": "adam | sgd (momentum 0.9)",
    "quat_init": "htorch (paper) | parcollet_he | parcollet_glorot | isotropic",
    "encoding": "quaternion input encoding: auto | flat | rgb_gray | rgb_pure | gray_pure | none",
    "seed": "root seed: init, data order and controls derive from it",
    "replicates": "independent replicates (seeds derived from --seed), trained together in one compiled epoch",
    "validation_size": "examples held out from train as a validation split",
    "train_subset": "use only this many training examples (for a small CPU run)",
    "test_subset": "use only this many test examples",
    "eval_every": "evaluate every N epochs (and always after the last)",
    "data_dir": "tfds data directory (default $QSPARSE_DATA_DIR or ~/.cache/qsparse/tfds)",
    "manual_dir": "folder with the original dataset archives (MNIST ships with qsparse)",
    "checkpoint_every_secs": "checkpoint at most this often within a round (0: every epoch)",
    "eval_batch": "evaluation batch size",
    "log_every": "print a progress line every N epochs",
}

_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool}


def _flag_type(field: dataclasses.Field) -> type:
    kind = str(field.type)
    for name, t in (("bool", bool), ("int", int), ("float", float)):
        if kind.startswith(name):
            return t
    return str


for _field in dataclasses.fields(Config):
    if _field.name in ("layer_fractions", "hidden"):
        flags.DEFINE_list(_field.name, [], HELP[_field.name])
    else:
        _DEFINE[_flag_type(_field)](_field.name, _field.default, HELP[_field.name])
flags.DEFINE_string("workdir", "runs", "where run directories are created (one per config)")
flags.DEFINE_string("run_dir", None, "use exactly this run directory instead of one named after the config")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run (jax.distributed)")
flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with no arguments: the cluster "
                  "(SLURM, Open MPI, Kubernetes, Cloud TPU) provides coordinator, process count and index")
FLAGS = flags.FLAGS

# A process that stops sending heartbeats for this long is declared dead and the others stop.
HEARTBEAT_TIMEOUT_S = 30


def config_from_flags() -> Config:
    lists = ("layer_fractions", "hidden")
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(Config) if f.name not in lists}
    try:
        hidden = tuple(int(width) for width in FLAGS.hidden)
    except ValueError:
        raise ConfigError(f"hidden={FLAGS.hidden} must be integer widths, e.g. --hidden=300,100") from None
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


def fail(message: str, status: int = 2) -> NoReturn:
    """Exit with ``error: <message>`` as exactly one line on stderr."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.exit(status)


def distributed_args() -> dict | None:
    """``jax.distributed.initialize`` arguments from the flags; None for a single-process run."""
    given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes", "process_id")
             if FLAGS[name].value is not None}
    if FLAGS.distributed:
        if given:
            raise ConfigError(f"--distributed takes its settings from the cluster; drop {sorted(given)}")
        return {}
    if not given:
        return None
    missing = {"coordinator_address", "num_processes", "process_id"} - set(given)
    if missing:
        raise ConfigError(f"a multi-process run needs --coordinator_address, --num_processes and --process_id; "
                          f"missing {sorted(missing)}")
    host, _, port = FLAGS.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator_address={FLAGS.coordinator_address!r} is not host:port")
    if FLAGS.num_processes < 1 or not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise ConfigError(f"process_id={FLAGS.process_id} must be in [0, num_processes={FLAGS.num_processes})")
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
    except (RunLockedError, CorruptFileError) as e:
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
    sys.stderr.write(f"error: process {jax.process_index()} of {jax.process_count()}: another process of this run "
                     f"stopped ({' '.join(first.split())}); rerun every process to resume\n")
    sys.stderr.flush()
    os._exit(1)


def _parse(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
    except SystemExit:  # absl's --help/--helpfull print the usage, then exit with 1
        sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
