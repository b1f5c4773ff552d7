"""`llamactl serve` on the trained stories260K model, driven by the official `openai` client.

The references are independent of the server: `llamactl chat` / `llamactl generate` run in
this process (a single-process run of the same model), and prompt token counts spelled out
with sentencepiece itself in Meta's chat format.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import sentencepiece as spm

from tests._chat_util import STORIES, need
from tests.cli._run import run_cli
from tests.server._server import Server

pytestmark = pytest.mark.timeout(120)

CTX = "512"
NAME = "stories"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    need(STORIES)
    srv = Server(STORIES, "--ctx", CTX, "--name", NAME, "--json", home=tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server):  # -> openai.OpenAI
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(need(STORIES) / "tokenizer.model"))


def cli_chat(prompt: str, *args: str) -> str:
    out = run_cli("chat", str(STORIES), "-p", prompt, "--ctx", CTX, "--device", "cpu", *args)
    assert out.exit_code == 0, out.stderr
    assert out.stdout.endswith("\n")
    return out.stdout[:-1]


def ask(client, content: str, **kw):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kw)


def test_models_lists_the_served_model(client) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [NAME]
    assert client.models.retrieve(NAME).owned_by == "llamactl"


def test_greedy_chat_equals_llamactl_chat(client, sp) -> None:
    want = cli_chat("Tell me a story about a cat", "-t", "0", "-n", "40")
    got = ask(client, "Tell me a story about a cat", temperature=0, max_tokens=40)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason == "length"
    prompt = [1, *sp.encode("[INST] Tell me a story about a cat [/INST]")]  # Meta's format, spelled out
    assert got.usage.prompt_tokens == len(prompt)
    assert got.usage.completion_tokens == 40 and got.usage.total_tokens == len(prompt) + 40
    assert got.object == "chat.completion" and got.model == NAME and got.id.startswith("chatcmpl-")


def test_streamed_chat_equals_the_whole_answer(client) -> None:
    whole = ask(client, "Lily went to the park", temperature=0, max_tokens=30).choices[0].message.content
    chunks = list(
        ask(
            client,
            "Lily went to the park",
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_system_prompt_and_history_follow_meta_format(client, sp) -> None:
    messages = [
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": "Who is Tom?"},
        {"role": "assistant", "content": "Tom is a boy."},
        {"role": "user", "content": "What does he like?"},
    ]
    got = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=5)
    prompt = [
        1,
        *sp.encode("[INST] <<SYS>>\nYou tell stories.\n<</SYS>>\n\nWho is Tom? [/INST] Tom is a boy. "),
        2,
        1,
        *sp.encode("[INST] What does he like? [/INST]"),
    ]
    assert got.usage.prompt_tokens == len(prompt)


def test_stop_sequence_ends_the_answer_before_it(client) -> None:
    full = ask(client, "Once upon a time", temperature=0, max_tokens=60).choices[0].message.content
    words = full.split()
    stop = " " + words[len(words) // 2]  # a word from the middle, with its leading space
    cut = full[: full.index(stop)]
    got = ask(client, "Once upon a time", temperature=0, max_tokens=60, stop=[stop, "never-there"])
    assert got.choices[0].message.content == cut and got.choices[0].finish_reason == "stop"
    streamed = ask(client, "Once upon a time", temperature=0, max_tokens=60, stop=stop, stream=True)
    pieces = [c.choices[0] for c in streamed]
    assert "".join(p.delta.content or "" for p in pieces) == cut and pieces[-1].finish_reason == "stop"


def test_max_tokens_and_finish_reason_length(client) -> None:
    got = ask(client, "Hello", temperature=0, max_tokens=3)
    assert got.usage.completion_tokens == 3 and got.choices[0].finish_reason == "length"
    newer = ask(client, "Hello", temperature=0, max_completion_tokens=3)
    assert newer.choices[0].message.content == got.choices[0].message.content


def test_seed_reproduces_and_equals_llamactl_chat(client) -> None:
    kw = dict(temperature=1.0, top_p=0.9, max_tokens=25)
    a = ask(client, "A dog", seed=1234, **kw).choices[0].message.content
    b = ask(client, "A dog", seed=1234, **kw).choices[0].message.content
    others = {ask(client, "A dog", seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert a == b and others - {a}
    assert a == cli_chat("A dog", "-t", "1", "--top-p", "0.9", "--seed", "1234", "-n", "25")


def test_completions_equal_llamactl_generate(client) -> None:
    out = run_cli("generate", str(STORIES), "Once upon a time", "-t", "0", "-n", "30", "--ctx", CTX, "--device", "cpu")
    assert out.exit_code == 0, out.stderr
    got = client.completions.create(model=NAME, prompt="Once upon a time", temperature=0, max_tokens=30)
    assert got.choices[0].text == out.stdout[:-1] and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == 5  # [1, 403, 407, 261, 378] (../shared/fixtures/README.md)
    stream = client.completions.create(model=NAME, prompt="Once upon a time", temperature=0, max_tokens=30, stream=True)
    assert "".join(c.choices[0].text for c in stream) == got.choices[0].text


def test_next_turn_reuses_the_cache_and_answers_the_same(client, server: Server) -> None:
    first = ask(client, "Tom has a red ball", temperature=0, max_tokens=12)
    history = [
        {"role": "user", "content": "Tom has a red ball"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "What happened next?"},
    ]
    warm = client.chat.completions.create(model=NAME, messages=history, temperature=0, max_tokens=12)
    assert warm.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    record = server.log_record(warm.id)
    assert record["tokens_cached"] == warm.usage.prompt_tokens_details.cached_tokens
    ask(client, "Something else entirely", temperature=0, max_tokens=4)  # the cache now holds another prompt
    cold = client.chat.completions.create(model=NAME, messages=history, temperature=0, max_tokens=12)
    assert cold.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert cold.choices[0].message.content == warm.choices[0].message.content


def test_json_log_line_per_request(client, server: Server) -> None:
    got = ask(client, "Hi", temperature=0, max_tokens=6)
    record = server.log_record(got.id)
    assert record["status"] == 200 and record["tokens_out"] == 6 and record["tokens_in"] == got.usage.prompt_tokens
    assert record["finish_reason"] == "length" and record["path"] == "/v1/chat/completions"
    assert record["time_to_first_token_s"] > 0 and record["tokens_per_second"] > 0


def test_curl_style_raw_request(server: Server) -> None:
    import httpx

    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    resp = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_model_path_is_an_alias(client) -> None:
    got = client.chat.completions.create(
        model=str(Path(STORIES)), messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert got.model == NAME
