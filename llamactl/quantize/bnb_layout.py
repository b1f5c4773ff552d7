"""How bitsandbytes checkpoints store one quantized weight: part names, dtypes, shapes, sizes.

Torch-free, so `info` and `list` can size a quantized model from its shape alone; the
kernels that produce these parts are in `quantize.bnb`.
"""

from __future__ import annotations

import math

from llamactl import dtypes, jsonio
from llamactl.errors import CheckpointError, printable
from llamactl.layout import Shape, TensorInfo
from llamactl.quantize.spec import BLOCKSIZES, QuantSpec

QS_KEY = "weight.quant_state.bitsandbytes__"
NESTED_BLOCK = 256  # double quantization: one fp32 scale per 256 int8 absmax values


def part_infos(spec: QuantSpec, prefix: str, shape: Shape) -> list[TensorInfo]:
    """What quantizing one [out, in] weight produces; the JSON quant_state's length is an estimate."""
    numel = math.prod(shape)
    if spec.scheme == "int8":
        return [
            TensorInfo(f"{prefix}.weight", shape, "int8"),
            TensorInfo(f"{prefix}.SCB", (shape[0],), "fp32"),
            TensorInfo(f"{prefix}.weight_format", (), "uint8"),
        ]
    blocks = math.ceil(numel / spec.blocksize)
    infos = [TensorInfo(f"{prefix}.weight", ((numel + 1) // 2, 1), "uint8")]
    if spec.double_quant:
        infos += [
            TensorInfo(f"{prefix}.weight.absmax", (blocks,), "uint8"),
            TensorInfo(f"{prefix}.weight.nested_absmax", (math.ceil(blocks / NESTED_BLOCK),), "fp32"),
            TensorInfo(f"{prefix}.weight.nested_quant_map", (256,), "fp32"),
        ]
    else:
        infos.append(TensorInfo(f"{prefix}.weight.absmax", (blocks,), "fp32"))
    blob = 180 if spec.double_quant else 90  # '{"quant_type": "nf4", "blocksize": 64, ...}'
    infos += [
        TensorInfo(f"{prefix}.weight.quant_map", (16,), "fp32"),
        TensorInfo(f"{prefix}.{QS_KEY}{spec.scheme}", (blob,), "uint8"),
    ]
    return infos


def supports(spec: QuantSpec, shape: Shape) -> bool:
    """bitsandbytes quantizes any shape (4-bit blocks run over the flattened weight)."""
    return True


def stored_bytes(spec: QuantSpec, shape: Shape) -> int:
    return sum(info.nbytes for info in part_infos(spec, "w", shape))


def state_shape(blob: bytes, where: str) -> Shape:
    """The logical [out, in] recorded in a 4-bit `quant_state.bitsandbytes__*` JSON entry.

    Every field bitsandbytes will act on is checked here: its loader resolves `dtype` with
    getattr(torch, ...), so a state naming "load" would reach torch.load.
    """
    try:
        state = jsonio.loads(blob.decode("utf-8"))
        shape = state["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise ValueError(f"shape {shape!r}")
        for key in ("dtype", "nested_dtype"):
            if key in state and state[key] not in {d.torch for d in dtypes.DTYPE_TABLE if d.floating}:
                raise ValueError(f"{key} {state[key]!r}")
        if state.get("quant_type") not in ("nf4", "fp4"):
            raise ValueError(f"quant_type {state.get('quant_type')!r}")
        if state.get("blocksize") not in BLOCKSIZES:
            raise ValueError(f"blocksize {state.get('blocksize')!r}")
        return (shape[0], shape[1])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: malformed 4-bit quant_state ({printable(str(exc))[:80]})") from None
