"""The chat REPL: commands driven in-process, then a whole transcript in a real pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from rich.console import Console

from llamactl.cli.repl import ModelInfo, Repl
from llamactl.sampling import SamplingParams
from llamactl.session import ChatSession
from llamactl.tokenizer import SentencePieceTokenizer, Tokenizer
from tests._chat_util import hf_greedy, hf_twin, random_model, tiny_args, tiny_checkpoint, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return SentencePieceTokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def scripted(tok: Tokenizer, lines: list[str], **kw) -> tuple[Repl, io.StringIO]:
    model = random_model(tiny_args(), seed=1)
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0, max_new_tokens=6), **kw)
    feed = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    info = ModelInfo("tiny", "/x/tiny", "meta", "2 layers", 256, "cpu", "float32")
    return Repl(session, info, Console(file=out, width=300, force_terminal=False), read=read), out


def test_commands_change_the_session(tok: Tokenizer, tmp_path: Path) -> None:
    saved = tmp_path / "d.json"
    repl, out = scripted(
        tok,
        [
            "/system Be kind.",
            "Hello there",
            "The cat",
            "/undo",
            "/set temperature 0.7",
            "/set top_k 5",
            "/set seed 9",
            "/set max_new_tokens 4",
            f"/save {saved}",
            "/bogus",
            "/set top_p 7",
            "/tokens",
            "/stats",
            "/show",
            "/help",
            "/exit",
            "never read",
        ],
    )
    assert repl.run() == 0
    s = repl.session
    assert s.system == "Be kind." and [m.role for m in s.messages] == ["user", "assistant"]
    assert (s.sampling.temperature, s.sampling.top_k, s.sampling.max_new_tokens, s.seed_used) == (0.7, 5, 4, 9)
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data] == ["system", "user", "assistant"] and data[1]["content"] == "Hello there"
    text = out.getvalue()
    assert "unknown command /bogus" in text and "top_p must be in (0, 1]" in text
    assert str(s.token_ids()) in text  # /tokens prints the exact ids
    assert "llama-2-chat" in text and "/retry" in text
    assert "never read" not in text


def test_load_retry_reset_and_multiline(tok: Tokenizer, tmp_path: Path) -> None:
    dialog = tmp_path / "in.json"
    dialog.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]))
    repl, _out = scripted(
        tok, [f"/load {dialog}", "/retry", '"""', "first line", "", 'second line"""', '"""one-liner"""', "//slash text"]
    )
    repl.run()
    s = repl.session
    assert s.system == "S"
    users = [m.content for m in s.messages if m.role == "user"]
    assert users == ["Hi", "first line\n\nsecond line", "one-liner", "/slash text"]
    assert len(s.messages) == 8
    repl2, _ = scripted(tok, ["Hello", "/reset"])
    repl2.run()
    assert repl2.session.messages == []


def test_overflow_is_reported(tok: Tokenizer) -> None:
    repl, out = scripted(tok, ["The quick brown fox jumps", "over the lazy dog", "while the cat sleeps"], context=48)
    repl.run()
    assert "dropped the 1 oldest exchange(s)" in out.getvalue()
    repl, out = scripted(tok, ["the quick brown fox " * 20], context=48)
    repl.run()
    assert "error:" in out.getvalue() and repl.session.messages == []


# ----------------------------------------------------------------------------- real pty


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return tiny_checkpoint(tmp_path_factory.mktemp("repl"), gqa=False, max_seq_len=2048, seed=21)


def spawn(path: Path, home: Path, *args: str):
    import pexpect

    env = dict(os.environ, PYTHONPATH=str(ROOT), LLAMACTL_HOME=str(home), TERM="xterm", COLUMNS="200")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamactl", "chat", str(path), *args],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(50, 200),
    )
    return child, pexpect


@pytest.mark.slow
def test_transcript_in_a_pty(tiny, tmp_path: Path) -> None:
    path, model = tiny
    home = tmp_path / "home"
    saved = tmp_path / "saved.json"
    child, pexpect = spawn(path, home, "-t", "0", "-n", "12")
    child.expect("llamactl chat")
    child.expect("context 2048 tokens")
    child.expect_exact(">>> ")
    child.sendline("/help")
    child.expect_exact("/system TEXT")
    child.expect_exact(">>> ")
    child.sendline("Once upon a time")
    child.expect(r"12 tokens .*context \d+/2048")
    child.expect_exact(">>> ")
    child.sendline("/set max_new_tokens none")  # now the random model talks until the context is full
    child.expect_exact(">>> ")
    child.sendline("The cat")
    child.expect_exact("The cat\r\n")  # the echo of the input line
    child.expect_exact("\x1b[2K")  # the spinner is cleared at the first token...
    child.expect(r"[A-Za-z0-9]")  # ...and answer text is streaming
    child.sendintr()  # Ctrl-C mid-answer
    child.expect_exact("[answer cut]")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect("context +\\d+ used")
    child.expect_exact(">>> ")
    child.sendline("/set max_new_tokens 3")
    child.expect_exact(">>> ")
    child.send("pasted line one\npasted line two\n")  # a paste: both lines arrive at once
    child.expect(r"3 tokens")
    child.expect_exact(">>> ")
    child.sendline(f"/save {saved}")
    child.expect_exact("saved 6 messages")
    child.expect_exact(">>> ")
    child.sendintr()  # Ctrl-C at an empty prompt
    child.expect_exact("use /exit or Ctrl-D to quit")
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data] == ["user", "assistant"] * 3
    assert data[4]["content"] == "pasted line one\npasted line two"
    assert data[3].get("cut") is True and "cut" not in data[1]
    # The first answer is transformers' greedy answer for the same prompt.
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert data[1]["content"] == sp.decode(
        hf_greedy(hf_twin(model), [1, *sp.encode("[INST] Once upon a time [/INST]")], 12)
    )
    history = (home / "chat_history").read_text()
    assert "Once upon a time" in history and "/stats" in history

    # History survives into the next session: Up arrow recalls the last entry.
    child, pexpect = spawn(path, home, "-t", "0", "-n", "3")
    child.expect_exact(">>> ")
    child.send("\x1b[A")  # Up
    child.expect_exact(f"/save {saved}")
    child.send("\x15")  # Ctrl-U clears the line
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def row(key: str, value: str) -> str:
    """A /show row as a regex (the key is bold on a terminal)."""
    return key + r" *(?:\x1b\[0m)? +" + value


@pytest.mark.slow
def test_aliases_settings_and_numbers_that_agree_in_a_pty(tiny, tmp_path: Path) -> None:
    path, _ = tiny
    saved = tmp_path / "d.json"
    child, pexpect = spawn(path, tmp_path / "home", "-t", "0", "-n", "8")
    child.expect_exact(">>> ")
    child.sendline("/?")  # = /help
    child.expect_exact("/system TEXT")
    child.expect_exact(">>> ")
    child.sendline("/set system Be brief.")
    child.expect_exact("system prompt set: Be brief.")
    child.sendline("/set verbose")
    child.expect_exact("timings after every answer")
    child.sendline("Hello there")
    child.expect(r"8 tokens .*context (\d+)/2048")
    status_used = int(child.match.group(1))
    child.expect(r"prompt eval count: +\d+ token\(s\)")
    child.expect(r"eval rate: +[\d.]+ tokens/s")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"context +(\d+) used")
    assert int(child.match.group(1)) == status_used  # the status line and /stats: one number
    child.expect_exact(">>> ")
    for line, note in [
        ("/set min_p 0.1", "min_p = 0.1"),
        ("/set repeat-penalty 1.1", "repeat_penalty = 1.1"),
        ("/set stop ###", "stop = ['###']"),
        ("/set quiet", "short summary after every answer"),
    ]:
        child.sendline(line)
        child.expect_exact(note)
        child.expect_exact(">>> ")
    child.sendline("/show parameters")
    child.expect(row("min_p", r"0\.1"))
    child.expect(row("repeat_penalty", r"1\.1"))
    child.expect(row("stop", "'###'"))
    child.expect_exact(">>> ")
    child.sendline("/show template")
    child.expect_exact("llama-2-chat")
    child.expect_exact(">>> ")
    child.sendline("/show info")
    child.expect(row("format", "meta"))
    child.expect_exact(">>> ")
    child.sendline(f"/save {saved}")
    child.expect(r"saved (\d+) messages")
    saved_count = int(child.match.group(1))
    child.sendline("/clear")  # = /reset
    child.expect_exact("new conversation")
    child.sendline(f"/load {saved}")
    child.expect(r"loaded (\d+) messages")
    assert int(child.match.group(1)) == saved_count == len(json.loads(saved.read_text())) == 3
    child.sendline("/stat")
    child.expect_exact("unknown command /stat; did you mean /stats?")
    child.sendline("/shwo")
    child.expect_exact("did you mean /show?")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
