"""Run the CLI in-process with a time bound, and classify what it printed."""

from __future__ import annotations

import contextlib
import signal

from trustvision.cli import main


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def _raise(signum, frame):  # pragma: no cover - only on a hang
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str], capsys, seconds: int = 60) -> tuple[int, str, str]:
    """``main(argv)`` bounded in time; returns (status, stdout, stderr)."""
    capsys.readouterr()
    with time_limit(seconds):
        status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def assert_user_error(status: int, err: str, *words: str) -> str:
    """Exit 2, one ``error:`` line (after at most one ``Usage:`` line), no traceback; returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, err)
    assert "Traceback" not in err and "internal error" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    others = [line for line in lines if not line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert all(line.startswith("Usage: ") for line in others) and len(others) <= 1, lines
    for w in words:
        assert w.lower() in errors[0].lower(), (w, errors[0])
    return errors[0]
