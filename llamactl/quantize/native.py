"""The native backend: q8 / q4 weights in GGUF's block layouts, run by torch's own kernels.

Stored parts are GGML Q8_0 / Q4_0 blocks byte for byte (`native_layout` has the contract), so
a GGUF file's tensors run here unchanged and a quantized checkpoint converts to GGUF without
re-quantizing. Kernels want other layouts; `NativeLinear` repacks once, at load:

* q4 on the CPU: `torch._weight_int4pack_mm_for_cpu` (tinygemm's CPU port) with the block
  scales as its group scales and zero points 0; exact except that the fp16 scales are
  rounded to the compute dtype (bf16: 8 significant bits, relative error <= 2**-9 of a
  scale, a 16th of Q4_0's own rounding step at most). A prefill of `DENSE_ROWS` tokens or
  more dequantizes the weight to the compute dtype once (each weight rounded once more,
  by <= 2**-9) and runs one dense matmul: faster from there on.
* q4 on CUDA: `torch._weight_int4pack_mm` (tinygemm), the same scales, its tiled layout.
* q8 on the CPU: int8 x int8 dot products (fbgemm's dynamic linear, VNNI), as llama.cpp
  runs Q8_0: the activations of a decode step are quantized to 8 bits, and the weights,
  which fbgemm wants with one scale per row, are re-quantized per row from the blocks'
  exact values (d * q); prefill runs the same kernel on all its tokens at once, each token
  row scaled to the same range first so that it keeps its own 8-bit scale. The error is the
  quality report's (`quantize` measures it against the unquantized model).
  Where fbgemm is missing: `int8-split`, Q8_0 exactly on the int4 kernel (q = 16 hi + lo).
* q8 on CUDA: `torch._weight_int8pack_mm` on the per-row int8 weights.
* Anything else (shapes a kernel refuses, fp32 compute): dequantize-then-matmul, the
  reference the kernels are tested against.

Activations are cast to the spec's compute dtype (bf16 by default) for the kernel and the
result back to the model's dtype: the quantized path never runs in fp32 unless asked.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamactl import dtypes
from llamactl.cpu import matvec
from llamactl.errors import CheckpointError, MissingDependencyError
from llamactl.quantize.native_layout import WEIGHT, block_bytes, packed_shape
from llamactl.quantize.spec import QuantSpec
from llamactl.quantize.tensor import QuantizedTensor
from llamactl.rotary import hf_to_meta_index, permute_for_hf

logger = logging.getLogger(__name__)

_INT4_N_MULTIPLE = 16  # the CPU int4 pack wants N % 16 == 0; pad rows with zeros


# ----------------------------------------------------------------------------- blocks


def quantize_blocks(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """One [out, in] weight as rows of blocks: uint8 [out, in / g * block_bytes] (GGUF's bytes).

    The arithmetic is gguf-py's (`gguf.quants.Q8_0 / Q4_0.quantize_blocks`), op for op in
    fp32, so the bytes are identical; it runs on the weight's device.
    """
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
        raise MissingDependencyError("native quantization writes little-endian fp16 scales; this host is big-endian")
    n, k = int(weight.shape[0]), int(weight.shape[1])
    g = spec.group_size
    if k % g:
        raise CheckpointError(f"weight [{n}, {k}]: {k} input features are not a multiple of group size {g}")
    blocks = weight.detach().to(torch.float32).reshape(n, k // g, g)
    if spec.bits == 8:
        d = blocks.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = blocks * inv
        a = v.abs()
        floor = a.floor()
        q = torch.sign(v) * (floor + (2 * (a - floor)).floor())  # roundf: half away from zero
        payload = q.to(torch.int8).view(torch.uint8)
    else:
        top = blocks.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as numpy
        d = blocks.gather(-1, top) / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        u = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
        payload = u[..., : g // 2] | (u[..., g // 2 :] << 4)
    scales = d.to(torch.float16).view(torch.uint8)  # [n, nb, 2], little-endian
    return torch.cat([scales, payload], dim=-1).reshape(n, -1)


def _split(packed: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scales [n, nb], integer values [n, nb, g]: q8 int8 q, q4 uint8 u in 0..15)."""
    n = packed.shape[0]
    blocks = packed.reshape(n, -1, block_bytes(spec))
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)
    payload = blocks[..., 2:]
    if spec.bits == 8:
        return d, payload.contiguous().view(torch.int8)
    return d, torch.cat([payload & 0x0F, payload >> 4], dim=-1)  # low nibbles: 0..g/2-1


def dequantize_blocks(packed: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight rows of blocks stand for (fp32 arithmetic, then `dtype`)."""
    d, values = _split(packed, spec)
    values = values.to(torch.float32) - (8 if spec.bits == 4 else 0)
    return (values * d.to(torch.float32).unsqueeze(-1)).reshape(packed.shape[0], -1).to(dtype)


def _meta_rows(tensor: QuantizedTensor, device: torch.device) -> torch.Tensor:
    """The `weight` part on `device`, rows in Meta's order (rows permute exactly)."""
    packed = tensor.parts[WEIGHT].to(device)
    if tensor.row_heads:
        packed = packed.index_select(0, hf_to_meta_index(tensor.shape[0], tensor.row_heads).to(device))
    return packed


# ----------------------------------------------------------------------------- kernels


@dataclass
class Kernel:
    """A weight repacked for one kernel: `run(x [rows, in] in the compute dtype) -> [rows, out]`
    (in the compute dtype, or fp32 where the kernel computes in fp32)."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int  # bytes the repacked weight holds
    # run(x) with the output dtype asked (fp32 for a head's logits), for kernels that write it
    # directly: rounding to the compute dtype first would lose what fp32 logits keep
    run_to: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None
    # the native matvec itself, for a decode step that calls it into buffers of its own
    bound_matvec: matvec.BoundMatvec | None = None


# Prefill from this many rows on dequantizes a q4 weight for one dense matmul instead: tinygemm's
# CPU kernel costs about the same per row at any length, a bf16 matmul far less once the
# unpacking is shared by enough rows (110M model, 2 threads, prefill tok/s dense / kernel:
# 0.82x at 64 tokens, 1.0x at 96, 1.14x at 128, 1.46x at 256, 1.67x at 512).
DENSE_ROWS = 128
DENSE_CHUNK = 1 << 22  # weights unpacked at a time (8 MB in bf16): no whole-weight temporaries
_INT4_BLOCK_N = 64  # the CPU pack's layout: [N/64, K, 32] bytes, row j in the low nibble, j+32 in the high


def _int4_cpu(packed: torch.Tensor, spec: QuantSpec, compute: torch.dtype) -> Kernel:
    d, u = _split(packed, spec)
    n, g = packed.shape[0], spec.group_size
    pad = -n % _INT4_N_MULTIPLE
    u = F.pad(u.reshape(n, -1), (0, 0, 0, pad), value=8).to(torch.int32)  # padded rows dequantize to 0
    weight = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    scales = F.pad(d.to(compute).t(), (0, pad))  # [in/g, out+pad]
    scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()
    dense = (n + pad) % _INT4_BLOCK_N == 0 and int4_cpu_layout_known()

    def run(x: torch.Tensor) -> torch.Tensor:
        if dense and x.shape[0] >= DENSE_ROWS:
            y = _dense_int4_cpu(x, weight, scales_and_zeros[..., 0], g)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x, weight, g, scales_and_zeros)
        return y[:, :n] if pad else y

    return Kernel("int4-cpu", run, weight.nbytes + scales_and_zeros.nbytes)


def _dense_int4_cpu(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    """x [rows, K] @ the unpacked weight.T, `DENSE_CHUNK` weights at a time: a 7B w1|w3 would
    otherwise be a 180 MB temporary (several, while unpacking) next to the 4-bit weights."""
    n, k = weight.shape[0], weight.shape[1] * 2
    rows = max(_INT4_BLOCK_N, DENSE_CHUNK // k // _INT4_BLOCK_N * _INT4_BLOCK_N)  # whole 64-row blocks
    parts = [x @ _unpack_int4_cpu(weight[i : i + rows], scales[:, i : i + rows], g) for i in range(0, n, rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _unpack_int4_cpu(weight: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    """W.T [K, N] (compute dtype) for a CPU int4 pack [N, K/2] and its scales [K/g, N].

    The pack holds each 64-row block as [K, 32] bytes; moving whole 64-byte rows of blocks
    ([N/64, K, 64] -> [K, N/64, 64]) is a fast copy, where transposing single bytes to [N, K]
    took twice as long as everything else together.
    """
    n, k = weight.shape[0], weight.shape[1] * 2
    b = weight.view(n // _INT4_BLOCK_N, k, _INT4_BLOCK_N // 2)
    u = torch.cat([b & 0x0F, b >> 4], dim=-1)  # [N/64, K, 64]: the rows of each 64-row block
    q = u.permute(1, 0, 2).reshape(k, n).view(torch.int8).sub_(8)  # W.T as int8 values -8..7
    return torch.mul(q.view(k // g, g, n), scales.contiguous().unsqueeze(1)).view(k, n)  # one pass to bf16


_LAYOUT: list[bool] = []


def int4_cpu_layout_known() -> bool:
    """Whether this torch's CPU int4 pack has the layout `_unpack_int4_cpu` reads (checked once)."""
    if not _LAYOUT:
        u = torch.arange(2 * _INT4_BLOCK_N * 64, dtype=torch.int32).view(2 * _INT4_BLOCK_N, 64).mul(7) % 16
        ones = torch.ones(1, 2 * _INT4_BLOCK_N, dtype=torch.bfloat16)
        try:
            unpacked = _unpack_int4_cpu(torch._convert_weight_to_int4pack_for_cpu(u, 1), ones, 32)
            _LAYOUT.append(torch.equal(unpacked.t(), (u - 8).to(torch.bfloat16)))
        except (RuntimeError, AttributeError):
            _LAYOUT.append(False)
    return _LAYOUT[0]


def _int4_cuda(packed: torch.Tensor, spec: QuantSpec, compute: torch.dtype) -> Kernel:
    d, u = _split(packed, spec)
    n, g = packed.shape[0], spec.group_size
    u = u.reshape(n, -1)
    k = u.shape[1]
    tiles = 8 if k % 1024 == 0 else 4 if k % 512 == 0 else 2
    pairs = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8).contiguous()  # even element in the high nibble
    weight = torch._convert_weight_to_int4pack(pairs, tiles)
    scales = d.to(compute).t()
    scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()
    return Kernel(
        "int4-cuda",
        lambda x: torch._weight_int4pack_mm(x, weight, g, scales_and_zeros),
        weight.nbytes + scales_and_zeros.nbytes,
    )


def _int8_split_cpu(packed: torch.Tensor, spec: QuantSpec, compute: torch.dtype) -> Kernel:
    """q8 blocks exactly, on the int4 CPU kernel: q = 16 * hi + lo with hi in -8..7, lo in 0..15.

    The weight becomes [hi | lo], 2 * in int4 columns whose groups carry scales 16 d (zero 0)
    and d (zero 8 d), and the input is [x | x]: sum(x * (16 d hi + d lo)) = sum(x * d q).
    No re-quantization: only d is rounded to the compute dtype (16 d and 8 d stay exact).
    """
    d, q = _split(packed, spec)
    n = packed.shape[0]
    q = q.to(torch.int32)
    hi, lo = (q >> 4) + 8, q & 0x0F  # arithmetic shift: floor(q / 16)
    pad = -n % _INT4_N_MULTIPLE
    u = F.pad(torch.cat([hi.reshape(n, -1), lo.reshape(n, -1)], dim=1), (0, 0, 0, pad), value=8)
    weight = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    dc = d.to(compute).to(torch.float32)
    scales = torch.cat([dc * 16, dc], dim=1)
    zeros = torch.cat([torch.zeros_like(dc), dc * 8], dim=1)
    scales_and_zeros = F.pad(torch.stack([scales.t(), zeros.t()], dim=-1), (0, 0, 0, pad)).to(compute).contiguous()
    g = spec.group_size

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(torch.cat([x, x], dim=1), weight, g, scales_and_zeros)
        return y[:, :n] if pad else y

    return Kernel("int8-split", run, weight.nbytes + scales_and_zeros.nbytes)


def _per_row_int8(packed: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], fp32 scales [out]): the blocks' exact values re-quantized per row."""
    w = dequantize_blocks(packed, spec)
    scale = w.abs().amax(1) / 127
    q = (w / torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(1)).round().to(torch.int8)
    return q, scale


def _int8_rows(packed: torch.Tensor, spec: QuantSpec, compute: torch.dtype) -> Kernel:
    """Per-row int8 weights, `_weight_int8pack_mm` (int8 weights x compute-dtype activations)."""
    q, scale = _per_row_int8(packed, spec)
    scale = scale.to(compute)
    return Kernel("int8-rows", lambda x: torch._weight_int8pack_mm(x, q, scale), q.nbytes + scale.nbytes)


def _int8_fbgemm(packed: torch.Tensor, spec: QuantSpec, compute: torch.dtype) -> Kernel:
    """Per-row int8 weights in fbgemm's packing: int8 x int8 dot products (AVX512-VNNI / AVX2).

    A decode step (one row) quantizes its activations to 8 bits, as llama.cpp does for Q8_0,
    and runs fbgemm's dynamic linear, 1.6-1.9x faster than `_weight_int8pack_mm` here (see
    benchmarks/). fbgemm quantizes a longer input (prefill) with one scale for all its rows, so
    one outlier token would coarsen the others; each row is first divided by its own largest
    magnitude and the result multiplied back, which gives every token its own 8-bit scale (as a
    decode step has) in one call: 256 tokens through a 768 -> 2304 projection take 0.8 ms
    against 15 ms row by row (2 threads).
    """
    q, scale = _per_row_int8(packed, spec)
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; fbgemm still runs them
        warnings.simplefilter("ignore", UserWarning)
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        weight = torch.ops.quantized.linear_prepack(qweight, None)
    del q, qweight

    def run(x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        wide = x.float()
        if x.shape[0] == 1:
            return torch.ops.quantized.linear_dynamic(wide, weight, False)  # fp32, as fbgemm computes
        size = wide.abs().amax(1, keepdim=True)  # [T, 1]
        size = torch.where(size == 0, torch.ones_like(size), size)
        return torch.ops.quantized.linear_dynamic(wide / size, weight, False) * size

    return Kernel("int8-fbgemm", run, _rows_bytes(packed, spec))


def _rows_bytes(packed: torch.Tensor, spec: QuantSpec) -> int:
    """Bytes of one int8 per weight plus one fp32 scale per row."""
    out, cols = packed.shape
    return out * cols // block_bytes(spec) * spec.group_size + 4 * out


def _dequantized(packed: torch.Tensor, spec: QuantSpec, compute: torch.dtype) -> Kernel:
    """The reference: the weight dequantized once, a plain matmul (memory of `compute`)."""
    w = dequantize_blocks(packed, spec, compute)
    return Kernel("dequantized", lambda x: F.linear(x, w), w.nbytes)


# From this many rows on, a q4 / q8 "vnni" weight is dequantized (`DENSE_CHUNK` weights at a
# time) for one dense matmul: the matvec kernel's cost grows with every row, a bf16 matmul's
# hardly (AMX / AVX512-BF16), once the dequantizing is shared by enough rows.
VNNI_DENSE_ROWS = 16


def _vnni(bits: int) -> Callable[[torch.Tensor, QuantSpec, torch.dtype], Kernel]:
    return lambda packed, spec, compute: _vnni_kernel(packed, spec, compute, bits)


def _vnni_kernel(packed: torch.Tensor, spec: QuantSpec, compute: torch.dtype, bits: int) -> Kernel:
    """GGUF's blocks, rows interleaved 16 at a time (`matvec.repack`), for matvec_kernels.cpp (as
    llama.cpp runs Q4_0 / Q8_0): int8 dot products against activations quantized per 32-value
    block, so the error is the weights' own plus ~0.5% (relative) from the activations' 8 bits,
    where tinygemm (q4) computes with bf16 activations and fbgemm (q8) re-quantizes the weights
    per row. Holds the file's bytes. Longer inputs (prefill) dequantize into dense matmuls.
    """
    if spec.bits != bits:
        raise ValueError(f"the q{bits} matvec kernel runs {bits}-bit blocks, not {spec.scheme}")
    if spec.group_size != matvec.BLOCK or not matvec.available(bits, compute):
        raise RuntimeError(f"no q{bits} matvec kernel for blocks of {spec.group_size} in {compute} here")
    n = packed.shape[0]
    payload, scales = matvec.repack(*_split(packed, spec))
    k = scales.shape[1] * matvec.BLOCK
    chunk = max(1, DENSE_CHUNK // k // matvec.GROUP_ROWS)  # row groups dequantized at a time

    rows_kernel = matvec.BoundMatvec(bits, payload, scales, n, compute)

    def run_to(x: torch.Tensor, out: torch.dtype) -> torch.Tensor:
        if x.shape[0] < VNNI_DENSE_ROWS:
            return rows_kernel(x.contiguous(), out)
        parts = [
            F.linear(x, matvec.dequantize(payload[i : i + chunk], scales[i : i + chunk], bits, x.dtype))
            for i in range(0, scales.shape[0], chunk)
        ]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y[:, :n]

    nbytes = payload.nbytes + scales.nbytes
    return Kernel(f"q{bits}-vnni", lambda x: run_to(x, x.dtype), nbytes, run_to, rows_kernel)


_BUILDERS: dict[str, Callable[[torch.Tensor, QuantSpec, torch.dtype], Kernel]] = {
    "q4-vnni": _vnni(4),
    "q8-vnni": _vnni(8),
    "int4-cpu": _int4_cpu,
    "int4-cuda": _int4_cuda,
    "int8-split": _int8_split_cpu,
    "int8-fbgemm": _int8_fbgemm,
    "int8-rows": _int8_rows,
    "dequantized": _dequantized,
}
KERNELS = tuple(_BUILDERS)


def kernel_candidates(spec: QuantSpec, device: torch.device) -> list[str]:
    """The kernels a weight may run with on `device`, fastest first (the last always works)."""
    compute = spec.compute_dtype
    if compute == "fp32" or device.type not in ("cpu", "cuda"):
        return ["dequantized"]  # the weight-only kernels are slow or absent in fp32
    if device.type == "cpu":
        vnni = f"q{spec.bits}-vnni"  # where built (AVX512-VNNI) and the shape fits; else the next
        if spec.bits == 8:
            torch_kernels = ["int8-fbgemm", "int8-split"] if compute == "bf16" else ["int8-rows"]
        else:
            torch_kernels = ["int4-cpu"] if compute == "bf16" else []  # fp16 int4: 20x slower
        return [vnni, *torch_kernels, "dequantized"]
    if spec.bits == 8:
        return ["int8-rows", "dequantized"]
    return ["int4-cuda", "dequantized"] if compute == "bf16" else ["dequantized"]


_WORKS: dict[tuple[str, str, str], bool] = {}  # (kernel, device, compute) -> ran on a tiny weight


def _kernel_works(name: str, spec: QuantSpec, device: torch.device, compute: torch.dtype) -> bool:
    """Try a kernel once on a tiny weight (a torch build may lack it on this device)."""
    key = (name, str(device), str(compute))
    if key not in _WORKS:
        probe = dataclasses.replace(spec, group_size=32)
        w = torch.linspace(-1, 1, 32 * 256, device=device).view(32, 256)
        try:
            kernel = _BUILDERS[name](quantize_blocks(w, probe), probe, compute)
            for rows in (1, 3):
                kernel.run(torch.ones(rows, 256, device=device, dtype=compute))
            _WORKS[key] = True
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
            logger.info("kernel %s unavailable on %s (%s); falling back", name, device, str(exc).splitlines()[0][:120])
            _WORKS[key] = False
    return _WORKS[key]


def build_kernel(packed: torch.Tensor, spec: QuantSpec, device: torch.device, kernel: str | None = None) -> Kernel:
    """The weight repacked for `kernel`, or for the fastest candidate that works on `device`."""
    compute = dtypes.to_torch(spec.compute_dtype)
    if kernel is not None:
        return _BUILDERS[kernel](packed, spec, compute)
    *fast, last = kernel_candidates(spec, device)
    for name in fast:
        if not _kernel_works(name, spec, device, compute):
            continue
        try:
            return _BUILDERS[name](packed, spec, compute)
        except RuntimeError as exc:  # a shape this kernel refuses (CUDA tile sizes...): the next one
            logger.info("kernel %s refuses %s weight %s (%s)", name, spec.scheme, list(packed.shape), exc)
    return _BUILDERS[last](packed, spec, compute)


class NativeLinear(nn.Module):
    """x [..., in] -> x @ W.T [..., out] for a q8 / q4 weight, in the compute dtype.

    `kernel` names the repacking (`kernel_candidates`); the stored blocks themselves are not
    kept (the backend's `dequantize` works on the QuantizedTensor). The output has the input's
    dtype, or `out_dtype` when set: the loader sets fp32 on an output head, whose logits the
    model returns in fp32 anyway (the q8 kernel computes them in fp32: rounding them to bf16
    first turned close logits into ties).
    """

    def __init__(
        self, tensor: QuantizedTensor | Sequence[QuantizedTensor], device: torch.device, kernel: str | None = None
    ) -> None:
        """One weight, or several of the same input and scheme joined row-wise into one kernel
        (`Native.joined_linear`): blocks run along the input, so rows concatenate exactly."""
        super().__init__()
        parts = [tensor] if isinstance(tensor, QuantizedTensor) else list(tensor)
        if not _joinable(parts):
            raise ValueError("joined q8/q4 weights need one scheme and one input size")
        spec = parts[0].spec
        self.spec, self.scheme = spec, spec.scheme
        self.out_features, self.in_features = sum(int(p.shape[0]) for p in parts), int(parts[0].shape[1])
        self.compute = dtypes.to_torch(spec.compute_dtype)
        self.stored_bytes = sum(int(p.parts[WEIGHT].numel()) for p in parts)
        rows = torch.cat([_meta_rows(p, device) for p in parts]) if len(parts) > 1 else _meta_rows(parts[0], device)
        impl = build_kernel(rows, spec, device, kernel)
        del rows
        self.kernel, self._run, self._run_to, self.held_bytes = impl.name, impl.run, impl.run_to, impl.nbytes
        self.matvec = impl.bound_matvec  # one row straight into a caller's buffer (engine.fused_cpu)
        self.out_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        flat = flat if flat.dtype == self.compute else flat.to(self.compute)
        want = self.out_dtype or x.dtype
        y = self._run_to(flat, want) if self._run_to is not None else self._run(flat)
        return (y if y.dtype == want else y.to(want)).view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        """Bytes the repacked weight holds in memory (what a decode step reads)."""
        return self.held_bytes

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}, kernel={self.kernel}"


# ----------------------------------------------------------------------------- the backend


def _probe(device: torch.device) -> None:
    """One tiny q4 and q8 matmul on `device`: a clear error now rather than mid-load."""
    w = torch.linspace(-1, 1, 64 * 256, device=device).view(64, 256)
    for scheme in ("q4", "q8"):
        spec = QuantSpec(scheme)
        NativeLinear(QuantizedTensor(spec, (64, 256), {WEIGHT: quantize_blocks(w, spec)}), device)(
            torch.ones(1, 256, device=device)
        )


class Native:
    """The Backend protocol (llamactl.quantize.tensor) for the q8 / q4 schemes."""

    def __init__(self) -> None:
        self._ready: set[str] = set()

    def prepare(self, device: torch.device) -> None:
        if str(device) in self._ready:
            return
        try:
            _probe(device)
        except RuntimeError as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MissingDependencyError(
                f"torch {torch.__version__} cannot run the q8/q4 kernels on {device} ({why[:200]})"
            ) from None
        self._ready.add(str(device))

    def quantize(
        self, weight: torch.Tensor, spec: QuantSpec, heads: int | None, device: torch.device
    ) -> QuantizedTensor:
        """Blocks in Hugging Face's row order for wq / wk (`row_heads`), as the checkpoint stores them."""
        stored = permute_for_hf(weight, heads) if heads else weight
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        packed = quantize_blocks(stored.to(device), spec).cpu()
        return QuantizedTensor(spec, shape, {WEIGHT: packed}, row_heads=heads)

    def dequantize(self, tensor: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        packed = _meta_rows(tensor, tensor.parts[WEIGHT].device)
        return dequantize_blocks(packed, tensor.spec, dtype)

    def linear(self, tensor: QuantizedTensor, device: torch.device) -> nn.Module:
        _check_blocks(tensor)
        return NativeLinear(tensor, device).eval()

    def joined_linear(self, tensors: Sequence[QuantizedTensor], device: torch.device) -> nn.Module | None:
        for tensor in tensors:
            _check_blocks(tensor)
        return NativeLinear(tensors, device).eval() if _joinable(tensors) else None


def _joinable(tensors: Sequence[QuantizedTensor]) -> bool:
    """Whether weights can run as one kernel: one scheme, one input size (blocks run along it)."""
    return len({t.spec for t in tensors}) == 1 and len({t.shape[1] for t in tensors}) == 1


def _check_blocks(tensor: QuantizedTensor) -> None:
    """One clear error for a q8 / q4 weight whose stored part is not what its shape implies."""
    if WEIGHT not in tensor.parts or set(tensor.parts) != {WEIGHT}:
        raise CheckpointError(f"{tensor.spec.scheme} weight: expected one part named {WEIGHT!r}")
    expected = packed_shape(tensor.spec, tensor.shape)
    if tuple(tensor.parts[WEIGHT].shape) != expected or tensor.parts[WEIGHT].dtype != torch.uint8:
        raise CheckpointError(
            f"{tensor.spec.scheme} weight {list(tensor.shape)}: blocks must be uint8 {list(expected)}, "
            f"found {tensor.parts[WEIGHT].dtype} {list(tensor.parts[WEIGHT].shape)}"
        )


BACKEND = Native()
