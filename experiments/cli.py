"""What every experiment script shares: one ``error:`` line and a status for bad input, required
flags, and the flags that name run directories and deployment records."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags

FLAGS = flags.FLAGS


def fail(message: str, status: int = 2) -> NoReturn:
    """Exit with ``error: <message>`` as exactly one line on stderr."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.exit(status)


def parse(argv: list[str]) -> list[str]:
    """absl's flag parsing for ``app.run(main, flags_parser=parse)``: a bad flag is one line and
    status 2; ``--help`` exits 0 (absl's own usage exits 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
    except SystemExit:
        sys.exit(0)


def run(main: Callable[[list[str]], None]) -> None:
    """``app.run`` with :func:`parse`."""
    app.run(main, flags_parser=parse)


def require(argv: list[str], *names: str) -> None:
    """No positional arguments, and each flag of ``names`` given."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    for name in names:
        if not FLAGS[name].value:
            fail(f"--{name} is required")


def define_sources(what: str) -> None:
    """``--runs`` and ``--deployment``, the inputs of the commands that tabulate or draw runs."""
    flags.DEFINE_list("runs", ["runs"], "run directories, or folders holding run directories")
    flags.DEFINE_list(
        "deployment",
        [],
        f"folders holding deployment.json files (python -m experiments.deployment): their {what}",
    )


def reads_runs() -> bool:
    """Whether ``--runs`` is read: given, or left at its default with no ``--deployment``."""
    return FLAGS["runs"].present or not FLAGS.deployment
