"""Prefill and decoding against transformers' generate; the decode step is an argument."""

from __future__ import annotations

import re

import pytest
import torch

from llamactl.engine import EagerStep
from llamactl.generate import ContextOverflowError, Generation, decode_one, generate, prefill
from llamactl.sampling import SamplingParams
from llamactl.tokenizer import SentencePieceTokenizer, Tokenizer
from tests._chat_util import FIXTURES, STORIES, hf_greedy, hf_twin, need, random_model, tiny_args, train_tiny_tokenizer

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return SentencePieceTokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module", params=[False, True], ids=["mha", "gqa"])
def pair(request: pytest.FixtureRequest):
    model = random_model(tiny_args(gqa=request.param), seed=3)
    return model, hf_twin(model)


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


# ------------------------------------------------------------------ a real trained model


def golden_text() -> str:
    readme = (FIXTURES / "README.md").read_text()
    return re.search(r"prints exactly:\n\n```\n(.*?)\n```", readme, re.S).group(1)


def test_stories260k_greedy_reproduces_llama2c() -> None:
    need(STORIES / "consolidated.00.pth")
    from llamactl.loading import load_model

    loaded = load_model(STORIES, device="cpu")
    tok = SentencePieceTokenizer(STORIES / "tokenizer.model")
    # llama2.c: 200 forward passes from BOS, i.e. 200 new tokens.
    ids = list(generate(loaded.model, [tok.bos_id], sampling=GREEDY, stop_ids=[tok.eos_id], max_new_tokens=200))
    assert len(ids) == 200
    assert tok.decode(ids) == golden_text()


def test_golden_text_is_parsed() -> None:
    need(FIXTURES / "README.md")
    assert golden_text().startswith("Once upon a time") and golden_text().endswith("so she")


class CountingStep:
    """A decode step that counts its calls around the eager one."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.inner, self.positions = model, EagerStep(model), []

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.positions.append(pos)
        return self.inner(tokens, pos)


def test_decoding_goes_through_the_step_it_is_given(pair, tok: Tokenizer) -> None:
    model, hf = pair
    prompt = tok.encode("Once upon a time there was", bos=True)
    step = CountingStep(model)
    model.setup_cache(1)
    run = Generation(model, prompt, sampling=GREEDY, stop_ids=[tok.eos_id], max_new_tokens=24, step=step)
    ours = list(run)
    assert ours == hf_greedy(hf, prompt, 24)
    fed = len(ours) - (run.stop_reason == "length")  # the last token is fed back only to find EOS
    assert step.positions == list(range(len(prompt), len(prompt) + fed))


def test_decode_one_is_the_step_at_one_position(pair, tok: Tokenizer) -> None:
    model, hf = pair
    ids = tok.encode("The quick brown fox", bos=True)
    model.setup_cache(1)
    prefill(model, ids[:-1], 0)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(decode_one(EagerStep(model), ids[-1], len(ids) - 1), theirs, rtol=1e-4, atol=1e-4)
