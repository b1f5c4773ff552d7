"""How `--help` reads: usage in the conventional `SRC DST` form and value names, not Python types.

Typer writes arguments as `{src}` and every value as its Python type (`<str>`, `<bool>`,
`<list[str]>`). The command and group classes here give each parameter a metavar once, when
the click command is built, so built-in and plugin commands read alike; a metavar a command
sets itself is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from typer.core import TyperArgument, TyperCommand, TyperGroup

# Value names by annotation (an option's own metavar wins): what a user types, not a type.
_VALUE_NAMES: dict[Any, str] = {int: "N", float: "NUM", str: "TEXT", Path: "PATH"}

# Sections of `llamactl --help` (Typer's rich_help_panel), in the order shown.
MODEL_WORK = "Model work"
STORE = "Model store"
TOOLS = "Tools"
PANELS: dict[str, str] = {
    "chat": MODEL_WORK,
    "generate": MODEL_WORK,
    "convert": MODEL_WORK,
    "quantize": MODEL_WORK,
    "bench": MODEL_WORK,
    "list": STORE,
    "show": STORE,
    "pull": STORE,
    "import": STORE,
    "rm": STORE,
    "info": TOOLS,
    "tokenize": TOOLS,
    "plugins": TOOLS,
}


def _value_name(annotation: Any) -> str:
    inner = get_args(annotation)
    base = inner[0] if inner else annotation  # list[str] -> str
    return _VALUE_NAMES.get(base, "VALUE")


class TidyArgument(TyperArgument):
    """An argument shown as `SRC` (required) or `[PROMPT]` in usage, by its name alone in the table."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def tidy_params(params: list[Any]) -> None:
    """Give every argument its upper-case name and every option a value name (flags: none)."""
    for param in params:
        if type(param) is TyperArgument:
            param.__class__ = TidyArgument  # same fields; only how it is displayed changes
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        else:
            param.metavar = _value_name(param.type_descriptor.annotation)


# get_params, not __init__: click adds --help (and Typer the completion options) only there.
class TidyCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        tidy_params(params)
        return params


class TidyGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        tidy_params(params)
        return params
