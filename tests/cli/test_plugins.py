"""`llamactl plugins`, plugin commands, broken plugins and completion of plugin commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._plugins_util import CLASHES, GOOD, IMPORT_ERROR, make_plugin, plugin_site
from tests.cli._run import assert_one_line_error, run_cli

__all__ = ["plugin_site"]
ROOT = Path(__file__).resolve().parents[2]


def test_plugins_lists_what_each_registers(plugin_site: Path) -> None:
    make_plugin(plugin_site, "good", GOOD, version="2.0.1")
    out = run_cli("plugins", "--json")
    assert out.exit_code == 0 and out.stderr == ""
    [plugin] = json.loads(out.stdout)
    assert plugin["name"] == "good" and plugin["version"] == "2.0.1" and plugin["status"] == "ok"
    assert plugin["commands"] == ["hello", "boom"] and plugin["formats"] == ["toy"]
    human = run_cli("plugins")
    assert human.stdout.startswith("good\t2.0.1\tllamactl-good\tcommands: hello, boom; formats: toy")
    builtin = json.loads(run_cli("plugins", "--json", "--all").stdout)[0]
    assert builtin["builtin"] and {"list", "pull", "plugins"} <= set(builtin["commands"])


def test_no_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_LOAD_PLUGINS", "")
    out = run_cli("plugins")
    assert out.exit_code == 0 and out.stdout == "" and "no plugins installed" in out.stderr
    assert json.loads(run_cli("plugins", "--json").stdout) == []


def test_plugin_command_runs_and_its_crash_is_one_line(plugin_site: Path) -> None:
    make_plugin(plugin_site, "good", GOOD)
    out = run_cli("hello", "--name", "llama")
    assert (out.exit_code, out.stdout, out.stderr) == (0, "hello llama\n", "")
    assert "Say hello (from a plugin)" in run_cli("--help").stdout
    assert_one_line_error(run_cli("boom"), "plugin 'good'", "'boom'", "ZeroDivisionError: division by zero")


def _run_subprocess(site: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), **env_extra)
    env.pop("LLAMACTL_LOAD_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "llamactl", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_broken_plugin_warns_once_and_cli_works(plugin_site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_plugin(plugin_site, "broken", IMPORT_ERROR)
    help_out = _run_subprocess(plugin_site, "--help")
    assert help_out.returncode == 0 and "pull" in help_out.stdout
    [line] = help_out.stderr.strip().splitlines()
    assert line.startswith("llamactl: warning: plugin 'broken' failed to load (ModuleNotFoundError")
    listing = run_cli("list", "--json")  # in-process: the warning goes to the real stderr at app build
    assert listing.exit_code == 0 and json.loads(listing.stdout) == []
    assert capsys.readouterr().err.count("plugin 'broken' failed to load") == 1
    [plugin] = json.loads(run_cli("plugins", "--json").stdout)
    assert plugin["status"] == "failed" and "ModuleNotFoundError" in plugin["error"]


def test_plugin_cannot_replace_a_builtin_command(plugin_site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_plugin(plugin_site, "clash", CLASHES)
    out = run_cli("list", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout) == []
    assert "command 'list' already exists" in capsys.readouterr().err


def test_completion_offers_plugin_commands(plugin_site: Path) -> None:
    """Shell completion runs the real program, so installed plugins' commands complete too."""
    make_plugin(plugin_site, "good", GOOD)
    done = _run_subprocess(plugin_site, _LLAMACTL_COMPLETE="complete_bash", COMP_WORDS="llamactl hel", COMP_CWORD="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hello"] and done.stderr == ""
