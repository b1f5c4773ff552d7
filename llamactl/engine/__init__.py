"""Decode steps: one token per sequence through the model, chosen once when a model is loaded.

A step is bound to one model: `step(tokens[B,1], pos) -> logits[B,1,V]` runs the tokens at
position `pos` (writing their keys/values into the model's cache) and returns the next-token
logits, valid until the next call (a graphed step returns its output buffer). The generation
loop takes a step as an argument and never looks at how it runs.

- `EagerStep` (eager.py): the model called directly; works everywhere.
- `CudaGraphStep` (cuda_graph.py): the static-shape step captured once as a CUDA graph and
  replayed; CUDA only, plain (unquantized, fused) projections only.
- Tensor parallel (tp.py): not a step but a model, `ShardedTransformer`, one rank's shard whose
  forward mirrors itself to the other ranks; it decodes through the eager step.

`choose_step(model, kind)` picks one: "eager", "cuda-graph", or "auto" (the default), which
is eager unless `LLAMACTL_CUDA_GRAPHS=1` asks for graphs and the model can be graphed. The
variable is read there, once, never per token.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from llamactl.engine.cuda_graph import CudaGraphStep, graphable
from llamactl.engine.eager import EagerStep
from llamactl.errors import LlamactlError
from llamactl.model import Transformer

GRAPHS_ENV = "LLAMACTL_CUDA_GRAPHS"
STEP_KINDS = ("auto", "eager", "cuda-graph")


class DecodeStep(Protocol):
    """One decode step bound to `model` (and whatever cache it holds when called)."""

    model: Transformer

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [B,1,V] for tokens [B,1] (long, on the model's device) at position `pos`."""
        ...


def choose_step(model: Transformer, kind: str = "auto") -> DecodeStep:
    """The decode step for `model`; call once, after the model is on its device and fused."""
    if kind not in STEP_KINDS:
        raise LlamactlError(f"decode step {kind!r}: unknown; choose one of: {', '.join(STEP_KINDS)}")
    if kind == "auto":
        kind = "cuda-graph" if os.environ.get(GRAPHS_ENV) == "1" and graphable(model) is None else "eager"
    if kind == "eager":
        return EagerStep(model)
    why_not = graphable(model)
    if why_not is not None:
        raise LlamactlError(f"decode step 'cuda-graph': {why_not}")
    return CudaGraphStep(model)


__all__ = ["GRAPHS_ENV", "STEP_KINDS", "CudaGraphStep", "DecodeStep", "EagerStep", "choose_step"]
