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


TEMPLATE_PLUGIN = """
from llamactl.plugins import hookimpl

@hookimpl
def register_chat_templates(register):
    def encode(tokenizer, dialog):
        return tokenizer.encode("USER: " + dialog[-1].content + " BOT:", bos=True)

    register("toy-chat", encode)
"""


def test_a_plugin_chat_template_is_used_by_tokenize_and_chat(plugin_site: Path, tmp_path: Path) -> None:
    from llamactl.tokenizer import load_tokenizer
    from tests._chat_util import tiny_checkpoint

    make_plugin(plugin_site, "toychat", TEMPLATE_PLUGIN)
    model, _ = tiny_checkpoint(tmp_path / "m")
    expected = load_tokenizer(model / "tokenizer.model").encode("USER: hi there BOT:", bos=True)
    dialog = tmp_path / "dialog.json"
    dialog.write_text(json.dumps([{"role": "user", "content": "hi there"}]))

    out = run_cli("tokenize", "--chat", str(dialog), "--model", str(model), "--template", "toy-chat", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout) == expected
    builtin = run_cli("tokenize", "--chat", str(dialog), "--model", str(model), "--json")
    assert json.loads(builtin.stdout) != expected  # the default stays Meta's template

    chat = run_cli(
        "chat",
        str(model),
        "-p",
        "hi there",
        "--template",
        "toy-chat",
        "-t",
        "0",
        "-n",
        "3",
        "--json",
        "--device",
        "cpu",
    )
    assert chat.exit_code == 0, chat.stderr
    record = json.loads(chat.stdout)
    assert record["template"] == "toy-chat" and record["tokens_in"] == len(expected)

    assert_one_line_error(
        run_cli("tokenize", "--chat", str(dialog), "--model", str(model), "--template", "nope"),
        "--template nope",
        "llama-2-chat, toy-chat",
        code=2,
    )


SCHEME_PLUGIN = """
from llamactl.plugins import hookimpl
from llamactl.quantize import QuantSpec

@hookimpl
def register_quantizers(register):
    register("fp4-plain", QuantSpec("fp4", double_quant=False))
    register("not-a-spec", object())
"""


def test_a_plugin_quantization_scheme_is_used_by_quantize(plugin_site: Path, tmp_path: Path) -> None:
    from tests._quantize_util import meta_src

    make_plugin(plugin_site, "toyq", SCHEME_PLUGIN)
    src = meta_src(tmp_path / "src")
    out = run_cli(
        "quantize", str(src), str(tmp_path / "q"), "--scheme", "fp4-plain", "--no-eval", "--json", "--device", "cpu"
    )
    assert out.exit_code == 0, out.stderr
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "fp4" and config["bnb_4bit_use_double_quant"] is False

    builtin = run_cli("quantize", str(src), str(tmp_path / "q8"), "--scheme", "int8", "--no-eval", "--device", "cpu")
    assert builtin.exit_code == 0, builtin.stderr
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True

    for args, fragment in (
        (["--scheme", "nope"], "fp4, fp4-plain, int8, nf4, not-a-spec"),
        (["--scheme", "not-a-spec"], "not a llamactl.quantize.QuantSpec"),
        (["--scheme", "nf4", "--bits", "4"], "exactly one of --bits"),
        ([], "exactly one of --bits"),
    ):
        assert_one_line_error(run_cli("quantize", str(src), str(tmp_path / "bad"), *args), fragment, code=2)
    assert not (tmp_path / "bad").exists()
