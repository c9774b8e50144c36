"""``python -m background_tasks`` and the ``bgtasks`` command: the command line.

Imports ``cli`` only when run, so that a missing ``cli`` extra (rich) is one line on
stderr saying what to install, like every other user mistake, not a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._extras import MissingExtra


def main(argv: Sequence[str] | None = None) -> int:
    """The ``bgtasks`` entry point; returns the exit status."""
    try:
        from .cli import main as cli_main
    except MissingExtra as exc:
        sys.stderr.write(f"bgtasks: error: {exc}\n")
        return 1
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
