"""CPU linear layers on oneDNN's prepacked weights: the same product at twice the bandwidth.

torch's `F.linear` on a CPU runs a GEMV from the weight as stored; oneDNN's linear on a weight
reordered once into its blocked layout (`mkldnn._reorder_linear_weight`) reads it about twice
as fast. 4096x768 weights, 2 threads, one token: bf16 131 -> 62 us, fp32 168 -> 79 us (prefill
of 256 tokens: fp32 9.5 -> 3.7 ms, bf16 2.1 -> 1.8 ms), results equal (fp32 bit for bit).
`pack_linears` swaps every plain nn.Linear of a CPU model for a `PackedLinear` holding only the
packed weight (no second copy). The eager CPU step uses it (`engine.choose_step`); a CPU whose
oneDNN cannot pack the dtype (fp16 without AVX512-FP16 / AVX-NE-CONVERT) keeps nn.Linear.
Where the native matvec is built for the dtype (llamactl/cpu: bf16 with AVX512-BF16, fp32 with
AVX512F), or for bf16 on a CPU with AMX, weights stay plain instead and a one-row product runs
through that matvec or as W @ x (`GemvLinear`: one sequential stream per thread reads the
weights up to twice as fast as oneDNN's packed GEMV; with AMX oneDNN would give one row a whole
AMX tile).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamactl.cpu import matvec

logger = logging.getLogger(__name__)

PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PackedLinear(nn.Module):
    """x [..., in] -> x @ W.T [..., out] through oneDNN, W held in its packed layout.

    `weight` (and state_dict) give the plain [out, in] tensor back, unpacked on demand.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.nbytes = linear.weight.nbytes  # what a step reads (the packed layout holds the same)
        self.scheme = None  # engine.memory.weight_bytes counts modules that carry their own bytes

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, packed (oneDNN)"


def can_pack(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs and runs `dtype` weights (tried once on a tiny one)."""
    if dtype not in _WORKS:
        try:
            probe = nn.Linear(32, 16, bias=False, dtype=dtype)
            PackedLinear(probe)(torch.ones(2, 32, dtype=dtype))
            _WORKS[dtype] = dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available()
        except (RuntimeError, AttributeError) as exc:
            logger.info("oneDNN cannot pack %s weights here (%s)", dtype, str(exc).splitlines()[0][:120])
            _WORKS[dtype] = False
    return _WORKS[dtype]


_WORKS: dict[torch.dtype, bool] = {}


def pack_linears(model: nn.Module) -> int:
    """Swap the plain, bias-free CPU nn.Linear layers of `model` for PackedLinear; returns how many.

    A head tied to the embedding table stays as it is: packing it would hold the table twice
    (a GemvLinear holds the same tensor).
    """
    embedding = getattr(model, "tok_embeddings", None)
    tied = embedding.weight.data_ptr() if isinstance(embedding, nn.Embedding) else None
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and module.bias is None
        and module.weight.device.type == "cpu"
        and (module.weight.data_ptr() != tied or one_row_as_gemv(module.weight.dtype))  # GemvLinear: no copy
        and can_pack(module.weight.dtype)
    ]
    for name, module in chosen:
        model.set_submodule(name, GemvLinear(module) if one_row_as_gemv(module.weight.dtype) else PackedLinear(module))
    return len(chosen)


class GemvLinear(nn.Module):
    """x [..., in] -> x @ W.T with the plain weight; one row runs through the native bf16 / fp32
    matvec where this machine builds it (`cpu.matvec.matvec_dense`), else as W @ x (`torch.mv`).

    On a CPU with AMX, oneDNN runs a one-row bf16 product (`F.linear`, packed or not) on AMX
    tiles with the row as the tiles' M dimension: 16 rows of which 15 are padding. `torch.mv`
    makes the weight's rows M instead, every tile full. Intel Xeon with AMX, 2 threads, bf16,
    medians of 7 interleaved rounds: 2304x768 144 us against 172 packed, 768x2048 121 against
    138, the 32000x768 head 3.2 against 3.6 ms; 110M decode 24.3 against 30.8 ms/token. Longer
    inputs run `F.linear` (a 256-token prefill through it is 3-35% slower than packed; the
    decode is what every token pays). The native matvec (vdpbf16ps, one row after another, on
    torch's threads) accumulates in fp32 as torch does. AMD EPYC without AMX, 2 threads: the
    110M model's projections and head 2.6 ms a token against 5.2 packed (interleaved), decode
    126 against 83 tok/s; a 256-token prefill through plain F.linear 0-10% slower than packed.
    fp32 there: decode 77 against 48 tok/s, prefill through F.linear (MKL) up to 1.5x slower per
    weight than packed oneDNN (the head), about even on the layers' weights.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = w = linear.weight
        # the native kernel where built; engine.fused_cpu also calls it into buffers of its own
        native = w.is_contiguous() and matvec.dense_available(w.dtype)
        self.matvec = matvec.BoundDenseMatvec(w) if native else None

    @property
    def native(self) -> bool:
        """Whether one row runs through the native matvec (else `torch.mv`)."""
        return self.matvec is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:
            if self.native and x.dtype == self.weight.dtype:
                return matvec.matvec_dense(self.weight, x.reshape(1, -1)).view(*x.shape[:-1], self.out_features)
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, one row as W @ x ({'native' if self.native else 'torch.mv'})"


def one_row_as_gemv(dtype: torch.dtype) -> bool:
    """Whether one-row products of `dtype` weights run faster as W @ x here (GemvLinear): bf16 or
    fp32 where the native matvec for it is built (AVX512-BF16 / AVX512F), bf16 on a CPU with AMX."""
    return matvec.dense_available(dtype) or (dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported())
