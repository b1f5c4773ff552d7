"""The tensor table: names in every format, split dims, quantizable and rotary rows, shapes."""

from __future__ import annotations

import pytest

from llamactl import layout
from llamactl.config import get_preset
from llamactl.layout import TensorInfo
from tests._ckpt import tiny_args


def test_every_meta_name_maps_to_hf_and_gguf_and_back() -> None:
    names = list(layout.expected_shapes(tiny_args()))
    hf = [layout.meta_to_hf(n) for n in names]
    gguf = [layout.meta_to_gguf(n) for n in names]
    assert None not in hf and len(set(hf)) == len(names)
    assert None not in gguf and len(set(gguf)) == len(names)
    assert [layout.hf_to_meta(h) for h in hf] == names
    assert [layout.gguf_to_meta(g) for g in gguf] == names
    assert layout.meta_to_hf("layers.0.attention.rope") is None and layout.hf_to_meta("model.foo") is None
    assert layout.gguf_to_meta("blk.0.attn_rot.weight") is None


def test_gguf_names_are_llama_cpps() -> None:
    # llama.cpp's tensor names for LLM_ARCH_LLAMA (gguf-py constants.py MODEL_TENSOR names).
    assert layout.meta_to_gguf("tok_embeddings.weight") == "token_embd.weight"
    assert layout.meta_to_gguf("layers.7.feed_forward.w2.weight") == "blk.7.ffn_down.weight"
    assert layout.meta_to_gguf("layers.7.attention_norm.weight") == "blk.7.attn_norm.weight"
    assert layout.meta_to_gguf("norm.weight") == "output_norm.weight"


def test_rotary_heads_uses_kv_heads_for_wk() -> None:
    args = get_preset("70b")
    assert layout.rotary_heads("layers.3.attention.wq.weight", args) == 64
    assert layout.rotary_heads("layers.3.attention.wk.weight", args) == 8
    assert layout.rotary_heads("layers.3.attention.wv.weight", args) is None


def test_quantizable_are_the_seven_block_projections() -> None:
    names = [n for n in layout.expected_shapes(tiny_args()) if layout.is_quantizable(n)]
    assert len(names) == 7 * tiny_args().n_layers
    assert not any(layout.is_quantizable(n) for n in ("tok_embeddings.weight", "output.weight", "norm.weight"))


@pytest.mark.parametrize(("preset", "params"), [("7b", 6_738_415_616), ("70b", 68_976_648_192)])
def test_param_count_is_the_published_one(preset: str, params: int) -> None:
    assert layout.param_count(get_preset(preset)) == params


def test_tensor_info_takes_any_dtype_spelling() -> None:
    import torch

    assert TensorInfo("x", (2, 3), torch.bfloat16).dtype == "bf16"
    assert TensorInfo("x", [2, 3], "float32").nbytes == 24
    assert TensorInfo("x", (2, 3), "uint8", scheme="nf4", stored_bytes=5).nbytes == 5


def test_param_count_equals_the_modules_parameters() -> None:
    import dataclasses

    import torch

    from llamactl.config import ModelArgs
    from llamactl.model import Transformer

    tiny = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, multiple_of=32, max_seq_len=256)
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(tiny))
    assert layout.param_count(model.args) == sum(p.numel() for p in model.parameters())
