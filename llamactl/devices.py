"""The one device and dtype resolver every command uses: CUDA + bf16 when there is a GPU, else CPU + fp32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamactl import dtypes
from llamactl.errors import UsageError

if TYPE_CHECKING:
    import torch

SUPPORTED = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class Placement:
    """Where a model runs. `fell_back` is True when no device was asked for and there is no GPU."""

    device: torch.device
    dtype: torch.dtype
    fell_back: bool = False

    @property
    def dtype_name(self) -> str:
        return dtypes.name_of(self.dtype)


def resolve_device(requested: str | torch.device | None = None) -> tuple[torch.device, bool]:
    """(device, fell_back_to_cpu); an explicit CUDA request without CUDA is refused."""
    import torch  # here, not at the top: commands that only read metadata must not pay for torch

    if requested is None:
        return (torch.device("cuda"), False) if torch.cuda.is_available() else (torch.device("cpu"), True)
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"device {str(requested)!r}: unknown; use one of {', '.join(SUPPORTED)}") from None
    if device.type not in SUPPORTED:
        raise UsageError(f"device {str(requested)!r}: unsupported; use one of {', '.join(SUPPORTED)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return device, False


def default_dtype(device: torch.device) -> str:
    """bf16 on a GPU that has it, else fp32 (a CPU's bf16 matmuls are not faster for decode)."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Placement:
    """Device and compute dtype from what the user asked for (None: automatic)."""
    dev, fell_back = resolve_device(device)
    name = dtypes.parse_float_dtype(dtypes.name_of(dtype)) if dtype is not None else default_dtype(dev)
    return Placement(dev, dtypes.to_torch(name), fell_back)
