"""Build a ready-to-run Transformer from a checkpoint, streaming weights onto the device."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from llamactl.checkpoint import CheckpointReader, open_checkpoint
from llamactl.config import ModelArgs
from llamactl.devices import resolve
from llamactl.engine import DecodeStep, choose_step
from llamactl.errors import LlamactlError, UsageError
from llamactl.model import Transformer
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


def build_model(
    reader: CheckpointReader,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: int | None = None,
) -> Transformer:
    """Construct on the meta device, then assign streamed tensors: no second copy in RAM."""
    if reader.quantization is not None:
        from llamactl.quantize import build_quantized_model

        return build_quantized_model(reader, device, dtype, max_seq_len)
    args = dataclasses.replace(reader.args, max_seq_len=max_seq_len or reader.args.max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in reader.iter_tensors()}
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope(args.max_seq_len)
    return model.eval()


def load_model(
    model: str | os.PathLike[str] | CheckpointReader,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    bits: int | None = None,
    step: str = "auto",
) -> LoadedModel:
    """Open a checkpoint by name or path (or take an open reader) and load it for inference.

    `bits` (8 or 4) quantizes the block projections on load with bitsandbytes, exactly as
    `llamactl quantize` would, without writing anything. Weights are quantized from the
    checkpoint's own precision (before any cast to `dtype`). `step` is the decode step to
    choose for the loaded model, once its weights are in place and fused
    (llamactl.engine.choose_step: "auto", "eager", "cuda-graph").
    """
    reader = open_checkpoint(model) if isinstance(model, (str, os.PathLike)) else model  # opened once
    placement = resolve(device, dtype)
    dev, dt = placement.device, placement.dtype
    if bits is None or reader.quantization is not None:
        if bits is not None:
            raise UsageError(
                f"{reader.path}: already quantized ({reader.quantization.get('quant_method')}); drop --bits"
            )
        net = build_model(reader, dev, dt, max_seq_len).fuse_projections()
        return LoadedModel(net, net.args, reader, dev, dt, choose_step(net, step))
    from llamactl.quantize import QuantSpec, quantize_model

    spec = QuantSpec(bits=bits).validate()
    net = build_model(reader, torch.device("cpu"), _source_dtype(reader), max_seq_len)
    quantize_model(net, spec, dev)  # quantized layers land on dev; the rest is moved below
    _move_unquantized(net, dev, dt)
    return LoadedModel(net, net.args, reader, dev, dt, choose_step(net, step))


def _move_unquantized(model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
    """Cast embeddings, norms and head; bitsandbytes' parameters must not see a dtype cast."""
    from llamactl.quantize import QuantizedLinear

    quantized = {id(m) for q in model.modules() if isinstance(q, QuantizedLinear) for m in q.modules()}
    for module in model.modules():
        if id(module) in quantized:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(
                module, name, torch.nn.Parameter(param.detach().to(device=device, dtype=dtype), requires_grad=False)
            )
    model.reset_rope(model.args.max_seq_len)


def _source_dtype(reader: CheckpointReader) -> torch.dtype:
    """The checkpoint's floating dtype (most tensors), used to quantize from full precision."""
    dtypes = [info.dtype for info in reader.tensor_infos()]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def load_for_generation(
    model: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    ctx: int | None = None,
    bits: int | None = None,
) -> tuple[LoadedModel, Tokenizer]:
    """Model and matching tokenizer; the checkpoint is opened once and the tokenizer is
    checked before any weight is read."""
    if ctx is not None and ctx < 2:
        raise LlamactlError(f"context of {ctx} tokens: it must hold at least 2 tokens")
    reader = open_checkpoint(model)
    tok = open_tokenizer(tokenizer, reader.tokenizer_path, reader.path, reader.args.vocab_size)
    return load_model(reader, device=device, dtype=dtype, max_seq_len=ctx, bits=bits), tok
