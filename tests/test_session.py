"""ChatSession: turns against transformers' generate, KV reuse across turns, cuts, context fitting."""

from __future__ import annotations

import pytest
import torch

from llamactl.generate import ContextOverflowError
from llamactl.sampling import SamplingParams
from llamactl.session import ChatSession
from llamactl.templates import Message
from llamactl.templates.llama2 import encode_dialog
from llamactl.tokenizer import SentencePieceTokenizer, Tokenizer
from tests._chat_util import hf_greedy, hf_twin, random_model, tiny_args, train_tiny_tokenizer

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return SentencePieceTokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module", params=[False, True], ids=["mha", "gqa"])
def pair(request: pytest.FixtureRequest):
    model = random_model(tiny_args(gqa=request.param), seed=3)
    return model, hf_twin(model)


class ForwardCounter:
    """Counts tokens the model is actually run on (the oracle for 'only the new turn is prefilled')."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda _m, args: self.calls.append(args[0].shape[1]))


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


class CountingTemplate:
    """The Llama 2 template, counting how often a turn encodes the dialog."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, tokenizer, dialog):
        self.calls += 1
        return encode_dialog(tokenizer, dialog)


def test_each_turn_encodes_the_dialog_once(tok: Tokenizer) -> None:
    template = CountingTemplate()
    model = random_model(tiny_args(), seed=2)
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0, max_new_tokens=5), template=template)
    for text in ("Hi", "Again", "And once more"):
        template.calls = 0
        "".join(session.ask(text))
        assert template.calls == 1 and session.last.dropped_exchanges == 0
    assert session.last.reused_tokens > 0


def test_the_session_decodes_through_its_step(pair, tok: Tokenizer) -> None:
    from llamactl.engine import EagerStep

    model, hf = pair
    positions: list[int] = []
    inner = EagerStep(model)

    def step(tokens, pos):
        positions.append(pos)
        return inner(tokens, pos)

    step.model = model  # type: ignore[attr-defined]
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0, max_new_tokens=8), step=step)
    answer = "".join(session.ask("Once upon a time"))
    prompt = encode_dialog(tok, [Message("user", "Once upon a time")])
    assert answer == tok.decode(hf_greedy(hf, prompt, 8))
    fed = session.last.new_tokens - (session.last.stop_reason == "length")
    assert positions == list(range(len(prompt), len(prompt) + fed))
