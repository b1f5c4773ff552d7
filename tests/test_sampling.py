"""Sampling against transformers' logits warpers; seeded draws; parameter checks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from llamactl.sampling import SamplingParams, greedy, make_generator, sample, sampling_probs, top_k_filter

GREEDY = SamplingParams(temperature=0)


def _hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return torch.softmax(warpers(None, logits[None].clone())[0], dim=-1)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.6, 0, 0.9), (0.8, 20, 1.0), (1.3, 50, 0.7), (0.3, 0, 0.5)]
)
def test_sampling_distribution_matches_transformers(temperature: float, top_k: int, top_p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(300, generator=gen) * 3
        ours = sampling_probs(logits, temperature, top_p, top_k)
        theirs = _hf_probs(logits, temperature, top_k, top_p)
        assert torch.equal(ours > 0, theirs > 0)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_greedy_is_argmax_and_first_on_ties() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 3.0])
    assert greedy(logits) == 1
    assert sample(logits, GREEDY, None) == 1


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    kept = torch.isfinite(top_k_filter(logits, 7))
    assert kept.sum() == 7 and set(kept.nonzero().flatten().tolist()) == set(logits.topk(7).indices.tolist())


def test_seeded_draws_follow_the_distribution_and_repeat() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    params = SamplingParams(temperature=1.0, top_p=1.0)
    gen_a, _ = make_generator(42)
    draws = [sample(logits, params, gen_a) for _ in range(4000)]
    gen_b, _ = make_generator(42)
    assert draws[:200] == [sample(logits, params, gen_b) for _ in range(200)]
    freq = Counter(draws)
    for token, p in enumerate([0.5, 0.25, 0.15, 0.1]):
        assert abs(freq[token] / 4000 - p) < 0.03  # ~4 standard deviations
    # top_p 0.6 keeps only the first two tokens (mass before token 2 is 0.75 > 0.6)
    nucleus = SamplingParams(temperature=1.0, top_p=0.6)
    assert {sample(logits, nucleus, gen_a) for _ in range(300)} == {0, 1}


def test_sampling_params_validation() -> None:
    from llamactl.errors import LlamactlError

    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(max_new_tokens=0)):
        with pytest.raises(LlamactlError):
            SamplingParams(**bad).validate()


# ----------------------------------------------------------------------------- penalty, min-p, stop strings


@pytest.mark.parametrize("penalty", [1.1, 1.3, 0.8])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from llamactl.sampling import repetition_penalty

    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        logits = torch.randn(300, generator=gen) * 3
        previous = torch.randint(0, 300, (40,), generator=gen).tolist()  # with repeats
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([previous]), logits[None].clone())[0]
        torch.testing.assert_close(repetition_penalty(logits, previous, penalty), theirs, rtol=0, atol=0)


def test_sample_penalises_only_the_last_repeat_last_n_tokens() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([5.0, 4.9, -1.0, 0.0])
    params = SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=2)
    assert sample(logits, params, None, previous=[0, 3, 3]) == 0  # token 0 is outside the window
    assert sample(logits, params, None, previous=[3, 0]) == 1  # 5.0 / 1.5 < 4.9
    theirs = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[3, 0]]), logits[None].clone())[0]
    assert int(theirs.argmax()) == 1


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"), [(1.0, 0, 1.0, 0.05), (0.7, 0, 0.9, 0.1), (1.2, 40, 0.95, 0.2)]
)
def test_min_p_matches_transformers(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    warpers.append(MinPLogitsWarper(min_p))
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        logits = torch.randn(300, generator=gen) * 3
        ours = sampling_probs(logits, temperature, top_p, top_k, min_p)
        theirs = torch.softmax(warpers(None, logits[None].clone())[0], dim=-1)
        assert torch.equal(ours > 0, theirs > 0)
        assert (ours > 0).sum() < 300
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_top_logprobs_are_the_models_log_softmax() -> None:
    from llamactl.sampling import top_logprobs

    logits = torch.randn(50, generator=torch.Generator().manual_seed(5))
    lp, top = top_logprobs(logits, 7, 3)
    ref = torch.log_softmax(logits.double(), -1)
    assert abs(lp - float(ref[7])) < 1e-5
    assert [i for i, _ in top] == ref.topk(3).indices.tolist()
    assert all(abs(v - float(ref[i])) < 1e-5 for i, v in top)


def _stream(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    from llamactl.sampling import StopMatcher

    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            break
    else:
        out.append(matcher.flush())
    return out, matcher.stopped


def test_stop_matcher_holds_back_a_possible_stop_string_across_pieces() -> None:
    out, stopped = _stream(["User:"], ["Hello", " Us", "e", "r: hi"])
    assert stopped and "".join(out) == "Hello " and out[1] == " "  # "Us" held back until it is decided
    out, stopped = _stream(["User:"], ["Hello", " Us", "ed to"])  # a false start is released
    assert not stopped and "".join(out) == "Hello Used to"
    out, stopped = _stream(["###", "\n\n"], ["a\n", "b#", "##c"])  # the first stop string to appear wins
    assert stopped and "".join(out) == "a\nb"
    out, stopped = _stream(["END"], ["xEN"])  # text ends mid-candidate: flushed at the end
    assert not stopped and "".join(out) == "xEN"
