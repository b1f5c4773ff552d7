"""Decode steps: one token per sequence through the model, chosen once when a model is loaded.

A step is bound to one model: `step(tokens[B,1], pos) -> logits[B,1,V]` runs the tokens at
position `pos` (writing their keys/values into the model's cache) and returns the next-token
logits, valid until the next call (a graphed step returns its output buffer). The generation
loop takes a step as an argument and never looks at how it runs.

- `EagerStep` (eager.py): the model called directly; works everywhere. On the CPU its plain
  linear layers are first swapped for oneDNN-packed ones (packed.py: twice the GEMV bandwidth).
- `FusedCpuStep` (fused_cpu.py): on the CPU, the eager step that runs everything between the
  projections (norms, rotary, cache writes, attention, SiLU) in native kernels compiled once per
  machine (llamactl/cpu: decode.py, decode_kernels.cpp): 8 calls a layer instead of ~45 small operators.
  What "eager" gives on a CPU whenever the kernels build; `LLAMACTL_FUSED=0` opts out.
- `CudaGraphStep` (cuda_graph.py): the static-shape step captured once as a CUDA graph and
  replayed; CUDA only, plain (unquantized, fused) projections only.
- Tensor parallel (tp.py): not a step but a model, `ShardedTransformer`, one rank's shard whose
  forward mirrors itself to the other ranks; it decodes through the eager step.
- `CompiledStep` (compiled.py): the static-shape step through torch.compile (inductor), on
  the CPU; eager again after a failed compile (one warning).

`choose_step(model, kind)` picks one: "eager", "cuda-graph", "compiled", or "auto" (the
default): a CUDA graph when `LLAMACTL_CUDA_GRAPHS=1` asks for one and the model can be
graphed; on the CPU the compiled step for plain (fused, unquantized) models of the weight
dtypes `COMPILE_PAYS` lists (where compiling was measured to pay, start-up included:
benchmarks/decode_variants.py; none so far), unless `LLAMACTL_COMPILE=0`; else eager. The
variables are read there, once, never per token. On the commands `--compile` is kind
"compiled" and `--no-compile` kind "eager".
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from llamactl.cpu.decode import kernels
from llamactl.engine.compiled import CompiledStep, compilable
from llamactl.engine.cuda_graph import CudaGraphStep, graphable
from llamactl.engine.eager import EagerStep
from llamactl.engine.fused_cpu import FusedCpuStep, fusable
from llamactl.engine.packed import pack_linears
from llamactl.engine.tp import ShardedTransformer
from llamactl.errors import LlamactlError
from llamactl.model import Transformer

GRAPHS_ENV = "LLAMACTL_CUDA_GRAPHS"
FUSED_ENV = "LLAMACTL_FUSED"  # "0": the eager CPU step runs torch's operators only, never the native kernels
COMPILE_ENV = "LLAMACTL_COMPILE"  # "0": "auto" never compiles (the test suite sets it; --no-compile per command)
STEP_KINDS = ("auto", "eager", "cuda-graph", "compiled")
# Weight dtypes whose CPU decode "auto" compiles: where compiling was measured to pay, start-up
# included. None so far: on the 2-core test host (110M shape, bf16, warm inductor cache) the
# compiled step decoded at most ~1.3-1.5x faster (in noisy rounds, sometimes slower) but took
# 24-30 s to start against ~1 s, which a command generating fewer than ~1500 tokens never earns
# back. `--compile` asks for it (CHANGELOG, issue 10).
COMPILE_PAYS: tuple[torch.dtype, ...] = ()


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
        kind = _auto_kind(model)
    if kind == "eager":
        if model.tok_embeddings.weight.device.type == "cpu" and not isinstance(model, ShardedTransformer):
            pack_linears(model)  # twice GEMV's bandwidth; a rank's linears carry collective hooks: not swapped
        if os.environ.get(FUSED_ENV) != "0" and fusable(model) is None:
            native = kernels(model.tok_embeddings.weight.dtype)  # built on first use; None: it could not be
            if native is not None:
                return FusedCpuStep(model, native)
        return EagerStep(model)
    if kind == "compiled":
        why = compilable(model)
        if why is not None:
            raise LlamactlError(f"decode step 'compiled': {why}")
        return CompiledStep(model)
    why_not = graphable(model)
    if why_not is not None:
        raise LlamactlError(f"decode step 'cuda-graph': {why_not}")
    return CudaGraphStep(model)


def _auto_kind(model: Transformer) -> str:
    if os.environ.get(GRAPHS_ENV) == "1" and graphable(model) is None:
        return "cuda-graph"
    if os.environ.get(COMPILE_ENV) == "0" or compilable(model) is not None:
        return "eager"
    parts = [(layer.attention, "wqkv") for layer in model.layers] + [
        (layer.feed_forward, "w13") for layer in model.layers
    ]
    # Fused, and not by a quantized kernel (those carry a `scheme`; a packed linear's is None).
    plain = all(parent.fused and getattr(getattr(parent, name), "scheme", None) is None for parent, name in parts)
    # Measured for plain (fused, unquantized) projections only; quantized kernels stay eager.
    return "compiled" if plain and model.tok_embeddings.weight.dtype in COMPILE_PAYS else "eager"


__all__ = [
    "COMPILE_ENV",
    "COMPILE_PAYS",
    "FUSED_ENV",
    "GRAPHS_ENV",
    "STEP_KINDS",
    "CompiledStep",
    "CudaGraphStep",
    "DecodeStep",
    "EagerStep",
    "FusedCpuStep",
    "choose_step",
]
