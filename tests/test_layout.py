"""llamactl.layout: the parameter count of a shape against published sizes and the module itself."""

from __future__ import annotations

import dataclasses

import torch

from llamactl.config import ModelArgs, get_preset
from llamactl.layout import param_count
from llamactl.model import Transformer

TINY = ModelArgs(dim=64, n_layers=2, n_heads=8, vocab_size=320, multiple_of=32, max_seq_len=256)


def test_param_count_matches_published_sizes_and_the_module() -> None:
    assert param_count(get_preset("7b")) == 6_738_415_616  # Llama-2-7b-hf's parameter count
    assert param_count(get_preset("70b")) == 68_976_648_192  # Llama-2-70b-hf's
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(TINY, n_kv_heads=2))
    assert param_count(model.args) == sum(p.numel() for p in model.parameters())
