"""Build a ready-to-run Transformer from a checkpoint, streaming weights onto the device."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from llamactl.checkpoint import CheckpointReader, open_checkpoint
from llamactl.config import ModelArgs
from llamactl.errors import UsageError
from llamactl.model import Transformer


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    reader: CheckpointReader
    device: torch.device
    dtype: torch.dtype


def pick_device(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when available, else CPU + fp32; explicit choices are checked."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {str(device)!r}; use cpu or cuda")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return dev, dtype


def build_model(
    reader: CheckpointReader,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: int | None = None,
) -> Transformer:
    """Construct on the meta device, then assign streamed tensors: no second copy in RAM."""
    args = dataclasses.replace(reader.args, max_seq_len=max_seq_len or reader.args.max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in reader.iter_tensors()}
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope(args.max_seq_len)
    return model.eval()


def load_model(
    model: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
) -> LoadedModel:
    """Open a checkpoint by name or path and load it for inference."""
    reader = open_checkpoint(model)
    dev, dt = pick_device(device, dtype)
    net = build_model(reader, dev, dt, max_seq_len)
    return LoadedModel(net, net.args, reader, dev, dt)
