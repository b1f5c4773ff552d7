"""One decode step as a CUDA graph.

Decoding one token at batch 1 launches a few hundred small kernels; on a GPU the launches,
not the memory traffic, set the speed. Capturing the step once and replaying it removes
that overhead (gpt-fast gets the same from torch.compile's "reduce-overhead"). The step
uses the model's static form (position as a device tensor, attention over the whole
preallocated cache with a mask), so every replay has identical shapes and pointers.
Opt-in for now with `LLAMACTL_CUDA_GRAPHS=1`: on an H100 (7B bf16, tg128@4096) the graphed
step matched the eager one for MHA (82.9 vs ~85 tok/s, with far less variance) and was slower
for GQA (68.9 vs ~84) before GQA decode stopped expanding keys; the current form is checked for
correctness on the CPU (tests/test_model.py) but not yet timed on a GPU.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from llamactl.model import Transformer

logger = logging.getLogger(__name__)


class GraphedStep:
    """Replays `model(tokens[B,1], pos)` for one cache; inputs are copied into fixed buffers."""

    def __init__(self, model: Transformer, tokens: torch.Tensor, pos: int) -> None:
        self.cache = model.layers[0].attention.cache
        self.tokens = tokens.clone()
        self.pos = torch.tensor([pos], dtype=torch.long, device=tokens.device)
        # Warm-up and capture run the real step at the real position, so the keys/values they
        # write are exactly the ones the step itself writes: nothing in the cache is disturbed.
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                model(self.tokens, self.pos)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model(self.tokens, self.pos)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


def graphs_enabled(model: Transformer) -> bool:
    """Asked for (LLAMACTL_CUDA_GRAPHS=1), CUDA, a cache, and plain (fused, unquantized) projections."""
    if os.environ.get("LLAMACTL_CUDA_GRAPHS") != "1" or getattr(model, "_graphs_failed", False):
        return False
    if not len(model.layers):
        return False
    attention = model.layers[0].attention
    return (
        model.tok_embeddings.weight.device.type == "cuda"
        and attention.cache is not None
        and attention.wqkv is not None
        and all(type(m) is nn.Linear for m in (attention.wo, model.output))
    )


def decode_step(model: Transformer, tokens: torch.Tensor, pos: int) -> torch.Tensor:
    """Logits [B,1,V] for tokens [B,1] at position pos, through a CUDA graph when possible.

    The returned tensor is the graph's output buffer: use it before the next step.
    """
    if not graphs_enabled(model):
        return model(tokens, pos)
    step: GraphedStep | None = getattr(model, "_graphed_step", None)
    cache = model.layers[0].attention.cache
    if step is None or step.cache is not cache or step.tokens.shape != tokens.shape:
        try:
            step = GraphedStep(model, tokens, pos)
        except RuntimeError as exc:  # capture refused (driver, allocator): stay correct, run eagerly
            logger.warning("CUDA graph capture failed, decoding without it: %s", str(exc).splitlines()[0])
            model._graphs_failed = True  # type: ignore[attr-defined]
            return model(tokens, pos)
        model._graphed_step = step  # type: ignore[attr-defined]
    return step(tokens, pos)
