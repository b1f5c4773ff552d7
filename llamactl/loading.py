"""Build a ready-to-run Transformer from a checkpoint, streaming weights onto the device.

Every entry a reader yields lands on the device once: plain tensors are cast and assigned
into a model built on the meta device (no second copy in RAM), and quantized block
projections become their backend's module in place of the nn.Linear. Quantize-on-load is the
same path through a `QuantizedView`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llamactl.checkpoint import CheckpointReader, open_checkpoint
from llamactl.checkpoint.base import trained_context
from llamactl.checkpoint.quantized import QuantizedView
from llamactl.config import ModelArgs
from llamactl.devices import resolve
from llamactl.engine import DecodeStep, EagerStep, choose_step
from llamactl.errors import CheckpointError, LlamactlError
from llamactl.layout import is_quantizable, module_path, rotary_heads
from llamactl.model import Transformer
from llamactl.quantize import QuantizedTensor, QuantSpec, backend, fits, matches_skip
from llamactl.tokenizer import Tokenizer, open_tokenizer


@dataclass
class LoadedModel:
    """A model ready to run, where it came from, and the decode step chosen for it (`step`)."""

    model: Transformer
    args: ModelArgs
    reader: CheckpointReader
    device: torch.device
    dtype: torch.dtype
    step: DecodeStep | None = None
    trained_context: int | None = None  # what the checkpoint says it was trained at (None: unknown)

    def watch_context(self, on_pass: Callable[[int, int], None]) -> None:
        """Call `on_pass(position, trained_context)` once, when a position at or past the trained
        context is first run (a prompt in prefill or a decoded token); nothing when it is unknown
        or the context in use does not exceed it.

        Positions past it run on rotations the model never saw: output degrades, silently.
        """
        limit = self.trained_context
        if limit is None or self.args.max_seq_len <= limit:
            return
        fired = False

        def check(end: int) -> None:
            nonlocal fired
            if not fired and end > limit:
                fired = True
                on_pass(end - 1, limit)

        def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            tokens, start = args[0], args[1] if len(args) > 1 else 0
            if isinstance(start, int):  # a graphed step passes a device tensor: checked below instead
                check(start + tokens.shape[1])

        self.model.register_forward_pre_hook(pre_hook)
        if self.step is not None and not isinstance(self.step, EagerStep):
            self.step = _WatchedStep(self.step, check)


class _WatchedStep:
    """A decode step that reports each position it runs (a replayed CUDA graph runs no hooks)."""

    def __init__(self, inner: DecodeStep, check: Callable[[int], None]) -> None:
        self.inner, self.model, self.check = inner, inner.model, check

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.check(pos + tokens.shape[1])
        return self.inner(tokens, pos)


def build_model(
    reader: CheckpointReader,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: int | None = None,
) -> Transformer:
    """Construct on the meta device, then assign streamed tensors: no second copy in RAM.

    `dtype` is that of every unquantized tensor (embeddings, norms, head) and of activations.
    """
    args = dataclasses.replace(reader.args, max_seq_len=max_seq_len or reader.args.max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    state: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for name, entry in reader.iter_tensors():
        if isinstance(entry, QuantizedTensor):
            _install(model, name, backend(entry.spec).linear(entry, device), reader)
            replaced.add(module_path(name))
        else:
            state[name] = entry.to(device=device, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if module_path(m) not in replaced and not m.startswith(tuple(replaced))]
    if missing or unexpected:
        raise CheckpointError(f"{reader.path}: tensor {(missing or unexpected)[0]} is missing or unexpected")
    model.reset_rope(args.max_seq_len)
    return model.eval()


def _install(model: Transformer, name: str, module: torch.nn.Module, reader: CheckpointReader) -> None:
    if not is_quantizable(name):
        raise CheckpointError(f"{reader.path}: quantized tensor {name} is not a block projection")
    model.set_submodule(module_path(name), module)


def load_model(
    model: str | os.PathLike[str] | CheckpointReader,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    quant: QuantSpec | None = None,
    step: str = "auto",
) -> LoadedModel:
    """Open a checkpoint (name, path or an open reader) and load it for inference.

    `quant` quantizes the block projections on load, exactly as `llamactl quantize` would,
    without writing anything; weights are quantized from the checkpoint's own precision.
    `step` is the decode step chosen for the loaded model, once its weights are in place and
    fused (llamactl.engine.choose_step: "auto", "eager", "cuda-graph").
    """
    reader = open_checkpoint(model) if isinstance(model, (str, os.PathLike)) else model  # opened once
    placement = resolve(device, dtype if dtype is not None else native_dtype(quant or reader.quant))
    source = QuantizedView(reader, quant, device=placement.device) if quant is not None else reader
    net = build_model(source, placement.device, placement.dtype, max_seq_len).fuse_projections()
    loaded = LoadedModel(net, net.args, reader, placement.device, placement.dtype, choose_step(net, step))
    loaded.trained_context = trained_context(reader)
    return loaded


def native_dtype(quant: QuantSpec | None) -> str | None:
    """The model dtype a native (q8 / q4) scheme implies when none is asked for: its compute dtype.

    On a CPU the default is fp32, which would leave embeddings, norms and the output head (a
    fifth of a small model's bytes) in fp32 around bf16 kernels; the quantized path never
    computes in fp32 unless asked.
    """
    return quant.compute_dtype if quant is not None and quant.method == "native" else None


def quantize_model(
    model: Transformer, spec: QuantSpec, device: torch.device | str | None = None, skip: Sequence[str] = ()
) -> int:
    """Replace the block projections of a loaded Transformer by quantized modules, in place.

    For models that exist only in memory (bench's random weights); the bytes are those
    `llamactl quantize` would write for the same weights. Returns the number replaced.
    """
    model.unfuse_projections()  # fused weights would bypass the quantized layers
    dev = torch.device(device) if device is not None else model.tok_embeddings.weight.device
    impl = backend(spec)
    impl.prepare(dev)
    count = 0
    for name, param in list(model.named_parameters()):
        if not is_quantizable(name) or matches_skip(name, skip) or not fits(spec, tuple(param.shape)):
            continue
        heads = rotary_heads(name, model.args)
        model.set_submodule(module_path(name), impl.linear(impl.quantize(param.data, spec, heads, dev), dev))
        count += 1
    return count


def load_for_generation(
    model: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    ctx: int | None = None,
    quant: QuantSpec | None = None,
) -> tuple[LoadedModel, Tokenizer]:
    """Model and matching tokenizer; the checkpoint is opened once and the tokenizer is
    checked before any weight is read."""
    if ctx is not None and ctx < 2:
        raise LlamactlError(f"context of {ctx} tokens: it must hold at least 2 tokens")
    reader = open_checkpoint(model)
    tok = open_tokenizer(tokenizer, reader.tokenizer_path, reader.path, reader.args.vocab_size)
    return load_model(reader, device=device, dtype=dtype, max_seq_len=ctx, quant=quant), tok
