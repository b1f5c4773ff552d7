"""The plugin manager: discovery by entry point, selection, isolation of broken plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.checkpoint import detect_format, formats
from llamactl.plugins import get_registry, selected_names
from tests._plugins_util import EXITS, GOOD, HOOK_RAISES, IMPORT_ERROR, RAISES, make_plugin, plugin_site

__all__ = ["plugin_site"]


def test_builtins_register_through_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_LOAD_PLUGINS", "")
    registry = get_registry(fresh=True)
    assert {"meta", "hf"} <= set(registry.formats())
    assert "llama-2-chat" in registry.chat_templates()
    assert {"int8", "nf4", "fp4"} <= set(registry.quantizers())
    assert registry.plugins() == [] and registry.failures == []
    [builtin] = registry.plugins(include_builtin=True)
    assert builtin.builtin and {"meta", "hf"} <= set(builtin.formats)


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("", set()), ("a, B_c,,", {"a", "b-c"})])
def test_selected_names(value: str | None, expected: set[str] | None) -> None:
    env = {} if value is None else {"LLAMACTL_LOAD_PLUGINS": value}
    assert selected_names(env) == expected


def test_plugin_registers_format_template_and_quantizer(plugin_site: Path, tmp_path: Path) -> None:
    make_plugin(plugin_site, "good", GOOD, version="1.2.3")
    registry = get_registry(fresh=True)
    [info] = registry.plugins()
    assert (info.name, info.distribution, info.version, info.ok) == ("good", "llamactl-good", "1.2.3", True)
    assert info.formats == ["toy"] and info.chat_templates == ["toy-chat"] and info.quantizers == ["toy-q"]
    assert "toy-chat" in registry.chat_templates() and "llama-2-chat" in registry.chat_templates()
    # The format is in the one registry llamactl.checkpoint reads, so detection finds it.
    assert "toy" in formats()
    model = tmp_path / "toy-model"
    model.mkdir()
    (model / "toy.fmt").write_text("x")
    assert detect_format(model).name == "toy"


@pytest.mark.parametrize(
    ("source", "why"),
    [(IMPORT_ERROR, "ModuleNotFoundError"), (RAISES, "plugin exploded on import"), (EXITS, "sys.exit(3)")],
)
def test_broken_plugin_is_one_failure_and_others_still_load(plugin_site: Path, source: str, why: str) -> None:
    make_plugin(plugin_site, "broken", source)
    make_plugin(plugin_site, "good", GOOD)
    registry = get_registry(fresh=True)
    infos = {i.name: i for i in registry.plugins()}
    assert infos["good"].ok and infos["good"].formats == ["toy"]
    assert not infos["broken"].ok and why in (infos["broken"].error or "")
    assert len(registry.failures) == 1
    assert "'broken'" in registry.failures[0] and why in registry.failures[0]


def test_plugin_whose_hook_raises_registers_nothing(plugin_site: Path) -> None:
    make_plugin(plugin_site, "hookfail", HOOK_RAISES)
    registry = get_registry(fresh=True)
    assert set(registry.formats()) == {"meta", "hf", "bnb", "gguf", "native"}
    [info] = registry.plugins()
    assert not info.ok and "bad format table" in (info.error or "")
    assert len(registry.failures) == 1 and "register_formats" in registry.failures[0]


def test_load_plugins_env_selects(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_plugin(plugin_site, "good", GOOD)
    make_plugin(plugin_site, "broken", RAISES)
    monkeypatch.setenv("LLAMACTL_LOAD_PLUGINS", "good")
    registry = get_registry(fresh=True)
    assert [i.name for i in registry.plugins()] == ["good"] and registry.failures == []
    monkeypatch.setenv("LLAMACTL_LOAD_PLUGINS", "llamactl-good,missing")  # distribution names work too
    registry = get_registry(fresh=True)
    assert [i.name for i in registry.plugins()] == ["good"]
    assert registry.failures == ["plugin 'missing' named in LLAMACTL_LOAD_PLUGINS is not installed"]
    monkeypatch.setenv("LLAMACTL_LOAD_PLUGINS", "")
    assert get_registry(fresh=True).plugins() == []
