"""``python -m trustvision ARGS`` = the ``trustvision`` command (also ``torchrun -m trustvision``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns its exit status."""
    from trustvision.cli import main as cli_main

    return cli_main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses
    sys.exit(main())
