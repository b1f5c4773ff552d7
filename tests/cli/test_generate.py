"""`llamactl generate` through the real app: llama2.c's golden text, transformers' greedy, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llamactl.tokenizer import load_tokenizer
from tests._chat_util import FIXTURES, LLAMA2_TOKENIZER, STORIES, hf_greedy, hf_twin, need, tiny_checkpoint
from tests.cli._run import assert_one_line_error, run_cli, tree_digest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path, model = tiny_checkpoint(tmp_path_factory.mktemp("gen"), gqa=True)
    return path, model


def test_stories260k_reproduces_llama2c_golden_output() -> None:
    need(STORIES / "consolidated.00.pth")
    golden = re.search(r"prints exactly:\n\n```\n(.*?)\n```", (FIXTURES / "README.md").read_text(), re.S).group(1)
    out = run_cli("generate", str(STORIES), "", "--temperature", "0", "--max-new-tokens", "200", "--device", "cpu")
    assert out.exit_code == 0, out.stderr
    assert out.stdout == golden + "\n"
    assert out.stderr == ""


def test_greedy_equals_transformers_and_continues_the_prompt(tiny) -> None:
    path, model = tiny
    tok = load_tokenizer(path / "tokenizer.model")
    prompt = "Once upon a time"
    ids = tok.encode(prompt, bos=True)
    want = tok.decode(ids + hf_greedy(hf_twin(model), ids, 30))[len(tok.decode(ids)) :]
    out = run_cli("generate", str(path), prompt, "-t", "0", "-n", "30", "--device", "cpu")
    assert out.exit_code == 0, out.stderr
    assert out.stdout == want + "\n"
    # The prompt may also come from stdin (one trailing newline ignored).
    piped = run_cli("generate", str(path), "-t", "0", "-n", "30", "--device", "cpu", input=prompt + "\n")
    assert piped.stdout == out.stdout


def test_json_and_seed_reproducibility(tiny) -> None:
    path, _ = tiny
    runs = [
        run_cli(
            "generate", str(path), "The cat", "-n", "16", "--seed", str(s), "--json", "--top-k", "50", "--device", "cpu"
        )
        for s in (5, 5, 6)
    ]
    records = [json.loads(r.stdout) for r in runs]
    assert all(r.exit_code == 0 for r in runs)
    assert records[0]["content"] == records[1]["content"] != records[2]["content"]
    first = records[0]
    assert first["seed"] == 5 and first["tokens_out"] == 16 and first["stop_reason"] == "length"
    assert first["sampling"] == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 50,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "repeat_last_n": 64,
        "stop": [],
        "max_new_tokens": 16,
    }
    assert first["tokens_in"] == len(load_tokenizer(path / "tokenizer.model").encode("The cat", bos=True))
    assert first["device"] == "cpu" and first["dtype"] == "float32"


def test_unknown_model_name_lists_the_models(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "models" / "tiny-chat").mkdir(parents=True)
    monkeypatch.setenv("LLAMACTL_HOME", str(home))
    assert_one_line_error(run_cli("generate", "nosuchmodel", "hi"), "nosuchmodel", "tiny-chat")


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run_cli("generate", str(tmp_path), "hi"), str(tmp_path), "not a model directory")


def test_tokenizer_contradicting_the_model(tiny) -> None:
    need(LLAMA2_TOKENIZER)
    path, _ = tiny
    before = tree_digest(path)
    out = run_cli("generate", str(path), "hi", "--tokenizer", str(LLAMA2_TOKENIZER))
    assert_one_line_error(out, "32000 pieces", "vocabulary of 320")
    assert tree_digest(path) == before


def test_missing_tokenizer(tiny, tmp_path: Path) -> None:
    path, _ = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("params.json", "consolidated.00.pth"):
        (bare / f).write_bytes((path / f).read_bytes())
    assert_one_line_error(run_cli("generate", str(bare), "hi"), "no tokenizer.model or tokenizer.json", "--tokenizer")


def test_prompt_longer_than_the_context(tiny) -> None:
    path, _ = tiny
    out = run_cli("generate", str(path), "the quick brown fox " * 10, "--ctx", "16")
    assert_one_line_error(out, "leave no room", "context of 16 tokens")


def test_bad_options(tiny) -> None:
    path, _ = tiny
    assert_one_line_error(run_cli("generate", str(path), "hi", "--dtype", "fp8"), "dtype 'fp8'", code=2)
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("generate", str(path), "hi", "--device", "cuda"), "no CUDA device", code=2)
    assert run_cli("generate", str(path), "hi", "--temperature", "-1").exit_code == 2


def test_generate_bits_quantizes_on_load(stories_dir: Path, tmp_path: Path) -> None:
    """--bits 8 runs q8 (GGUF Q8_0 blocks) on the real model (greedy stays on the golden story); nothing is written."""
    before = sorted(p.name for p in tmp_path.iterdir())
    outcome = run_cli("generate", str(stories_dir), "", "-t", "0", "-n", "30", "--bits", "8", "--device", "cpu")
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout.startswith("Once upon a time, there was a little girl named Lily.")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    bad = run_cli("generate", str(stories_dir), "", "--bits", "3")
    assert bad.exit_code == 2 and "choose one of: 8, 4" in bad.stderr
