"""What every experiment script does with bad input: one ``error:`` line on stderr, a status."""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags


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
