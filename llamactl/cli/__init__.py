"""The `llamactl` Typer app: one thin module per command, each exposing `register(app)`."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from llamactl.errors import INTERRUPTED, TERMINATED, Terminated, printable


def _interrupted_at_startup() -> None:
    """Ctrl-C before any command runs (importing, loading plugins): nothing to clean up, so exit
    130 at once, without the traceback Python would print from deep inside an import."""
    # os.write, not print: the interrupt may have landed while sys.stderr's lock was held.
    os.write(2, b"llamactl: interrupted\n")
    os._exit(INTERRUPTED)


try:  # the imports below are most of start-up time: a Ctrl-C lands here more often than not
    import typer
    from typer.core import TyperCommand
    from typer.models import DefaultPlaceholder

    from llamactl import __version__
    from llamactl.cli._common import print_json_error, said
    from llamactl.cli._help import PANELS, TOOLS, TidyCommand, TidyGroup, epilog
    from llamactl.errors import printable
except KeyboardInterrupt:
    _interrupted_at_startup()


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
        cls=TidyGroup,
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
    order = list(dict.fromkeys(PANELS.values()))
    for info in app.registered_commands:  # plugin commands too: one look for every --help
        if isinstance(info.cls, DefaultPlaceholder) or info.cls in (None, TyperCommand):
            info.cls = TidyCommand
        if isinstance(info.rich_help_panel, DefaultPlaceholder) or info.rich_help_panel is None:
            info.rich_help_panel = PANELS.get(info.name or "", TOOLS)
        if isinstance(info.epilog, DefaultPlaceholder) or info.epilog is None:
            info.epilog = epilog(info.name or "")
    # Panels are shown in the order their first command comes: model work, store, tools.
    app.registered_commands.sort(key=lambda i: order.index(i.rich_help_panel) if i.rich_help_panel in order else 99)
    return app


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _run_plain(app: typer.Typer) -> int:
    """Run the app for a script reading stderr: a usage error is one line, like every other error."""
    try:
        code = app(prog_name="llamactl", standalone_mode=False)
    except typer.TyperException as exc:  # click's UsageError / BadParameter, as Typer re-exports them
        show = getattr(exc, "show", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and show is not None:
            show()  # `llamactl` alone: the help text, as on a terminal
        else:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            line = f"{printable(' '.join(message.split()))}{hint}"
            if "--json" in sys.argv[1:]:  # the command never ran, but its caller parses stdout
                print_json_error(line, int(getattr(exc, "exit_code", 2)))
            print(f"llamactl: error: {line}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except typer.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns a Ctrl-C into Abort
            _interrupted_at_startup()
        print("llamactl: aborted", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


def _was_a_rank() -> bool:
    """Whether this process joined a tensor-parallel process group (never imports torch itself)."""
    tp = sys.modules.get("llamactl.engine.tp")
    return tp is not None and tp.ended_a_group()


MODEL_COMMANDS = frozenset({"chat", "generate", "bench", "serve", "quantize"})


def _runs_a_model(argv: list[str]) -> bool:
    """Whether the command line names a command that runs a model (and is not asking for help)."""
    words = [arg for arg in argv if not arg.startswith("-")]
    return bool(words) and words[0] in MODEL_COMMANDS and not {"--help", "-h"} & set(argv)


def main() -> None:
    """Console-script entry point."""
    from llamactl.threads import apply_openmp_defaults

    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: temporary outputs are removed
    try:
        # Before anything imports torch: OpenMP reads its wait policy once, at load. Only commands
        # that run a model pay the 50 ms look at the CPUs (never --help, list or completions).
        apply_openmp_defaults(check_load=_runs_a_model(sys.argv[1:]))
        app = build_app()
    except KeyboardInterrupt:
        _interrupted_at_startup()
    try:
        if sys.stderr.isatty():
            app(prog_name="llamactl")  # usage errors as Typer's framed panel, for a person
        else:
            sys.exit(_run_plain(app))
    except KeyboardInterrupt:  # while Typer builds the click command: no command has started yet
        _interrupted_at_startup()
    except SystemExit as exc:
        # The command is over: a Ctrl-C now would only interrupt Python's own shutdown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if exc.code == INTERRUPTED and not said["interrupted"]:
            os.write(2, b"llamactl: interrupted\n")  # Typer's own exit 130, outside any command
        if exc.code in (INTERRUPTED, TERMINATED) or (_was_a_rank() and isinstance(exc.code, (int, type(None)))):
            # A Ctrl-C that lands while CPython runs exec()'d code (dataclass and namedtuple
            # creation during a lazy import) leaves a flag that makes it re-raise SIGINT at exit
            # even though we handled it: the caller would see "killed by signal 2", not our
            # documented 130. Everything was cleaned up on the way here, so exit directly.
            # So does a tensor-parallel rank: gloo's teardown can abort (engine.tp.ended_a_group).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code or 0)  # type: ignore[arg-type]
        raise
