"""GGML tensor types: block sizes (torch-free) and vectorized torch dequantizers.

A GGUF tensor of a quantized type is stored row by row ([out, in] rows of `in` elements),
each row cut into blocks of `block` elements packed into `size` bytes; the layouts are
ggml's `block_q4_0` ... `block_q6_K` (ggml-common.h). `dequantize` turns a [rows, row_bytes]
uint8 tensor (a view of the memory-mapped file) into [rows, in] float32, all blocks at once.

The arithmetic follows ggml's reference `dequantize_row_*` in the same order (e.g. Q6_K's
(d * scale) * q), so results are bit-identical to llama.cpp's and to `gguf.quants`; the
tests check that on real blocks. The table here is the one place llamactl spells ggml type
ids and sizes; a test checks it against `gguf.constants.GGML_QUANT_SIZES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamactl.dtypes import to_torch

if TYPE_CHECKING:
    import torch

QK_K = 256  # elements of a K-quant super-block


@dataclass(frozen=True)
class GGMLType:
    """One ggml element type: `block` elements stored in `size` bytes; `dtype` for plain floats."""

    name: str
    id: int
    block: int
    size: int
    dtype: str | None = None  # llamactl dtype short name of an unquantized type

    @property
    def quantized(self) -> bool:
        return self.dtype is None

    def nbytes(self, numel: int) -> int:
        return numel // self.block * self.size


# fmt: off
GGML_TYPES: tuple[GGMLType, ...] = (
    GGMLType("F32", 0, 1, 4, "fp32"),
    GGMLType("F16", 1, 1, 2, "fp16"),
    GGMLType("BF16", 30, 1, 2, "bf16"),
    GGMLType("F64", 28, 1, 8, "fp64"),
    GGMLType("Q4_0", 2, 32, 18),
    GGMLType("Q4_1", 3, 32, 20),
    GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24),
    GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q2_K", 10, QK_K, 84),
    GGMLType("Q3_K", 11, QK_K, 110),
    GGMLType("Q4_K", 12, QK_K, 144),
    GGMLType("Q5_K", 13, QK_K, 176),
    GGMLType("Q6_K", 14, QK_K, 210),
)
# Types llamactl knows by name but cannot dequantize (named in the error a file gets).
UNSUPPORTED_NAMES: dict[int, str] = {
    9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 29: "IQ1_M",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# fmt: on
BY_ID: dict[int, GGMLType] = {t.id: t for t in GGML_TYPES}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES}


def type_name(type_id: int) -> str:
    """'Q4_K' for a known id, '99 (unknown)' otherwise (for messages)."""
    known = BY_ID.get(type_id)
    if known is not None:
        return known.name
    return UNSUPPORTED_NAMES.get(type_id, f"{type_id} (unknown)")


# ----------------------------------------------------------------------------- dequantizing
# Each function takes blocks [n, size] uint8 and returns [n, block] float32.


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, as float32 [n, 1]."""
    import torch

    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32]: the 16 low nibbles, then the 16 high ones (Q4_0 / Q4_1 / Q5_x order)."""
    import torch

    out = torch.empty((qs.shape[0], 32), dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=out[:, :16])
    torch.bitwise_right_shift(qs, 4, out=out[:, 16:])
    return out


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1: bit j of the little-endian uint32 qh [n, 4] is the 5th bit of element j -> [n, 32]."""
    import torch

    bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [n, 4 bytes, 8 bits]
    return bits.reshape(-1, 32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # d f16, qs int8[32]
    import torch

    return b[:, 2:34].contiguous().view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # d f16, qs[16]; x = nibble - 8
    return _nibbles(b[:, 2:18]).float().sub_(8).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # d f16, m f16, qs[16]; x = d * nibble + m
    return _nibbles(b[:, 4:20]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # d f16, qh u32, qs[16]; x = (nibble | bit << 4) - 16
    q = _nibbles(b[:, 6:22]) | (_high_bits32(b[:, 2:6]) << 4)
    return q.float().sub_(16).mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # d f16, m f16, qh u32, qs[16]
    q = _nibbles(b[:, 8:24]) | (_high_bits32(b[:, 4:8]) << 4)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _shifts(*values: int) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=torch.uint8)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    """scales[16] (low nibble scale, high nibble min), qs[64], d f16, dmin f16.

    Output element h*128 + j*32 + s*16 + l (half h, 2-bit plane j, sub-block s) is bits 2j..2j+1
    of qs[h*32 + s*16 + l], scaled by sub-block h*8 + j*2 + s.
    """
    n = b.shape[0]
    scales = b[:, 0:16]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = (b[:, 16:80].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3  # [n, h, j, 32]
    return q.reshape(n, 16, 16).float().mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 16 6-bit scales from 12 bytes: low nibbles of bytes 0..7 then their high nibbles,
    topped by 2-bit pairs of bytes 8..11 (scale 4i+k takes bits 2i..2i+1 of byte 8+k)."""
    import torch

    low = torch.cat((s[:, 0:8] & 0x0F, s[:, 0:8] >> 4), dim=-1)  # [n, 16]
    high = ((s[:, 8:12].unsqueeze(1) >> _shifts(0, 2, 4, 6).reshape(1, 4, 1)) & 3).reshape(-1, 16)
    return (low | (high << 4)).float() - 32


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    """hmask[32], qs[64], scales[12], d f16. x = 2-bit value - (4 unless the hmask bit is set).

    As Q2_K, element h*128 + j*32 + s*16 + l reads qs[h*32 + s*16 + l] >> 2j; its high bit is
    bit h*4 + j of hmask[s*16 + l].
    """
    n = b.shape[0]
    dl = (_f16(b, 108) * _q3_k_scales(b[:, 96:108])).reshape(n, 16, 1)
    low = (b[:, 32:96].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3  # [n, h, j, 32]
    bit = (b[:, 0:32].reshape(n, 1, 32) >> _shifts(*range(8)).reshape(1, 8, 1)) & 1  # [n, h*4 + j, 32]
    q = low.reshape(n, 8, 32).float() - 4 * (1 - bit.float())
    return q.reshape(n, 16, 16).mul_(dl).reshape(n, QK_K)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 8 6-bit (scale, min) pairs packed in 12 bytes (ggml's get_scale_min_k4)."""
    import torch

    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat((d & 63, (md & 0x0F) | ((d >> 6) << 4)), dim=-1)
    minimum = torch.cat((m & 63, (md >> 4) | ((m >> 6) << 4)), dim=-1)
    return scale.float(), minimum.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """d f16, dmin f16, scales[12], qs[128]: element c*64 + h*32 + l is nibble h of qs[c*32 + l],
    in sub-block 2c + h: x = d*scale * q - dmin*min."""
    n = b.shape[0]
    scale, minimum = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * scale).reshape(n, 8, 1)
    dm = (_f16(b, 2) * minimum).reshape(n, 8, 1)
    q = (b[:, 16:144].reshape(n, 4, 1, 32) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F
    return q.reshape(n, 8, 32).float().mul_(d).sub_(dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K plus qh[32]: the 5th bit of element i of sub-block s is bit s of qh[i]."""
    n = b.shape[0]
    scale, minimum = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * scale).reshape(n, 8, 1)
    dm = (_f16(b, 2) * minimum).reshape(n, 8, 1)
    low = (b[:, 48:176].reshape(n, 4, 1, 32) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F
    high = (b[:, 16:48].reshape(n, 1, 32) >> _shifts(*range(8)).reshape(1, 8, 1)) & 1
    q = low.reshape(n, 8, 32) | (high << 4)
    return q.float().mul_(d).sub_(dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """ql[128], qh[64], scales int8[16], d f16.

    Element h*128 + k*32 + l: low nibble (k < 2) or high nibble (k >= 2) of ql[h*64 + (k%2)*32 + l],
    topped by bits 2k..2k+1 of qh[h*32 + l], minus 32, scaled by d * scales[h*8 + k*2 + l//16].
    """
    import torch

    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    low = (b[:, 0:128].reshape(n, 2, 1, 64) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F  # [n, h, k//2, (k%2, l)]
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3  # [n, h, k, l]
    q = (low.reshape(n, 2, 4, 32) | (high << 4)).to(torch.int8).float() - 32
    return q.reshape(n, 16, 16).mul_(d).reshape(n, QK_K)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}

# Rows dequantized per step: bounds the float32 temporaries of a large tensor.
_ROWS_PER_CHUNK = 1024


def dequantize(data: torch.Tensor, ggml: GGMLType, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes [numel / block * size] uint8 -> float32 of the logical shape (rows of shape[-1])."""
    import torch

    if ggml.dtype is not None:  # plain floats: a view of the bytes, no copy (unless misaligned)
        if data.storage_offset() % ggml.size:
            data = data.clone()
        return data.view(to_torch(ggml.dtype)).reshape(shape)
    cols = shape[-1]
    rows = data.numel() // (cols // ggml.block * ggml.size)
    blocks = data.reshape(rows, cols // ggml.block, ggml.size)
    out = torch.empty((rows, cols), dtype=torch.float32)
    fn = DEQUANTIZERS[ggml.name]
    for start in range(0, rows, _ROWS_PER_CHUNK):
        part = blocks[start : start + _ROWS_PER_CHUNK]
        out[start : start + part.shape[0]] = fn(part.reshape(-1, ggml.size)).reshape(part.shape[0], cols)
    return out.reshape(shape)
