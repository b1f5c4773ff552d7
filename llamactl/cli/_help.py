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
    "serve": MODEL_WORK,
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


# THE examples `llamactl CMD --help` ends with (tests parse each against its command).
EXAMPLES: dict[str, list[str]] = {
    "chat": [
        "llamactl chat 7b-chat",
        'llamactl chat 7b-chat -p "Hi" --json',
        'echo "Hi" | llamactl chat 7b-chat-q4 --temp 0',
        'llamactl chat 7b-chat --system "Answer in French." --bits 4',
    ],
    "generate": [
        'llamactl generate 7b "Once upon a time" -t 0 -n 64',
        'llamactl generate ./stories260K "" --temp 0 --json',
    ],
    "serve": [
        "llamactl serve 7b-chat",
        "llamactl serve 7b-chat --port 0 --json",
        'llamactl serve 7b-chat --host 0.0.0.0 --api-key "$KEY" --bits 4 --ctx 4096',
    ],
    "convert": [
        "llamactl convert llama-2-70b/ llama-2-70b-hf/ --to hf",
        "llamactl convert llama-2-7b-hf/ llama-2-7b/ --to meta --shards 2",
        "llamactl convert 7b-chat 7b-chat.gguf --to gguf --gguf-type q8_0",
    ],
    "quantize": [
        "llamactl quantize 7b-chat --bits 4",
        "llamactl quantize 7b-chat --scheme nf4 --no-eval",
        "llamactl quantize llama-2-7b-hf/ llama-2-7b-q8/ --bits 8 --json",
    ],
    "bench": [
        "llamactl bench --ctx 4096",
        "llamactl bench --preset 70b --layers 8 --dtype bf16",
        "llamactl bench 7b-chat --bits 16,8,4 -o md",
    ],
    "list": ["llamactl list", "llamactl list --json"],
    "show": ["llamactl show 7b-chat", "llamactl show ./llama-2-7b-hf --json"],
    "pull": ["llamactl pull meta-llama/Llama-2-7b-chat-hf", "llamactl pull TheOrg/tiny-llama --name tiny --json"],
    "import": [
        "llamactl import ./stories260K stories --ctx 512",
        "llamactl import ./model.Q4_0.gguf tiny-q4 --link",
        "llamactl import ./Llama-2-7b-chat 7b-chat --move --json",
    ],
    "rm": ["llamactl rm 7b-chat-q4", "llamactl rm old-model --yes --json"],
    "info": ["llamactl info 7b-chat", "llamactl info llama-2-70b/ --ctx 4096 --json"],
    "tokenize": [
        'llamactl tokenize "Hello world" -m 7b-chat',
        "llamactl tokenize --chat dialog.json -m 7b-chat --pieces",
    ],
    "plugins": ["llamactl plugins", "llamactl plugins --all --json"],
}


def epilog(command: str) -> str | None:
    """The Examples section of a command's help (one paragraph per line in Typer's rich help)."""
    lines = EXAMPLES.get(command)
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines) if lines else None


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
