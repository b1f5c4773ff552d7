"""What a loaded model holds in memory, counted one way for bench, tensor-parallel ranks and the loader."""

from __future__ import annotations

import itertools

from torch import nn

from llamactl.model import KVCache


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights as held, the KV cache left out.

    A module that holds its weight in its own form reports it: it has a `scheme` (None for a
    oneDNN-packed linear) and an `nbytes` (quantized kernels, bitsandbytes modules with their
    statistics), and its own parameters and buffers are not counted again. Every other
    parameter and buffer counts once (a head tied to the embedding table is one tensor); meta
    tensors hold nothing.
    """
    own = [m for m in model.modules() if hasattr(m, "scheme") and hasattr(m, "nbytes")]
    caches = [m for m in model.modules() if isinstance(m, KVCache)]
    skipped = {id(t) for m in own + caches for t in itertools.chain(m.parameters(), m.buffers())}
    held: dict[tuple[int, int], int] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in skipped and tensor.device.type != "meta":
            held[(tensor.data_ptr(), tensor.nbytes)] = tensor.nbytes
    return sum(held.values()) + sum(int(m.nbytes) for m in own)
