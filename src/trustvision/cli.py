"""The ``trustvision`` command: train, explain, audit, report, zoo, data.

Every error a user can cause is a :class:`~trustvision.errors.TrustVisionError`; ``main`` prints
it as one line (``error: ...``) and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import sys

import typer

from trustvision.errors import TrustVisionError

app = typer.Typer(
    name="trustvision",
    help="Trustworthy image classification: train, explain and audit image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each command lives in its own section below; keep one section per command so that
# several people can edit this file without touching each other's code.

# --- data -------------------------------------------------------------------------------------


@app.command("data")
def data_cmd() -> None:
    """List the registered datasets."""
    from trustvision import data

    for name in data.list_datasets():
        typer.echo(name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    try:
        app(args=argv, standalone_mode=False)
    except TrustVisionError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        return 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.ClickException):
            exc.show()
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
