"""weight_bytes: what a loaded model holds, as bench, tensor-parallel ranks and the loader report it."""

from __future__ import annotations

import torch

from llamactl.engine.memory import weight_bytes
from llamactl.engine.packed import pack_linears
from llamactl.loading import quantize_model
from llamactl.quantize import QuantSpec
from llamactl.quantize.native import NativeLinear
from tests._chat_util import random_model, tiny_args


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters())  # named once each, tied ones too


def test_plain_tied_cached_packed_and_quantized_models() -> None:
    model = random_model(tiny_args(), seed=0)
    plain = _param_bytes(model)
    assert weight_bytes(model) == plain
    model.setup_cache(1, 64)  # buffers of the KV cache are not weights
    assert weight_bytes(model) == plain
    model.output.weight = model.tok_embeddings.weight  # tied: one tensor, counted once
    assert weight_bytes(model) == plain - model.output.weight.nbytes
    packed = random_model(tiny_args(), seed=0).fuse_projections()
    assert pack_linears(packed) > 0  # packed linears report their own bytes, the same as before
    assert weight_bytes(packed) == plain
    quantized = random_model(tiny_args(), seed=0)
    quantize_model(quantized, QuantSpec("q8"))
    kernels = [m for m in quantized.modules() if isinstance(m, NativeLinear)]
    rest = sum(p.nbytes for p in quantized.parameters())  # embeddings, norms, what stayed float
    assert kernels and weight_bytes(quantized) == rest + sum(m.nbytes for m in kernels)
    assert weight_bytes(quantized) < plain
