"""How llamactl's native schemes (q8, q4) store one weight: GGUF's block layouts, byte for byte.

Torch-free, so `info`, `list` and the GGUF reader size and name the parts from a shape alone;
the kernels that make and run them are in `quantize.native`.

The contract (what `checkpoint/gguf.py` hands to the backend unchanged, and what the native
safetensors checkpoints hold):

* A quantized [out, in] weight W (N = out rows, K = in features, K a multiple of the group
  size g) is ONE part, named `weight`: dtype uint8, shape [N, (K / g) * block_bytes(g)].
* The bytes are row-major: row n holds the K / g blocks of W[n, :] in order (ggml's ne =
  [K, N], i.e. GGUF's tensor data as it is in the file; gguf-py's reader returns it as this
  very uint8 array).
* q8, one block of g weights (`2 + g` bytes; GGML Q8_0 when g = 32, 34 bytes):
  `d` fp16 little-endian (2 bytes), then g int8 values q[i] (two's complement).
  W[n, b*g + i] = d * q[i].  Quantizing: d = amax|w| / 127, q = roundf(w / d) (half away
  from zero), d stored as fp16 (the fp32 d is used for q, exactly as ggml-quants.c).
* q4, one block of g weights (`2 + g / 2` bytes; GGML Q4_0 when g = 32, 18 bytes):
  `d` fp16 little-endian, then g / 2 bytes; byte j holds u[j] in its low nibble and
  u[j + g/2] in its high nibble, u in 0..15. W[n, b*g + i] = d * (u[i] - 8).
  Quantizing: m = the signed value of largest magnitude (the first one on ties), d = m / -8,
  u = min(15, trunc(w / d + 8.5)). Group sizes 64 and 128 are the same rule with bigger
  blocks (no GGML type: a GGUF writer must re-block or dequantize them).
* Row order: Meta's (wq / wk un-permuted, as in GGUF files) when `QuantizedTensor.row_heads`
  is None; Hugging Face's rotary order when it is set (native safetensors checkpoints store
  HF names and HF row order). Rows quantize independently, so permuting rows is exact.

Weights whose K is not a multiple of the group size (stories260K's 172-wide FFN) cannot be
blocked; they stay unquantized (`supports`), as llama.cpp leaves such tensors too.
"""

from __future__ import annotations

from llamactl.errors import CheckpointError
from llamactl.layout import Shape, TensorInfo
from llamactl.quantize.spec import QuantSpec

WEIGHT = "weight"
SCALE_BYTES = 2  # one fp16 `d` per block
# GGMLQuantizationType values (gguf-py constants) of the blocks that are exactly GGML's.
GGML_TYPES: dict[tuple[str, int], int] = {("q8", 32): 8, ("q4", 32): 2}  # Q8_0, Q4_0
GGML_NAMES: dict[int, str] = {8: "Q8_0", 2: "Q4_0"}


def block_bytes(spec: QuantSpec) -> int:
    """Bytes of one block of `spec.group_size` weights, its fp16 scale included."""
    payload = spec.group_size if spec.bits == 8 else spec.group_size // 2
    return SCALE_BYTES + payload


def supports(spec: QuantSpec, shape: Shape) -> bool:
    """True when a [out, in] weight can be stored in blocks of the group size."""
    return len(shape) == 2 and shape[1] > 0 and shape[1] % spec.group_size == 0


def packed_shape(spec: QuantSpec, shape: Shape) -> tuple[int, int]:
    """The uint8 shape of the `weight` part for a logical [out, in] weight."""
    return (int(shape[0]), int(shape[1]) // spec.group_size * block_bytes(spec))


def logical_shape(spec: QuantSpec, packed: Shape, where: str) -> tuple[int, int]:
    """The [out, in] weight a stored uint8 `weight` part of shape `packed` stands for."""
    per_block = block_bytes(spec)
    if len(packed) != 2 or packed[1] % per_block:
        raise CheckpointError(
            f"{where}: {spec.scheme} weight of shape {list(packed)} is not rows of {per_block}-byte blocks"
        )
    return (int(packed[0]), int(packed[1]) // per_block * spec.group_size)


def part_infos(spec: QuantSpec, prefix: str, shape: Shape) -> list[TensorInfo]:
    """What quantizing one [out, in] weight produces: one uint8 part of whole blocks."""
    return [TensorInfo(f"{prefix}.{WEIGHT}", packed_shape(spec, shape), "uint8")]


def stored_bytes(spec: QuantSpec, shape: Shape) -> int:
    rows, cols = packed_shape(spec, shape)
    return rows * cols


def ggml_type(spec: QuantSpec) -> int | None:
    """The GGMLQuantizationType whose blocks these are byte for byte (None: no GGML twin)."""
    return GGML_TYPES.get((spec.scheme, spec.group_size))


def spec_for_ggml(ggml: int) -> QuantSpec:
    """The native scheme that stores a GGML Q8_0 / Q4_0 tensor as it is (for the GGUF reader)."""
    for (scheme, group), value in GGML_TYPES.items():
        if value == ggml:
            return QuantSpec(scheme, group_size=group).validate()
    raise CheckpointError(f"GGML type {ggml}: not a block layout llamactl runs natively (Q8_0, Q4_0 are)")
