"""--stop, --repeat-penalty, --min-p, --logprobs and the token ids in --json, through the real commands."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._chat_util import hf_twin, tiny_checkpoint
from tests.cli._run import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Once upon a time"


def _generate_json(model: Path, *args: str) -> dict:
    outcome = run_cli("generate", str(model), PROMPT, "-t", "0", "-n", "40", "--json", *args)
    assert outcome.exit_code == 0, outcome.stderr
    return json.loads(outcome.stdout)


def _spanning_stop(record: dict) -> tuple[str, int]:
    """A 4-character stop string made of the end of one token and the start of the next, and
    where it first begins in the content."""
    text = record["content"]
    pieces = [p["token"].replace("\u2581", " ") for p in record["logprobs"]]
    assert "".join(pieces) == text  # the tokens' pieces spell the content
    end = 0
    for left, right in itertools.pairwise(pieces):
        end += len(left)
        stop = text[end - 2 : end + 2]
        if len(left) >= 2 and len(right) >= 2 and text.find(stop) == end - 2 and end > 6:
            return stop, end - 2
    raise AssertionError(f"no token boundary to test in {text!r}")


def test_stop_string_across_tokens_is_never_printed(stories_dir: Path, tmp_path: Path) -> None:
    full = _generate_json(stories_dir, "--logprobs", "1")
    assert full["tokens"] == [p["id"] for p in full["logprobs"]] and len(full["tokens"]) == 40
    stop, at = _spanning_stop(full)
    # Streamed to a pipe by a real child process: exactly the text before the stop string.
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLAMACTL_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "llamactl", "generate", str(stories_dir), PROMPT, "-t", "0", "-n", "40", "--stop", stop],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == full["content"][:at] + "\n"
    assert stop not in done.stdout
    cut = _generate_json(stories_dir, "--stop", stop, "--stop", "never appears")
    assert cut["content"] == full["content"][:at] and cut["stop_reason"] == "stop"
    assert cut["tokens"] == full["tokens"][: len(cut["tokens"])] and len(cut["tokens"]) < 40
    assert cut["sampling"]["stop"] == [stop, "never appears"]


def test_chat_stop_string_ends_the_answer_and_the_dialog_goes_on(stories_dir: Path) -> None:
    args = ("chat", str(stories_dir), "-t", "0", "-n", "30", "--json")
    full = json.loads(run_cli(*args, "-p", "Tell me a story").stdout)
    words = full["content"].split()
    stop = words[len(words) // 2]
    at = full["content"].find(stop)
    outcome = run_cli(*args, "--stop", stop, "--each-line", input="Tell me a story\nAnd then?\n")
    assert outcome.exit_code == 0, outcome.stderr
    first, second = (json.loads(line) for line in outcome.stdout.splitlines())
    assert first["content"] == full["content"][:at] and first["stop_reason"] == "stop"
    assert stop not in second["content"] and second["tokens"]


def test_repeat_penalty_is_transformers_repetition_penalty(tmp_path: Path) -> None:
    path, model = tiny_checkpoint(tmp_path, seed=5)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    prompt = [1, *sp.encode(PROMPT)]
    hf = hf_twin(model)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            repetition_penalty=1.5,
            eos_token_id=2,
            pad_token_id=0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    theirs = out[0, len(prompt) :].tolist()
    # Prompt and answer stay inside the 64-token window, where llama.cpp's rule is transformers'.
    assert len(prompt) + 24 <= 64
    ours = run_cli("generate", str(path), PROMPT, "-t", "0", "-n", "24", "--repeat-penalty", "1.5", "--json")
    assert ours.exit_code == 0, ours.stderr
    record = json.loads(ours.stdout)
    assert record["tokens"] == theirs[: len(record["tokens"])] and record["sampling"]["repeat_penalty"] == 1.5
    plain = json.loads(run_cli("generate", str(path), PROMPT, "-t", "0", "-n", "24", "--json").stdout)
    assert plain["tokens"] != record["tokens"]  # the penalty changed the answer


def test_min_p_and_logprobs_in_json(stories_dir: Path) -> None:
    record = _generate_json(stories_dir, "--min-p", "0.2", "-t", "1.0", "--seed", "3", "--logprobs", "3")
    assert record["sampling"]["min_p"] == 0.2
    for step in record["logprobs"]:
        top = step["top_logprobs"]
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        # min-p 0.2 at temperature 1: a sampled token is at least 0.2 times as likely as the top one
        assert step["logprob"] >= top[0]["logprob"] + float(torch.log(torch.tensor(0.2))) - 1e-4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--repeat-penalty", "0"), "--repeat-penalty"),
        (("--min-p", "1.5"), "--min-p"),
        (("--logprobs", "50"), "--logprobs"),
    ],
)
def test_bad_sampling_options_are_usage_errors(stories_dir: Path, args: tuple[str, ...], fragment: str) -> None:
    outcome = run_cli("generate", str(stories_dir), "x", *args)
    assert outcome.exit_code == 2 and fragment in outcome.stderr and "Traceback" not in outcome.stderr


def test_empty_stop_string_is_one_error_line(stories_dir: Path) -> None:
    assert_one_line_error(run_cli("generate", str(stories_dir), "x", "--stop", ""), "--stop", code=2)


@pytest.mark.slow
def test_chat_json_interrupted_prints_the_cut_answer_then_exits_130(tmp_path: Path) -> None:
    """Ctrl-C (a real SIGINT to a real child) during the second answer: its object, marked cut."""
    import signal
    import time

    path, _ = tiny_checkpoint(tmp_path, max_seq_len=4096, seed=8)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLAMACTL_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    lines = tmp_path / "lines.txt"
    lines.write_text("Once upon a time\nThe cat sat\n")
    child = subprocess.Popen(
        [sys.executable, "-m", "llamactl", "chat", str(path), "--json", "--each-line", "-t", "0", "--ctx", "4096"],
        stdin=lines.open(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    first = json.loads(child.stdout.readline())  # a random model talks until the answer budget is spent
    assert first["cut"] is (first["stop_reason"] == "context") and first["tokens_out"] > 100
    time.sleep(min(0.5, first["seconds"] / 3))  # well into the second answer (as long as the first)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1] == "llamactl: interrupted" and "Traceback" not in err
    second = json.loads(out)
    assert second["cut"] is True and second["stop_reason"] == "interrupted"
    assert 0 < second["tokens_out"] == len(second["tokens"]) < first["tokens_out"], (first["seconds"], second)
