"""The `llamactl` Typer app: one thin module per command, each exposing `register(app)`."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import typer

from llamactl import __version__
from llamactl.cli._common import INTERRUPTED, TERMINATED
from llamactl.errors import Terminated


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llamactl {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    """Create the app with every built-in and plugin command registered."""
    app = typer.Typer(
        name="llamactl",
        help="Convert, quantize, chat with and benchmark Llama-2-family models.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    ) -> None:
        """Convert, quantize, chat with and benchmark Llama-2-family models."""

    # Built-in commands (each llamactl.cli module is a plugin listed in pyproject.toml) and
    # plugin commands arrive through the same register_commands hook; broken plugins warn.
    from llamactl.cli.plugins import install_commands

    install_commands(app)
    return app


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def main() -> None:
    """Console-script entry point."""
    from llamactl.threads import apply_openmp_defaults

    apply_openmp_defaults()  # before anything imports torch: OpenMP reads it once, at load
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: temporary outputs are removed
    try:
        build_app()(prog_name="llamactl")
    except SystemExit as exc:
        if exc.code in (INTERRUPTED, TERMINATED):
            # A Ctrl-C that lands while CPython runs exec()'d code (dataclass and namedtuple
            # creation during a lazy import) leaves a flag that makes it re-raise SIGINT at exit
            # even though we handled it: the caller would see "killed by signal 2", not our
            # documented 130. Everything was cleaned up on the way here, so exit directly.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code)  # type: ignore[arg-type]
        raise
