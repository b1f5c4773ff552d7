"""The plugin manager: built-ins and installed plugins register through the same pluggy hooks.

A plugin is an installed distribution with an entry point in the group `llamactl.plugins`
whose target (a module or object) carries `@hookimpl` functions:

    from llamactl.plugins import hookimpl

    @hookimpl
    def register_commands(app): ...          # app: the typer.Typer root
    @hookimpl
    def register_formats(register): ...      # register(CheckpointFormat)
    @hookimpl
    def register_chat_templates(register): ...  # register(name, template)
    @hookimpl
    def register_quantizers(register): ...   # register(name, QuantSpec)
    @hookimpl
    def register_model_sources(register): ...  # register(llamactl.sources.ModelSource)

llamactl's own modules are plugins of the same group, declared in its pyproject.toml: this
module imports none of them and knows none by name. They always load; third-party plugins
load unless `LLAMACTL_LOAD_PLUGINS` (comma list of entry-point or distribution names; empty:
none) leaves them out. A third-party plugin that fails to import, raises, calls sys.exit or
takes longer than `LLAMACTL_PLUGIN_TIMEOUT` seconds to import is recorded as failed and
skipped: the library never prints, so the CLI reports `Registry.failures` as warnings. Each
plugin's hooks run in isolation so one broken plugin cannot take the registrations of others
(or of the built-ins) down with it.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from llamactl.errors import LlamactlError

PROJECT = "llamactl"
ENTRY_POINT_GROUP = "llamactl.plugins"
ENV_VAR = "LLAMACTL_LOAD_PLUGINS"
TIMEOUT_ENV_VAR = "LLAMACTL_PLUGIN_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0

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
        """Call `register(name, template)`: a ChatTemplate, or a function encode(tokenizer, dialog) -> ids."""

    @hookspec
    def register_quantizers(self, register: Callable[[str, Any], None]) -> None:
        """Call `register(name, spec)` for each quantization scheme (a llamactl.quantize.QuantSpec)."""

    @hookspec
    def register_model_sources(self, register: Callable[[Any], None]) -> None:
        """Call `register(ModelSource(...))` for each model name a package provides (llamactl.sources)."""


# hook -> (what one registration is called, PluginInfo field that lists them)
KINDS: dict[str, tuple[str, str]] = {
    "register_formats": ("format", "formats"),
    "register_chat_templates": ("chat template", "chat_templates"),
    "register_quantizers": ("quantizer", "quantizers"),
    "register_model_sources": ("model source", "model_sources"),
}


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
    model_sources: list[str] = field(default_factory=list)

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
            "model_sources": self.model_sources,
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


def _timeout_s() -> float:
    try:
        return max(0.0, float(os.environ.get(TIMEOUT_ENV_VAR, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


class Registry:
    """The loaded plugins and, per kind, everything they registered."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(HookSpecs)
        self.infos: dict[str, PluginInfo] = {}  # by plugin name; the built-ins share one, "llamactl"
        self._owner: dict[str, PluginInfo] = {}  # pluggy's name of each registered object -> its plugin
        self.failures: list[str] = []
        self._tables: dict[str, dict[str, Any]] = {}
        self._registered_by: dict[tuple[str, str], PluginInfo] = {}  # (hook, name) -> who registered it
        self._load_builtins()
        self._load_entry_points()

    # ------------------------------------------------------------------ loading

    def _load_builtins(self) -> None:
        """llamactl's own plugin modules: a failure here is a bug, so it raises."""
        eps = _builtin_entry_points(ENTRY_POINT_GROUP)
        if not eps:
            raise LlamactlError(
                "llamactl's built-in commands and formats are missing: they register through the "
                f"{ENTRY_POINT_GROUP!r} entry points, so install the package (pip install -e .)"
            )
        info = self.infos[PROJECT] = PluginInfo(PROJECT, PROJECT, eps[0].dist.version if eps[0].dist else None, True)
        for ep in eps:
            name = f"{PROJECT}:{ep.name}"
            self._owner[name] = info
            self.manager.register(ep.load(), name=name)

    def _load_entry_points(self) -> None:
        wanted = selected_names()
        found: set[str] = set()
        pending: list[tuple[md.EntryPoint, PluginInfo]] = []
        for ep in _entry_points(ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            keys = {_normalise(ep.name)} | ({_normalise(dist)} if dist else set())
            if ep.name in self.infos or dist == PROJECT or (wanted is not None and not keys & wanted):
                continue
            found |= keys
            info = PluginInfo(ep.name, dist, ep.dist.version if ep.dist is not None else None)
            self.infos[ep.name] = info
            pending.append((ep, info))
        for (ep, info), (plugin, error) in zip(pending, _import_all([ep for ep, _ in pending], _timeout_s())):
            if error is not None:
                self._fail(info, error)
                continue
            try:
                self.manager.register(plugin, name=ep.name)
                self._owner[ep.name] = info
            except Exception as exc:  # e.g. a hookimpl whose signature matches no hookspec
                self._fail(info, f"failed to load ({_describe(exc)})")
        for name in sorted((wanted or set()) - found):
            self.failures.append(f"plugin {name!r} named in {ENV_VAR} is not installed")

    def _fail(self, info: PluginInfo, why: str) -> None:
        info.error = info.error or why
        self.failures.append(f"plugin {info.name!r} {why}; ignoring it")

    def _impls(self, hook: str) -> list[tuple[PluginInfo, Callable[..., Any]]]:
        """Each loaded plugin's implementation of `hook`, built-ins first, each in load order."""
        order = {name: i for i, name in enumerate(self._owner)}
        impls = sorted(getattr(self.manager.hook, hook).get_hookimpls(), key=lambda impl: order[impl.plugin_name])
        return [(self._owner[i.plugin_name], i.function) for i in impls if self._owner[i.plugin_name].ok]

    # ------------------------------------------------------------------ hooks

    def table(self, hook: str) -> dict[str, Any]:
        """name -> object for one kind, filled once by running `hook(register)` for each plugin.

        A plugin's registrations count only if its hook finished; a name registered again by a
        later plugin replaces the earlier one (with a warning when a third party does it).
        """
        if hook in self._tables:
            return self._tables[hook]
        kind, listing = KINDS[hook]
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
            except (Exception, SystemExit, KeyboardInterrupt) as exc:
                if info.builtin:
                    raise
                self._fail(info, f"raised in {hook} ({_describe(exc)})")
                continue
            for name, obj in mine.items():
                if name in table and not info.builtin:
                    self.failures.append(f"plugin {info.name!r}: {kind} {name!r} replaces an earlier one")
                table[name] = obj
                self._registered_by[hook, name] = info
                getattr(info, listing).append(name)
        self._tables[hook] = table
        return table

    def call_isolated(self, hook: str, name: str, function: Callable[..., Any], *args: Any) -> Any:
        """Call a registered object's function; a third-party one that raises is reported and gives None.

        A plugin's format must not break `convert` on an ordinary model just because its
        detect() crashes: the failure joins `failures` (the CLI shows it) and the caller
        carries on as if the plugin had said no.
        """
        owner = self._registered_by.get((hook, name))
        try:
            return function(*args)
        except Exception as exc:
            if owner is None or owner.builtin:
                raise
            kind = KINDS[hook][0]
            self.failures.append(f"plugin {owner.name!r}: {kind} {name!r} raised ({_describe(exc)}); ignored")
            return None

    def formats(self) -> dict[str, Any]:
        """Every registered CheckpointFormat by name, built-ins first."""
        return self.table("register_formats")

    def chat_templates(self) -> dict[str, Any]:
        return self.table("register_chat_templates")

    def quantizers(self) -> dict[str, Any]:
        return self.table("register_quantizers")

    def model_sources(self) -> dict[str, Any]:
        return self.table("register_model_sources")

    def add_commands(self, app: Any, guard: CommandGuard | None = None) -> None:
        """Let every plugin add its commands to `app`; plugin callbacks are wrapped by `guard`."""
        for info, function in self._impls("register_commands"):
            before_cmds, before_groups = len(app.registered_commands), len(app.registered_groups)
            existing = _command_names(app.registered_commands[:before_cmds], app.registered_groups[:before_groups])
            try:
                function(app=app)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:
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
        for hook in KINDS:
            self.table(hook)
        return [info for info in self.infos.values() if include_builtin or not info.builtin]


def _import_all(eps: list[md.EntryPoint], timeout: float) -> list[tuple[Any, str | None]]:
    """Load entry points side by side in daemon threads; (object, None) or (None, why) for each.

    A plugin that blocks at import (waiting on a network, a lock, input) must not hang every
    llamactl command, `--help` included: whatever has not finished by the deadline is
    abandoned (its thread dies with the process) and reported.
    """
    results: list[tuple[Any, str | None]] = [(None, "did not finish importing")] * len(eps)

    def load(i: int, ep: md.EntryPoint) -> None:
        try:
            results[i] = (ep.load(), None)
        except BaseException as exc:  # a plugin's ImportError, SystemExit, KeyboardInterrupt...
            results[i] = (None, f"failed to load ({_describe(exc)})")

    threads = [threading.Thread(target=load, args=(i, ep), daemon=True) for i, ep in enumerate(eps)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for i, thread in enumerate(threads):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            results[i] = (None, f"did not finish importing within {timeout:g} s ({TIMEOUT_ENV_VAR})")
    return results


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


def _builtin_entry_points(group: str) -> list[md.EntryPoint]:
    """llamactl's own entry points of `group`, in the order pyproject.toml lists them."""
    try:
        dist = md.distribution(PROJECT)
    except md.PackageNotFoundError:
        return []
    return [ep for ep in dist.entry_points if ep.group == group]


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
