"""One decode step as a CUDA graph.

Decoding one token at batch 1 launches a few hundred small kernels; on a GPU the launches,
not the memory traffic, set the speed. Capturing the step once and replaying it removes
that overhead (gpt-fast gets the same from torch.compile's "reduce-overhead"). The captured
call is the model's static form: the position lives in a device tensor and attention reads
the whole preallocated cache through a mask, so every replay has identical shapes and
pointers. Opt-in for now (`LLAMACTL_CUDA_GRAPHS=1`, read once by `choose_step`): on an H100
(7B bf16, tg128@4096) the graphed step matched the eager one for MHA (82.9 vs ~85 tok/s, with
far less variance) and was slower for GQA (68.9 vs ~84) before GQA decode stopped expanding
keys; the current form is checked for correctness on the CPU (tests/test_model.py) but not
yet timed on a GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llamactl.engine.eager import EagerStep
from llamactl.model import KVCache, Transformer

logger = logging.getLogger(__name__)


def graphable(model: Transformer) -> str | None:
    """Why `model` cannot be decoded through a CUDA graph, or None when it can."""
    from llamactl.engine.tp import ShardedTransformer

    if isinstance(model, ShardedTransformer):
        return "tensor-parallel models decode eagerly (collectives are not captured)"
    if model.tok_embeddings.weight.device.type != "cuda":
        return "needs a model on a CUDA device"
    plain = [model.output] + [m for layer in model.layers for m in (layer.attention.wo, layer.feed_forward.w2)]
    fused = all(layer.attention.fused and layer.feed_forward.fused for layer in model.layers)
    if not fused or any(type(m) is not nn.Linear for m in plain):
        return "needs plain, fused projections (quantized layers are not captured)"
    return None


class _Capture:
    """A graph of `model(tokens, pos, kv_len=cache_len)` for one cache; inputs are fixed buffers."""

    def __init__(self, model: Transformer, tokens: torch.Tensor, pos: int) -> None:
        self.cache: KVCache | None = model.layers[0].attention.cache
        self.tokens = tokens.clone()  # [B,1]
        self.pos = torch.tensor([pos], dtype=torch.long, device=tokens.device)  # [1]
        kv_len = model.cache_len
        # Warm-up and capture run the real step at the real position, so the keys/values they
        # write are exactly the ones the step itself writes: nothing in the cache is disturbed.
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                model(self.tokens, self.pos, kv_len=kv_len)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model(self.tokens, self.pos, kv_len=kv_len)  # [B,1,V], rewritten by each replay

    def fits(self, model: Transformer, tokens: torch.Tensor) -> bool:
        return self.cache is model.layers[0].attention.cache and self.tokens.shape == tokens.shape

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


class CudaGraphStep:
    """Replays a captured step; captures again when the model gets a new cache or batch size.

    The graph and its buffers belong to this object, not to the model. A capture the driver
    refuses is logged once, and the step then runs eagerly: slower, still correct.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self._eager = EagerStep(model)
        self._capture: _Capture | None = None
        self.failed = False

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if self.failed or self.model.cache_len == 0:
            return self._eager(tokens, pos)
        if self._capture is None or not self._capture.fits(self.model, tokens):
            self._capture = None  # free the old graph's memory before capturing a new one
            try:
                self._capture = _Capture(self.model, tokens, pos)
            except RuntimeError as exc:  # capture refused (driver, allocator): stay correct
                logger.warning("CUDA graph capture failed, decoding without it: %s", str(exc).splitlines()[0])
                self.failed = True
                return self._eager(tokens, pos)
        return self._capture(tokens, pos)

    @property
    def captured(self) -> bool:
        return self._capture is not None

    def __repr__(self) -> str:
        return f"CudaGraphStep(captured={self.captured}, failed={self.failed})"
