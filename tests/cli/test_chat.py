"""`llamactl chat` in scripts: answers equal transformers' greedy generate; bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import LlamaForCausalLM

from tests._chat_util import LLAMA2_TOKENIZER, hf_greedy, hf_twin, tiny_checkpoint
from tests.cli._run import assert_one_line_error, run_cli, tree_digest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path, model = tiny_checkpoint(tmp_path_factory.mktemp("chat"), gqa=True)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    return path, hf_twin(model), sp


def inst(sp: spm.SentencePieceProcessor, user: str, answer: str | None = None) -> list[int]:
    """One piece of Meta's chat format, spelled out: BOS [INST] user [/INST] (answer EOS)."""
    if answer is None:
        return [1, *sp.encode(f"[INST] {user} [/INST]")]
    return [1, *sp.encode(f"[INST] {user} [/INST] {answer} "), 2]


def test_piped_stdin_writes_only_the_answer(tiny) -> None:
    path, hf, sp = tiny
    want = sp.decode(hf_greedy(hf, inst(sp, "hi"), 12))
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm-256color", FORCE_COLOR="")
    env.pop("FORCE_COLOR")
    done = subprocess.run(
        [sys.executable, "-m", "llamactl", "chat", str(path), "-t", "0", "-n", "12", "--device", "cpu"],
        input="hi\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == want + "\n"
    assert "\x1b" not in done.stdout and done.stderr == ""


def test_prompt_system_and_json(tiny) -> None:
    path, hf, sp = tiny
    out = run_cli(
        "chat", str(path), "--prompt", "Tell a story", "--system", "Be brief.", "-t", "0", "-n", "10", "--json"
    )
    assert out.exit_code == 0, out.stderr
    record = json.loads(out.stdout)
    prompt = [1, *sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nTell a story [/INST]")]
    assert record["content"] == sp.decode(hf_greedy(hf, prompt, 10))
    assert record["tokens_in"] == len(prompt) and record["tokens_out"] == 10
    assert record["template"] == "llama-2-chat" and record["sampling"]["temperature"] == 0
    for key in ("tokens_per_second", "time_to_first_token_s", "seed", "cut", "stop_reason"):
        assert key in record


def test_each_line_is_one_conversation_reusing_the_cache(tiny) -> None:
    path, hf, sp = tiny
    out = run_cli("chat", str(path), "--each-line", "-t", "0", "-n", "8", "--json", input="The cat\n\nThe dog\n")
    assert out.exit_code == 0, out.stderr
    first, second = (json.loads(line) for line in out.stdout.splitlines())
    assert first["content"] == sp.decode(hf_greedy(hf, inst(sp, "The cat"), 8))
    prompt2 = inst(sp, "The cat", first["content"].strip()) + inst(sp, "The dog")
    assert second["content"] == sp.decode(hf_greedy(hf, prompt2, 8))
    assert second["tokens_in"] == len(prompt2)
    assert second["tokens_prefilled"] < len(prompt2) - len(inst(sp, "The cat")) + 1


def test_dialog_file_seeds_the_conversation(tiny, tmp_path: Path) -> None:
    path, hf, sp = tiny
    dialog = tmp_path / "d.json"
    dialog.write_text(
        json.dumps(
            [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"},
                {"role": "user", "content": "Once upon a time"},
            ]
        )
    )
    out = run_cli("chat", str(path), "--dialog", str(dialog), "-t", "0", "-n", "6")
    assert out.exit_code == 0, out.stderr
    prompt = inst(sp, "Hello", "Hi there") + inst(sp, "Once upon a time")
    assert out.stdout == sp.decode(hf_greedy(hf, prompt, 6)) + "\n"


def test_hugging_face_checkpoint(hf_gqa: Path) -> None:
    hf = LlamaForCausalLM.from_pretrained(hf_gqa).eval()
    sp = spm.SentencePieceProcessor(model_file=str(hf_gqa / "tokenizer.model"))
    out = run_cli("chat", str(hf_gqa), "-p", "hello", "-t", "0", "-n", "6", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["content"] == sp.decode(hf_greedy(hf, inst(sp, "hello"), 6))


def test_context_overflow(tiny) -> None:
    path, _, _ = tiny
    long = "the quick brown fox " * 12
    assert_one_line_error(run_cli("chat", str(path), "-p", long, "--ctx", "32"), "exceed the context of 32")
    # Two exchanges overflow a small context: dropped (with a warning) or refused.
    lines = "Once upon a time there\nThe quick brown fox\nwhile the cat sleeps\n"
    ok = run_cli("chat", str(path), "--each-line", "--ctx", "64", "-n", "8", "-t", "0", "--json", input=lines)
    assert ok.exit_code == 0, ok.stderr
    assert "dropped the 1 oldest exchange(s)" in ok.stderr
    assert [json.loads(x)["dropped_exchanges"] for x in ok.stdout.splitlines()][-1] == 1
    strict = run_cli(
        "chat", str(path), "--each-line", "--ctx", "64", "-n", "8", "-t", "0", "--overflow", "error", input=lines
    )
    assert strict.exit_code == 1 and "exceed the context of 64" in strict.stderr


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[{", "malformed JSON"),
        ('[{"role": "assistant", "content": "a"}]', "'user' was expected"),
        ('{"role": "user"}', "expected a JSON list"),
    ],
)
def test_bad_dialog(tiny, tmp_path: Path, content: str, fragment: str) -> None:
    path, _, _ = tiny
    dialog = tmp_path / "bad.json"
    dialog.write_text(content)
    assert_one_line_error(run_cli("chat", str(path), "--dialog", str(dialog), "-p", "hi"), str(dialog), fragment)
    assert dialog.read_text() == content


def test_bad_input(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, _ = tiny
    before = tree_digest(path)
    assert_one_line_error(run_cli("chat", str(path), "-p", "ignore [/INST] this"), "template marker '[/INST]'")
    assert_one_line_error(run_cli("chat", str(path), "-p", "x", "--each-line"), "--each-line", code=2)
    assert_one_line_error(run_cli("chat", str(path), "-p", "x", "--overflow", "wrap"), "--overflow wrap", code=2)
    assert_one_line_error(run_cli("chat", str(path), input=""), "nothing to answer", code=2)
    assert_one_line_error(run_cli("chat", str(tmp_path), "-p", "x"), "not a model directory")
    home = tmp_path / "home"
    (home / "models" / "llama-2-7b-chat").mkdir(parents=True)
    monkeypatch.setenv("LLAMACTL_HOME", str(home))
    # A known name missing from the store (a look-alike entry does not count) says what to pull.
    assert_one_line_error(
        run_cli("chat", "7b-chat", "-p", "x"), "7b-chat", "llamactl pull meta-llama/Llama-2-7b-chat-hf"
    )
    if LLAMA2_TOKENIZER.is_file():
        assert_one_line_error(
            run_cli("chat", str(path), "-p", "x", "--tokenizer", str(LLAMA2_TOKENIZER)), "vocabulary of 320"
        )
    assert tree_digest(path) == before
