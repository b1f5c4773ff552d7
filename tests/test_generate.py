"""Generation and chat against transformers' generate."""

from __future__ import annotations

import re

import pytest
import torch

from llamactl.chat import Message, encode_dialog
from llamactl.generate import ChatSession, ContextOverflowError, Generation, generate, prefill
from llamactl.sampling import SamplingParams
from llamactl.tokenizer import Tokenizer
from tests._chat_util import (
    FIXTURES,
    STORIES,
    hf_greedy,
    hf_twin,
    random_model,
    tiny_args,
    train_tiny_tokenizer,
)

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module", params=[False, True], ids=["mha", "gqa"])
def pair(request: pytest.FixtureRequest):
    model = random_model(tiny_args(gqa=request.param), seed=3)
    return model, hf_twin(model)


class ForwardCounter:
    """Counts tokens the model is actually run on (the oracle for 'only the new turn is prefilled')."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda _m, args: self.calls.append(args[0].shape[1]))


# ------------------------------------------------------------------ generation vs transformers


def test_greedy_generate_equals_transformers(pair, tok: Tokenizer) -> None:
    model, hf = pair
    prompt = tok.encode("Once upon a time there was", bos=True)
    ours = list(generate(model, prompt, sampling=GREEDY, stop_ids=[tok.eos_id], max_new_tokens=48))
    assert ours == hf_greedy(hf, prompt, 48)
    assert len(ours) > 10


def test_chunked_prefill_equals_transformers_logits(pair, tok: Tokenizer) -> None:
    model, hf = pair
    ids = tok.encode("The quick brown fox jumps over the lazy dog", bos=True)
    model.setup_cache(1)
    ours = prefill(model, ids, 0, chunk=4)  # several chunks, each attending to the cache
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible(pair, tok: Tokenizer) -> None:
    model, _ = pair
    prompt = tok.encode("The quick brown fox", bos=True)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=40)
    a = list(generate(model, prompt, sampling=params, seed=7, max_new_tokens=24))
    b = list(generate(model, prompt, sampling=params, seed=7, max_new_tokens=24))
    c = list(generate(model, prompt, sampling=params, seed=8, max_new_tokens=24))
    assert a == b and a != c


def test_stops_at_stop_id_and_at_context_end(tok: Tokenizer) -> None:
    model = random_model(tiny_args(max_seq_len=32), seed=5)
    prompt = tok.encode("Hello there", bos=True)
    model.setup_cache(1)
    first = next(iter(Generation(model, prompt, sampling=GREEDY, max_new_tokens=1)))
    run = Generation(model, prompt, sampling=GREEDY, stop_ids=[first])
    assert list(run) == [] and run.stop_reason == "eos"
    run = Generation(model, prompt, sampling=GREEDY)
    out = list(run)
    assert run.stop_reason == "context" and len(prompt) + len(out) == 33  # last token never needs a slot
    with pytest.raises(ContextOverflowError):
        Generation(model, list(range(3, 40)), sampling=GREEDY)


def test_chat_second_turn_reuses_cache_and_equals_transformers(pair, tok: Tokenizer) -> None:
    model, hf = pair
    session = ChatSession(
        model, tok, sampling=SamplingParams(temperature=0, max_new_tokens=12), system="Tell a short story."
    )
    counter = ForwardCounter(model)
    answer1 = "".join(session.ask("Once upon a time"))
    prompt1 = encode_dialog(tok, [Message("system", "Tell a short story."), Message("user", "Once upon a time")])
    assert tok.encode(answer1) != [] and session.messages[-1] == Message("assistant", answer1)
    assert counter.calls[0] == len(prompt1)  # turn 1: the whole prompt, once
    assert tok.decode(hf_greedy(hf, prompt1, 12)) == answer1

    counter.calls.clear()
    answer2 = "".join(session.ask("The cat sleeps"))
    prompt2 = encode_dialog(tok, session.dialog()[:-1])
    assert answer2 == tok.decode(hf_greedy(hf, prompt2, 12))
    prefilled = counter.calls[0]
    assert prefilled == session.last.prefilled_tokens
    # Only the new part runs: at most the re-encoded first answer plus the new user turn.
    assert prefilled <= len(prompt2) - len(prompt1)
    assert prefilled + session.last.reused_tokens == len(prompt2)
    assert all(n == 1 for n in counter.calls[1:])  # then one token per step
    counter.handle.remove()


def test_interrupted_answer_is_kept_cut_and_cache_stays_consistent(pair, tok: Tokenizer) -> None:
    model, hf = pair
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0, max_new_tokens=20))
    stream = session.ask("The weather was cold")
    for _ in range(3):
        next(stream)
    stream.close()  # what the REPL does on Ctrl-C
    cut = session.messages[-1]
    assert cut.role == "assistant" and cut.cut and cut.content
    # A KeyboardInterrupt raised inside the model's forward is handled the same way.
    calls = {"n": 0}

    def boom(_module, _args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        "".join(session.ask("Tell me more"))
    handle.remove()
    assert session.messages[-1].cut
    answer = "".join(session.ask("And then?"))
    prompt = encode_dialog(tok, session.dialog()[:-1])
    assert answer == tok.decode(hf_greedy(hf, prompt, 20))


def test_interrupt_before_the_first_token_forgets_the_message(tok: Tokenizer) -> None:
    model = random_model(tiny_args(), seed=2)
    session = ChatSession(model, tok, sampling=GREEDY)

    def boom(_module, _args):
        raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        next(session.ask("Hello"))
    handle.remove()
    assert session.messages == [] and session.cached == []


def test_undo_retry_reset(tok: Tokenizer) -> None:
    model = random_model(tiny_args(), seed=2)
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0, max_new_tokens=5))
    first = "".join(session.ask("Hi"))
    "".join(session.ask("Again"))
    assert session.undo() and [m.role for m in session.messages] == ["user", "assistant"]
    assert "".join(session.retry()) == first and len(session.messages) == 2
    session.reset()
    assert session.messages == [] and not session.undo()


def test_context_overflow_drops_oldest_keeps_system(tok: Tokenizer) -> None:
    model = random_model(tiny_args(max_seq_len=128), seed=4)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    session = ChatSession(model, tok, sampling=params, system="Be kind.")
    texts = ["The quick brown fox jumps", "over the lazy dog", "while the cat sleeps", "in the sun today"]
    dropped = 0
    for text in texts * 2:
        "".join(session.ask(text))
        dropped += session.last.dropped_exchanges
        assert session.last.prompt_tokens + 8 <= 128
    assert dropped > 0
    assert session.dialog()[0] == Message("system", "Be kind.")
    assert session.messages[-2].content == "in the sun today"

    strict = ChatSession(model, tok, sampling=params, system="Be kind.", overflow="error")
    before = None
    with pytest.raises(ContextOverflowError, match="exceed the context of 128"):
        for text in texts * 2:
            before = list(strict.messages)
            "".join(strict.ask(text))
    assert strict.messages == before  # the refused turn left the dialog as it was


def test_prompt_longer_than_context_is_an_error(tok: Tokenizer) -> None:
    model = random_model(tiny_args(max_seq_len=64), seed=4)
    session = ChatSession(model, tok, sampling=GREEDY)
    with pytest.raises(ContextOverflowError, match="even with all earlier exchanges dropped"):
        session.ask("the quick brown fox " * 20)
    assert session.messages == []


# ------------------------------------------------------------------ a real trained model


def golden_text() -> str:
    readme = (FIXTURES / "README.md").read_text()
    return re.search(r"prints exactly:\n\n```\n(.*?)\n```", readme, re.S).group(1)


def test_stories260k_greedy_reproduces_llama2c() -> None:
    if not (STORIES / "consolidated.00.pth").is_file():
        pytest.skip("../shared/fixtures/stories260K is absent")
    from llamactl.loading import load_model

    loaded = load_model(STORIES, device="cpu")
    tok = Tokenizer(STORIES / "tokenizer.model")
    # llama2.c: 200 forward passes from BOS, i.e. 200 new tokens.
    ids = list(generate(loaded.model, [tok.bos_id], sampling=GREEDY, stop_ids=[tok.eos_id], max_new_tokens=200))
    assert len(ids) == 200
    assert tok.decode(ids) == golden_text()


def test_golden_text_is_parsed() -> None:
    if not (FIXTURES / "README.md").is_file():
        pytest.skip("fixtures absent")
    assert golden_text().startswith("Once upon a time") and golden_text().endswith("so she")
