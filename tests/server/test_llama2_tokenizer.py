"""`llamactl serve` on a tiny random model with Meta's real Llama 2 tokenizer (32000 pieces).

Answers are compared with `llamactl chat` / `llamactl generate` run in this process, and
token counts with sentencepiece's own encoding of Meta's chat format.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import sentencepiece as spm

from tests._chat_util import LLAMA2_TOKENIZER, need, random_model, tiny_args, write_meta_checkpoint
from tests.cli._run import run_cli
from tests.server._server import Server

pytestmark = pytest.mark.timeout(120)

NAME = "tiny-llama2"
SYSTEM = "Answer briefly."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(LLAMA2_TOKENIZER)
    model = random_model(tiny_args(gqa=True, vocab_size=32000, max_seq_len=256), seed=5)
    return write_meta_checkpoint(tmp_path_factory.mktemp("llama2tok") / "model", model, LLAMA2_TOKENIZER)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(model_dir, "--name", NAME, "--device", "cpu", home=tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server):  # -> openai.OpenAI
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(need(LLAMA2_TOKENIZER)))


def test_greedy_chat_with_system_prompt_equals_llamactl_chat(client, model_dir: Path, sp) -> None:
    user = "Grüße aus Köln, 日本語 and a llama 🦙"
    out = run_cli("chat", str(model_dir), "-p", user, "-s", SYSTEM, "-t", "0", "-n", "24", "--device", "cpu")
    assert out.exit_code == 0, out.stderr
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    got = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24)
    assert got.choices[0].message.content == out.stdout[:-1] and got.usage.completion_tokens > 0
    prompt = [1, *sp.encode(f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{user} [/INST]")]
    assert sp.encode("[INST]") == [518, 25580, 29962]  # the fixture is Meta's tokenizer
    assert got.usage.prompt_tokens == len(prompt) and got.usage.completion_tokens == 24
    stream = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == got.choices[0].message.content


def test_completion_equals_llamactl_generate_and_token_prompts(client, model_dir: Path, sp) -> None:
    out = run_cli("generate", str(model_dir), "The llama", "-t", "0", "-n", "20", "--device", "cpu")
    assert out.exit_code == 0, out.stderr
    got = client.completions.create(model=NAME, prompt="The llama", temperature=0, max_tokens=20)
    assert got.choices[0].text == out.stdout[:-1] and got.usage.completion_tokens == 20
    ids = [1, *sp.encode("The llama")]
    assert got.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=20)
    assert by_ids.choices[0].text == got.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt=[1, 32000], max_tokens=2)
    assert "32000" in caught.value.message


def test_seeded_sampling_equals_llamactl_chat(client, model_dir: Path) -> None:
    out = run_cli("chat", str(model_dir), "-p", "hello", "-t", "0.8", "--top-p", "0.95", "--seed", "9", "-n", "16")
    assert out.exit_code == 0, out.stderr
    got = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hello"}], temperature=0.8, top_p=0.95, seed=9, max_tokens=16
    )
    assert got.choices[0].message.content == out.stdout[:-1] and got.usage.completion_tokens > 0


def test_plain_log_then_sigint_exits_130(server: Server) -> None:
    """Last in this module: stops the module's server."""
    assert server.wait_for(lambda line: line.startswith("llamactl: POST /v1/chat/completions 200 chatcmpl-"))
    assert server.stop(signal.SIGINT) == 130, server.stderr()
    assert server.lines[-2:] == [
        "llamactl: stopped serving; 0 request(s) in flight were cancelled",
        "llamactl: interrupted",
    ]
    assert "Traceback" not in server.stderr()
