"""The everyday CLI (issue 14, names and store half): known names and the pull offer, quantize into the
store, import copying, trained context, --json on rm/import, help, exit codes, completions.

Driven through real child processes (`python -m llamactl`), a real HTTP server standing in for the
Hub, and a real pty where a terminal matters.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint
from tests._store_util import FakeHub, dir_files
from tests.cli._run import ROOT, run_cli, run_process, tree_digest

PULL_7B_CHAT = "llamactl pull meta-llama/Llama-2-7b-chat-hf"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "llamactl-home"  # what the autouse fixture points LLAMACTL_HOME at


@pytest.fixture
def meta_dir(tmp_path: Path, tiny_tokenizer: Path) -> Path:
    """A Meta checkpoint whose params.json, as Meta ships it, says no context length."""
    args = tiny_args()
    return write_meta_checkpoint(tmp_path / "src" / "meta", args, random_meta_state(args), tokenizer=tiny_tokenizer)


def _one_error_line(out, *fragments: str, code: int = 1) -> str:  # type: ignore[no-untyped-def]
    assert out.exit_code == code, (out.exit_code, out.stderr)
    assert "Traceback" not in out.stderr and out.stdout == ""
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("llamactl: error: ")
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# ---------------------------------------------------------------------------- known names


def test_known_name_on_an_empty_store_names_the_pull_to_run() -> None:
    line = _one_error_line(run_process("chat", "7b-chat", "-p", "hi"), "7b-chat", PULL_7B_CHAT, "token")
    assert "`" + PULL_7B_CHAT + "`" in line  # exactly the command, not a paraphrase
    _one_error_line(run_cli("generate", "13b", "x"), "llamactl pull meta-llama/Llama-2-13b-hf`", "token")
    _one_error_line(run_cli("quantize", "70b-chat", "--bits", "4"), "meta-llama/Llama-2-70b-chat-hf")
    for command in (["info", "7b-chat"], ["show", "7b-chat"], ["convert", "7b-chat", "out", "--to", "hf"]):
        _one_error_line(run_cli(*command), PULL_7B_CHAT)  # never a prompt: these only read
    other = _one_error_line(run_cli("chat", "8b-chat", "-p", "hi"), "8b-chat", "no such model")
    assert "llamactl pull" not in other  # an unknown name gets no invented repository


@pytest.fixture
def hub(tmp_path: Path, meta_dir: Path) -> Iterator[FakeHub]:
    """A local Hub serving a tiny model as meta-llama/Llama-2-7b-chat-hf (no token needed)."""
    with FakeHub() as server:
        server.add_repo("meta-llama/Llama-2-7b-chat-hf", dir_files(meta_dir), lfs={"consolidated.00.pth"})
        yield server


def _hub_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""}
    return env


@pytest.mark.slow
def test_yes_pulls_a_known_name_without_asking_then_answers(hub: FakeHub, tmp_path: Path, home: Path) -> None:
    out = run_process("chat", "7b-chat", "-p", "hi", "-n", "3", "-t", "0", "--yes", env=_hub_env(hub, tmp_path))
    assert out.exit_code == 0, out.stderr
    assert "pulled meta-llama/Llama-2-7b-chat-hf@" in out.stderr and "pulled" not in out.stdout  # stdout: the answer
    assert (home / "models" / "7b-chat" / "consolidated.00.pth").is_file()


def _spawn(args: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    import pexpect

    full = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TERM="xterm") | env
    child = pexpect.spawn(sys.executable, ["-m", "llamactl", *args], env=full, encoding="utf-8", timeout=60)
    return child, pexpect


@pytest.mark.slow
def test_on_a_terminal_a_known_name_is_offered_for_pulling(hub: FakeHub, tmp_path: Path, home: Path) -> None:
    env = _hub_env(hub, tmp_path) | {"LLAMACTL_HOME": str(home)}
    child, pexpect = _spawn(["chat", "7b-chat", "-t", "0", "-n", "3"], env)
    child.expect_exact("Pull meta-llama/Llama-2-7b-chat-hf from the Hugging Face Hub?")
    child.sendline("n")
    child.expect_exact(PULL_7B_CHAT)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and not (home / "models" / "7b-chat").exists()

    child, pexpect = _spawn(["chat", "7b-chat", "-t", "0", "-n", "3"], env)
    child.expect_exact("Pull meta-llama/Llama-2-7b-chat-hf")
    child.sendline("y")
    child.expect_exact(">>> ")  # pulled, loaded: the REPL is up
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and (home / "models" / "7b-chat" / "params.json").is_file()


# ---------------------------------------------------------------------------- quantize into the store


def test_quantize_without_dst_writes_into_the_store(meta_dir: Path, home: Path) -> None:
    assert run_cli("import", str(meta_dir), "tiny").exit_code == 0
    out = run_process("quantize", "tiny", "--bits", "8", "--no-eval", "--json")
    assert out.exit_code == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["dst"] == str(home / "models" / "tiny-q8") and report["scheme"] == "q8"
    gen = run_cli("generate", "tiny-q8", "", "-n", "3", "-t", "0", "--json")
    assert gen.exit_code == 0, gen.stderr
    listed = {e["name"]: e for e in json.loads(run_cli("list", "--json").stdout)}
    assert listed["tiny-q8"]["quantization"] == "q8"
    again = run_cli("quantize", "tiny", "--bits", "8", "--no-eval")  # the entry exists: refused, untouched
    _one_error_line(again, "tiny-q8", "already exists")
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny", "tiny-q8"]  # no partial left


# ---------------------------------------------------------------------------- import


def test_import_copies_by_default_moves_or_links_on_request(meta_dir: Path, tmp_path: Path, home: Path) -> None:
    before = tree_digest(meta_dir)
    out = run_process("import", str(meta_dir), "copy", "--json")
    assert out.exit_code == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mode"] == "copy" and result["how"] in ("reflink", "hardlink", "copy", "hardlink+reflink")
    assert result["path"] == str(home / "models" / "copy") and result["source"] == str(meta_dir.resolve())
    assert tree_digest(meta_dir) == before == tree_digest(home / "models" / "copy")  # the source is intact
    removed = run_cli("rm", "copy", "--yes", "--json")
    assert json.loads(removed.stdout) == {
        "schema": 1,
        "name": "copy",
        "path": str(home / "models" / "copy"),
        "removed": True,
        "linked_to": None,
    }
    assert tree_digest(meta_dir) == before  # removing the copy leaves the source alone (hard links too)

    _one_error_line(run_cli("import", str(meta_dir), "x", "--move", "--link"), "--move", "--link", code=2)
    _one_error_line(run_cli("import", str(meta_dir / "params.json"), "x"), "params.json", "is a file", code=1)
    moved = run_cli("import", str(meta_dir), "moved", "--move")
    assert moved.exit_code == 0 and moved.stdout.startswith("moved ") and not meta_dir.exists()
    assert tree_digest(home / "models" / "moved") == before


# ---------------------------------------------------------------------------- trained context


def test_import_ctx_records_the_context_and_generation_past_it_warns_once(meta_dir: Path) -> None:
    out = run_cli("import", str(meta_dir), "tiny", "--ctx", "16", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["trained_context"] == 16
    info = json.loads(run_cli("info", "tiny", "--json").stdout)
    assert info["max_seq_len"] == info["trained_context"] == 16 and "16 (trained" in run_cli("info", "tiny").stdout
    assert json.loads(run_cli("info", str(meta_dir), "--json").stdout)["trained_context"] is None  # as Meta ships it
    assert "assumed" in run_cli("info", str(meta_dir)).stdout

    within = run_cli("generate", "tiny", "", "-t", "0", "--json")  # default context: the trained one
    assert within.exit_code == 0 and within.stderr == ""
    assert json.loads(within.stdout)["stop_reason"] in ("context", "eos")

    past = run_process("generate", "tiny", "", "-t", "0", "-n", "40", "--ctx", "64")
    assert past.exit_code == 0, past.stderr
    warnings = [line for line in past.stderr.splitlines() if "trained context" in line]
    assert len(warnings) == 1 and warnings[0].startswith("llamactl: warning: position 16 is past")
    assert "trained context of 16 tokens" in warnings[0]

    _one_error_line(run_cli("import", str(meta_dir), "t2", "--ctx", "16", "--link"), "--link", code=2)


@pytest.mark.slow
def test_trained_context_travels_from_llama2c_through_meta(stories_dir: Path, tmp_path: Path) -> None:
    env = {"LLAMACTL_LOAD_PLUGINS": "llama2c"}
    llama2c = stories_dir / "llama2c"
    info = run_process("info", str(llama2c), "--json", env=env)
    if info.exit_code != 0 and "llama2c" in info.stderr:
        pytest.skip("the llamactl-llama2c plugin is not installed")
    assert json.loads(info.stdout)["max_seq_len"] == 512  # the llama2.c header's seq_len
    out = run_process("convert", str(llama2c), str(tmp_path / "meta"), "--to", "meta", env=env)
    assert out.exit_code == 0, out.stderr
    assert json.loads((tmp_path / "meta" / ".llamactl-model.json").read_text()) == {"trained_context": 512}
    assert json.loads(run_process("info", str(tmp_path / "meta"), "--json").stdout)["max_seq_len"] == 512
    # HF and GGUF keep it in their own fields.
    for to, dst in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "s.gguf")):
        assert run_process("convert", str(tmp_path / "meta"), str(dst), "--to", to).exit_code == 0
        assert json.loads(run_process("info", str(dst), "--json").stdout)["max_seq_len"] == 512
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 512
    # The shipped Meta copy says nothing, and --ctx records it; an HF model that says 512 refuses another.
    assert run_cli("import", str(tmp_path / "hf"), "hf512", "--ctx", "1024").exit_code == 2


# ---------------------------------------------------------------------------- help


def _help(*command: str) -> str:
    out = run_cli(*command, "--help")
    assert out.exit_code == 0, out.stderr
    return out.stdout


def test_help_has_no_type_metavars_and_examples_on_every_command() -> None:
    from llamactl.cli import build_app

    root = _help()
    for panel in ("Model work", "Model store", "Tools"):
        assert panel in root
    for command in build_app().registered_commands:
        text = _help(command.name)
        assert not re.search(r"<(str|int|float|bool|path|list\[[a-z]+\])[^>]*>", text), (command.name, text)
        assert "{" not in text.split("\n", 3)[1], text  # usage line: SRC DST, not {src} {dst}
        assert "Examples:" in text, command.name
    assert "Usage: llamactl convert [OPTIONS] SRC DST" in _help("convert")
    assert "[DST]" in _help("quantize")


def test_every_help_example_parses_against_its_command() -> None:
    """Each example names real options with valid values (parsed by the command, not run)."""
    import typer.main

    from llamactl.cli import build_app
    from llamactl.cli._help import EXAMPLES

    group = typer.main.get_command(build_app())
    for name, lines in EXAMPLES.items():
        for line in lines:
            words = shlex.split(line.split("|")[-1].split("#")[0])
            assert words[:2] == ["llamactl", name], line
            group.commands[name].make_context(name, words[2:])  # raises on an unknown option or bad value


def test_temp_is_temperature() -> None:
    out = run_cli("chat", "nope-model", "--temp", "0.2", "-p", "hi")
    assert "No such option" not in out.stderr and "no such model" in out.stderr


# ---------------------------------------------------------------------------- exit codes


def test_exit_codes_usage_versus_plain_errors(tmp_path: Path) -> None:
    _one_error_line(run_process("bench", "--preset", "8b"), "unknown preset '8b'", code=2)
    (tmp_path / "notes.txt").write_text("hi")
    _one_error_line(run_cli("import", str(tmp_path / "notes.txt"), "x"), "notes.txt", code=1)


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(meta_dir: Path) -> None:
    """SIGINT once llamactl's own start-up has begun (typer imported: `-X importtime` says when),
    then at later points of importing, loading plugins and building the app."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    landed = 0
    # info's own start-up is short, and on a loaded host the pipe lets it run ahead of this reader:
    # generate (torch loads after typer) is the run whose start-up outlasts any lag.
    runs = [("info", delay) for delay in (0.0, 0.05, 0.2, 0.4)] + [("generate", 0.3)]
    for command, delay in runs:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "llamactl",
                command,
                str(meta_dir),
                *(["x", "-n", "1"] if command == "generate" else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            if re.search(r"\|\s+typer$", line.rstrip()):  # the first import inside llamactl.cli's guard is done
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # it had finished already: nothing to interrupt
        landed += 1
        said = [line for line in rest.splitlines() if not line.startswith("import time:")]
        assert proc.returncode == 130, (delay, proc.returncode, rest[-2000:])
        assert said == ["llamactl: interrupted"], (delay, said)
    assert landed, "every run finished before the interrupt arrived"


# ---------------------------------------------------------------------------- completions


def _complete(words: str) -> list[str]:
    env = {
        "_LLAMACTL_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    return run_process(env=env).stdout.split()


@pytest.mark.slow
def test_completion_of_model_names_and_option_values(meta_dir: Path) -> None:
    assert run_cli("import", str(meta_dir), "tiny-one").exit_code == 0
    names = _complete("llamactl chat ")
    assert names[0] == "tiny-one" and "7b-chat" in names  # the store first, then the known names
    assert _complete("llamactl rm ") == ["tiny-one"]  # rm: only what is there
    assert _complete("llamactl generate ti") == ["tiny-one"]
    assert set(_complete("llamactl bench --preset 7")) == {"7b", "7b-chat", "70b", "70b-chat"}
    assert "7b,13b" in _complete("llamactl bench --preset 7b,1")
    assert {"hf", "meta", "gguf"} <= set(_complete("llamactl convert a b --to ")) and "bnb" not in _complete(
        "llamactl convert a b --to "
    )
    assert _complete("llamactl chat x --dtype b") == ["bf16"]
    assert set(_complete("llamactl convert a b --dtype ")) == {"fp32", "fp16", "bf16"}
