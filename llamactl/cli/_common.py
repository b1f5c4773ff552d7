"""What every command shares: error handling, stderr console, JSON output."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from llamactl.errors import INTERRUPTED, TERMINATED, LlamactlError, Terminated

F = TypeVar("F", bound=Callable[..., Any])

# What cli_command has told the user: Typer turns a Ctrl-C outside any command (while parsing,
# say) into a silent exit 130, and main() then says it instead.
said: dict[str, bool] = {"interrupted": False}

# Results go to stdout, everything else (progress, warnings) to stderr.
stderr = Console(stderr=True, highlight=False)


def stdout() -> Console:
    """A console on the current stdout (created late so test runners can capture it)."""
    return Console(highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `llamactl: error: message` on stderr and return the Exit to raise."""
    print(f"llamactl: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def warn(message: str) -> None:
    print(f"llamactl: warning: {message}", file=sys.stderr)


def cli_command(func: F) -> F:
    """Turn library errors into one stderr line and an exit code; Ctrl-C into exit 130, SIGTERM 143."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llamactl.plugins import get_registry

        failures = get_registry().failures
        reported = len(failures)
        try:
            return func(*args, **kwargs)
        except LlamactlError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except Terminated:
            print("llamactl: terminated", file=sys.stderr)
            raise typer.Exit(TERMINATED) from None
        except KeyboardInterrupt:
            print("llamactl: interrupted", file=sys.stderr)
            said["interrupted"] = True
            raise typer.Exit(INTERRUPTED) from None
        finally:
            for line in failures[reported:]:  # a plugin that broke during the command (e.g. in detect())
                warn(line)

    return wrapper  # type: ignore[return-value]


def write(text: str) -> None:
    """Text on stdout as it comes (a streamed answer): written and flushed, never restyled."""
    sys.stdout.write(text)
    sys.stdout.flush()


def loading_status(what: str) -> contextlib.AbstractContextManager[object]:
    """A transient spinner on stderr while weights load (nothing when stderr is not a terminal)."""
    if stderr.is_terminal:
        return stderr.status(f"loading {what}…", spinner="dots")
    return contextlib.nullcontext()


def print_json(data: Any) -> None:
    """One JSON document on stdout (no colour, stable key order)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as memory is reported)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def byte_progress(description: str, total_bytes: int, total_items: int) -> Progress:
    """A progress bar on stderr with items, bytes and ETA; silent when stderr is not a TTY."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[items]}/" + str(total_items) + " tensors"),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
