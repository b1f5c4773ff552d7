"""`llamactl plugins`, and the glue that adds built-in and plugin commands to the app."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from llamactl.cli._common import cli_command, fail, print_json, warn
from llamactl.plugins import ENTRY_POINT_GROUP, PluginInfo, get_registry, hookimpl


def _is_control_flow(exc: BaseException) -> bool:
    """Typer/click exceptions (Exit, Abort, BadParameter...) are how commands end; let them through."""
    return any(cls.__name__ in ("ClickException", "Abort", "Exit") for cls in type(exc).__mro__)


def guard_plugin_command(plugin: str, command: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A crash in a plugin's command becomes one line naming the plugin, exit 1."""
    guarded = cli_command(func)  # library errors and Ctrl-C as for built-in commands

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return guarded(*args, **kwargs)
        except Exception as exc:
            if _is_control_flow(exc):
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            raise fail(f"plugin {plugin!r}: command {command!r} crashed: {detail}") from None

    return wrapper


def install_commands(app: typer.Typer) -> None:
    """Register built-in commands and every plugin's through the same hook; warn about broken plugins."""
    registry = get_registry(fresh=True)
    registry.add_commands(app, guard=guard_plugin_command)
    registry.formats()
    # Shell completion runs the app on every <TAB>: keep its stderr quiet.
    if not any(key.endswith("_COMPLETE") and key.startswith("_") for key in os.environ):
        for line in registry.failures:
            warn(line)


def _registers(info: PluginInfo) -> str:
    parts = [
        f"{label}: {', '.join(names)}"
        for label, names in (
            ("commands", info.commands),
            ("formats", info.formats),
            ("chat templates", info.chat_templates),
            ("quantizers", info.quantizers),
            ("model sources", info.model_sources),
        )
        if names
    ]
    return "; ".join(parts) or "nothing"


def plugins_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list for scripts.")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="Include llamactl's built-in registrations.")] = False,
) -> None:
    """List installed plugins, their versions and what each registers."""
    registry = get_registry()
    infos = registry.plugins(include_builtin=show_all)
    if json_output:
        print_json([info.to_dict() for info in infos])
        return
    if not infos:
        print(f"no plugins installed (entry point group {ENTRY_POINT_GROUP!r})", file=sys.stderr)
        return
    for info in infos:
        version = info.version or "?"
        source = "built-in" if info.builtin else (info.distribution or "?")
        what = _registers(info) if info.ok else f"FAILED: {info.error}"
        print(f"{info.name}\t{version}\t{source}\t{what}")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("plugins")(cli_command(plugins_command))
