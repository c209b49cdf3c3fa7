"""``python -m qsparse.deploy FILE...``: check each export file and describe it (numpy only)."""

from __future__ import annotations

import sys
from pathlib import Path

from qsparse.deploy.format import ExportFileError
from qsparse.deploy.runtime import load


def main(argv: list[str] | None = None) -> int:
    """Check each export file and describe it; a file that cannot be read is one ``error:`` line
    and status 2."""
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a.startswith("-") for a in args):
        sys.stderr.write("error: usage: python -m qsparse.deploy EXPORT_FILE...\n")
        return 2
    for path in args:
        try:
            model = load(path)
        except ExportFileError as e:
            sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
            return 2
        print(f"{path}: {Path(path).stat().st_size} bytes")
        print(model.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
