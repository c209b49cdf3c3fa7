"""Several processes training one run through JAX's multi-controller runtime: start and stop.

A run is one process, or ``num_processes`` processes that each name the coordinator (process 0's
``host:port``) and their own index, or processes whose cluster (SLURM, Open MPI, Kubernetes,
Cloud TPU) provides all three (``distributed=True``). The settings are checked before anything
touches a device, so a bad one is a :class:`ConfigError`, not a hang waiting for a coordinator.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import jax

from qsparse.config import ConfigError

SETTINGS = ("coordinator_address", "num_processes", "process_id")

# A process that stops sending heartbeats for this long is declared dead and the others stop.
HEARTBEAT_TIMEOUT_S = 30


def settings(
    *,
    distributed: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> dict | None:
    """``jax.distributed.initialize`` arguments; None for a single-process run."""
    given = {
        name: value
        for name, value in zip(SETTINGS, (coordinator_address, num_processes, process_id))
        if value is not None
    }
    if distributed:
        if given:
            raise ConfigError(
                f"--distributed takes its settings from the cluster; drop {sorted(given)}"
            )
        return {}
    if not given:
        return None
    missing = set(SETTINGS) - set(given)
    if missing:
        raise ConfigError(
            "a multi-process run needs --coordinator_address, --num_processes and --process_id; "
            f"missing {sorted(missing)}"
        )
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator_address={coordinator_address!r} is not host:port")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    return given


def initialize(args: dict | None) -> None:
    """Join the run's processes (``args`` from :func:`settings`); nothing for a lone process."""
    if args is not None:
        jax.distributed.initialize(**args, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


def peer_stopped(error: Exception) -> NoReturn:
    """A collective of a multi-process run failed: another process stopped. Exit at once with one
    line: a normal exit would wait in JAX's shutdown barrier for the dead process, then abort."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    sys.stdout.flush()
    sys.stderr.write(
        f"error: process {jax.process_index()} of {jax.process_count()}: another process of "
        f"this run stopped ({' '.join(first.split())}); rerun every process to resume\n"
    )
    sys.stderr.flush()
    os._exit(1)
