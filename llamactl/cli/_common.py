"""What every command shares: error handling, stderr console, JSON output."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Sequence
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

from llamactl.errors import INTERRUPTED, TERMINATED, LlamactlError, Terminated, utf8_text

# Version of every --json document's shape; bump it when a field changes meaning or goes away
# (adding a field does not). Each JSON object llamactl prints carries it as "schema".
SCHEMA_VERSION = 1

F = TypeVar("F", bound=Callable[..., Any])

# What cli_command has told the user: Typer turns a Ctrl-C outside any command (while parsing,
# say) into a silent exit 130, and main() then says it instead.
said: dict[str, bool] = {"interrupted": False}

# Results go to stdout, everything else (progress, warnings) to stderr.
stderr = Console(stderr=True, highlight=False)


# Wide enough that no report line is ever wrapped when stdout is a pipe or a file.
PIPE_WIDTH = 100_000


def stdout() -> Console:
    """THE console on the current stdout (created late so test runners can capture it).

    On a terminal it wraps at the terminal's width; anywhere else (a pipe, a file) it never
    wraps, pads or colours: rich's default of 80 columns would break values mid-line.
    """
    console = Console(highlight=False, soft_wrap=True)
    if console.is_terminal:
        return console
    return Console(highlight=False, soft_wrap=True, width=PIPE_WIDTH, no_color=True, color_system=None)


def print_pairs(rows: Sequence[tuple[str, object]]) -> None:
    """A key/value report on stdout: keys padded to one column, values whole, no trailing spaces."""
    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        sys.stdout.write(f"{key.ljust(width)}  {value}".rstrip() + "\n")


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
            if kwargs.get("json_out"):  # a script parsing stdout learns of the failure there too
                print_json_error(str(exc), exc.exit_code)
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


def read_stdin() -> str:
    """All of stdin as text; invalid UTF-8 is one error naming stdin and the byte."""
    buffer = getattr(sys.stdin, "buffer", None)
    text = buffer.read().decode("utf-8", "surrogateescape") if buffer is not None else sys.stdin.read()
    return utf8_text(text, "stdin")


def write(text: str) -> None:
    """Text on stdout as it comes (a streamed answer): written and flushed, never restyled."""
    sys.stdout.write(text)
    sys.stdout.flush()


def loading_status(what: str) -> contextlib.AbstractContextManager[object]:
    """A transient spinner on stderr while weights load (nothing when stderr is not a terminal)."""
    if stderr.is_terminal:
        return stderr.status(f"loading {what}…", spinner="dots")
    return contextlib.nullcontext()


def json_document(data: Any) -> Any:
    """`data` as printed: an object gains `"schema": SCHEMA_VERSION` first (a list is left as it is)."""
    return {"schema": SCHEMA_VERSION, **data} if isinstance(data, dict) else data


def print_json(data: Any) -> None:
    """One JSON document on stdout (no colour, stable key order)."""
    sys.stdout.write(json.dumps(json_document(data), indent=2, default=str) + "\n")


def print_json_line(record: dict[str, Any]) -> None:
    """One JSON Lines record on stdout, flushed (a stream of answers or rows)."""
    write(json.dumps(json_document(record), ensure_ascii=False, default=str) + "\n")


def print_json_error(message: str, code: int) -> None:
    """The --json form of an error (the stderr line is printed as well)."""
    print_json({"error": {"message": message, "code": code}})


def human_count(n: int | None) -> str:
    """292800 -> '293K', 6.74e9 -> '6.74B': THE short form of a parameter count (info, show, list)."""
    if n is None:
        return "?"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def context_note(trained: int | None) -> str:
    """Whether a context is the trained one or only assumed (a Meta params.json has none): info, show."""
    return "trained" if trained is not None else "assumed: the checkpoint does not say; import --ctx N records it"


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
