"""The plugin manager: built-ins and installed plugins register through the same pluggy hooks.

A plugin is an installed distribution with an entry point in the group `llamactl.plugins`
whose target (a module or object) carries `@hookimpl` functions:

    from llamactl.plugins import hookimpl

    @hookimpl
    def register_commands(app): ...          # app: the typer.Typer root
    @hookimpl
    def register_formats(register): ...      # register(CheckpointFormat)
    @hookimpl
    def register_chat_templates(register): ...  # register(name, encode(tokenizer, dialog) -> ids)
    @hookimpl
    def register_quantizers(register): ...   # register(name, scheme object)

`LLAMACTL_LOAD_PLUGINS` (comma list of entry-point or distribution names) picks which
plugins load; empty loads none, unset loads all. A plugin that fails to import (or raises,
or calls sys.exit) is recorded as failed and skipped: the library never prints, so the CLI
reports `Registry.failures` as warnings. Each plugin's hooks run in isolation so one broken
plugin cannot take registrations of others (or of the built-ins) down with it.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

PROJECT = "llamactl"
ENTRY_POINT_GROUP = "llamactl.plugins"
ENV_VAR = "LLAMACTL_LOAD_PLUGINS"
BUILTIN = "llamactl"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# Wraps a plugin command's callback: (plugin name, command name, callback) -> callback.
CommandGuard = Callable[[str, str, Callable[..., Any]], Callable[..., Any]]


class HookSpecs:
    """The hooks a plugin may implement (each receives one keyword argument)."""

    @hookspec
    def register_commands(self, app: Any) -> None:
        """Add commands (`app.command(...)`) or sub-apps (`app.add_typer(...)`) to the root Typer app."""

    @hookspec
    def register_formats(self, register: Callable[[Any], None]) -> None:
        """Call `register(CheckpointFormat(...))` for each checkpoint format (llamactl.checkpoint.formats)."""

    @hookspec
    def register_chat_templates(self, register: Callable[[str, Any], None]) -> None:
        """Call `register(name, encode)`, encode(tokenizer, dialog) -> list[int] of prompt token ids."""

    @hookspec
    def register_quantizers(self, register: Callable[[str, Any], None]) -> None:
        """Call `register(name, scheme)` for each quantization scheme (e.g. a llamactl.quantize.QuantSpec)."""


class _Builtins:
    """llamactl's own commands, formats, chat template and quantizers, registered like a plugin's."""

    @hookimpl
    def register_commands(self, app: Any) -> None:
        import importlib

        from llamactl.cli import COMMAND_MODULES

        for name in COMMAND_MODULES:
            importlib.import_module(f"llamactl.cli.{name}").register(app)

    @hookimpl
    def register_formats(self, register: Callable[[Any], None]) -> None:
        from llamactl.checkpoint.formats import FORMATS

        for name in ("meta", "hf"):
            if name in FORMATS:
                register(FORMATS[name])

    @hookimpl
    def register_chat_templates(self, register: Callable[[str, Any], None]) -> None:
        from llamactl.chat import TEMPLATE_NAME, encode_dialog

        register(TEMPLATE_NAME, encode_dialog)

    @hookimpl
    def register_quantizers(self, register: Callable[[str, Any], None]) -> None:
        from llamactl.quantize import QuantSpec

        register("int8", QuantSpec(bits=8))
        register("nf4", QuantSpec(bits=4, quant_type="nf4"))
        register("fp4", QuantSpec(bits=4, quant_type="fp4"))


@dataclass
class PluginInfo:
    """One plugin as `llamactl plugins` shows it."""

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    error: str | None = None
    commands: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    chat_templates: list[str] = field(default_factory=list)
    quantizers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "status": "ok" if self.ok else "failed",
            "error": self.error,
            "commands": self.commands,
            "formats": self.formats,
            "chat_templates": self.chat_templates,
            "quantizers": self.quantizers,
        }


def selected_names(environ: dict[str, str] | None = None) -> set[str] | None:
    """Names listed in LLAMACTL_LOAD_PLUGINS; None when unset (load everything)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR)
    if value is None:
        return None
    return {_normalise(part) for part in value.split(",") if part.strip()}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Registry:
    """The loaded plugins and everything they registered."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(HookSpecs)
        self.infos: dict[str, PluginInfo] = {}
        self.failures: list[str] = []
        self._collected: dict[str, dict[str, Any]] = {}
        self.manager.register(_Builtins(), name=BUILTIN)
        self.infos[BUILTIN] = PluginInfo(BUILTIN, PROJECT, _version(PROJECT), builtin=True)
        self._load_entry_points()

    # ------------------------------------------------------------------ loading

    def _load_entry_points(self) -> None:
        wanted = selected_names()
        found: set[str] = set()
        for ep in _entry_points(ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            keys = {_normalise(ep.name)} | ({_normalise(dist)} if dist else set())
            if ep.name in self.infos or (wanted is not None and not keys & wanted):
                continue
            found |= keys
            info = PluginInfo(ep.name, dist, ep.dist.version if ep.dist is not None else None)
            self.infos[ep.name] = info
            try:
                plugin = ep.load()
                self.manager.register(plugin, name=ep.name)
            except (Exception, SystemExit) as exc:  # a broken plugin must not break llamactl
                self._fail(info, f"failed to load ({_describe(exc)})")
        for name in sorted((wanted or set()) - found):
            self.failures.append(f"plugin {name!r} named in {ENV_VAR} is not installed")

    def _fail(self, info: PluginInfo, why: str) -> None:
        info.error = info.error or why
        self.failures.append(f"plugin {info.name!r} {why}; ignoring it")

    def _impls(self, hook: str) -> list[tuple[PluginInfo, Callable[..., Any]]]:
        """Each loaded plugin's implementation of `hook`, built-ins first."""
        out = []
        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            info = self.infos[impl.plugin_name]
            if info.ok:
                out.append((info, impl.function))
        return sorted(out, key=lambda item: not item[0].builtin)

    # ------------------------------------------------------------------ hooks

    def _collect(self, hook: str, kind: str) -> dict[str, Any]:
        """Run `hook(register)` for each plugin; a plugin's registrations count only if it finished."""
        if hook in self._collected:
            return self._collected[hook]
        table: dict[str, Any] = {}
        for info, function in self._impls(hook):
            mine: dict[str, Any] = {}

            def register(*args: Any, _mine: dict[str, Any] = mine) -> None:
                obj = args[-1]
                name = args[0] if len(args) == 2 else getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise TypeError(f"register() needs a name for {obj!r}")
                _mine[name] = obj

            try:
                function(register=register)
            except (Exception, SystemExit) as exc:
                if info.builtin:
                    raise
                self._fail(info, f"raised in {hook} ({_describe(exc)})")
                continue
            for name, obj in mine.items():
                if name in table and not info.builtin:
                    self.failures.append(f"plugin {info.name!r}: {kind} {name!r} replaces an earlier one")
                table[name] = obj
                getattr(info, kind + "s").append(name)
        self._collected[hook] = table
        return table

    def formats(self) -> dict[str, Any]:
        """Every registered CheckpointFormat by name (also added to llamactl.checkpoint's registry)."""
        table = self._collect("register_formats", "format")
        from llamactl.checkpoint.formats import FORMATS, register_format

        for fmt in table.values():
            if FORMATS.get(fmt.name) is not fmt:
                register_format(fmt)
        return table

    def chat_templates(self) -> dict[str, Any]:
        return self._collect("register_chat_templates", "chat_template")

    def quantizers(self) -> dict[str, Any]:
        return self._collect("register_quantizers", "quantizer")

    def add_commands(self, app: Any, guard: CommandGuard | None = None) -> None:
        """Let every plugin add its commands to `app`; plugin callbacks are wrapped by `guard`."""
        for info, function in self._impls("register_commands"):
            before_cmds, before_groups = len(app.registered_commands), len(app.registered_groups)
            existing = _command_names(app.registered_commands[:before_cmds], app.registered_groups[:before_groups])
            try:
                function(app=app)
            except (Exception, SystemExit) as exc:
                if info.builtin:
                    raise  # a broken built-in is a bug, not a plugin to skip
                del app.registered_commands[before_cmds:], app.registered_groups[before_groups:]
                self._fail(info, f"raised in register_commands ({_describe(exc)})")
                continue
            new_cmds = app.registered_commands[before_cmds:]
            new_groups = app.registered_groups[before_groups:]
            for cmd in list(new_cmds):
                name = _command_name(cmd)
                if name in existing and not info.builtin:
                    app.registered_commands.remove(cmd)
                    self.failures.append(f"plugin {info.name!r}: command {name!r} already exists; ignored")
                    continue
                existing.add(name)
                info.commands.append(name)
                if guard is not None and not info.builtin:
                    cmd.callback = guard(info.name, name, cmd.callback)
            for group in new_groups:
                info.commands.append(_group_name(group))
                if guard is not None and not info.builtin:
                    _guard_group(group.typer_instance, info.name, guard)

    def plugins(self, include_builtin: bool = False) -> list[PluginInfo]:
        """What each plugin registered (runs every registration hook first)."""
        self.formats()
        self.chat_templates()
        self.quantizers()
        return [info for info in self.infos.values() if include_builtin or not info.builtin]


def _command_name(cmd: Any) -> str:
    if cmd.name:
        return str(cmd.name)
    callback = getattr(cmd.callback, "__name__", "?")
    return callback.replace("_", "-").lower()


def _group_name(group: Any) -> str:
    # Typer leaves DefaultPlaceholder objects where no name was given.
    for name in (group.name, getattr(group.typer_instance.info, "name", None) if group.typer_instance else None):
        if isinstance(name, str) and name:
            return name
    return "?"


def _command_names(commands: Iterable[Any], groups: Iterable[Any]) -> set[str]:
    return {_command_name(cmd) for cmd in commands} | {_group_name(g) for g in groups}


def _guard_group(app: Any, plugin: str, guard: CommandGuard) -> None:
    for cmd in app.registered_commands:
        cmd.callback = guard(plugin, _command_name(cmd), cmd.callback)
    for group in app.registered_groups:
        _guard_group(group.typer_instance, plugin, guard)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _entry_points(group: str) -> list[md.EntryPoint]:
    """Installed entry points of `group` (a seam for tests)."""
    return list(md.entry_points(group=group))


_REGISTRY: Registry | None = None


def get_registry(fresh: bool = False) -> Registry:
    """The process-wide registry, loading plugins on first use (`fresh`: reload, as each CLI run does)."""
    global _REGISTRY
    if _REGISTRY is None or fresh:
        _REGISTRY = Registry()
    return _REGISTRY


def reset() -> None:
    """Forget loaded plugins (tests change LLAMACTL_LOAD_PLUGINS or sys.path between runs)."""
    global _REGISTRY
    _REGISTRY = None
