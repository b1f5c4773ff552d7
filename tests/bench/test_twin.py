"""llamactl.bench.twin: transformers' LlamaForCausalLM really holds the same weights and decodes
one token per step from the filled cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamactl.bench.models import build_random_model
from llamactl.bench.twin import HFTwin
from tests.bench._util import CPU, TINY


def test_transformers_twin_holds_the_same_weights() -> None:
    args = dataclasses.replace(TINY, n_kv_heads=2)
    model = build_random_model(args, CPU, torch.float32, seed=3)
    twin = HFTwin(model, args, torch.float32, CPU)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(tokens, 0)
        theirs = twin.model(input_ids=tokens).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # The twin shares every unpermuted tensor instead of copying it.
    assert twin.model.lm_head.weight.data_ptr() == model.output.weight.data_ptr()


def test_transformers_generate_decodes_one_token_per_step_from_the_filled_cache() -> None:
    model = build_random_model(TINY, CPU, torch.float32)
    twin = HFTwin(model, TINY, torch.float32, CPU)
    seen: list[tuple[int, int]] = []
    twin.model.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append((kw["input_ids"].shape[1], int(kw["position_ids"][0, 0]))), with_kwargs=True
    )
    cache = twin.filled_cache(1, 40, torch.float32, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        twin.generate(torch.zeros(1, 41, dtype=torch.long), cache, 5)
    assert seen == [(1, pos) for pos in range(40, 45)]


def test_without_transformers_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from llamactl.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    model = build_random_model(TINY, CPU, torch.float32)
    with pytest.raises(MissingDependencyError, match=r"transformers is not installed \(pip install transformers\)"):
        HFTwin(model, TINY, torch.float32, CPU)
