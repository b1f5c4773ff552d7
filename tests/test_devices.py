from __future__ import annotations

import pytest
import torch

from llamactl.devices import resolve, resolve_device
from llamactl.errors import UsageError


def test_auto_device_without_cuda_is_cpu_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    placement = resolve()
    assert (placement.device, placement.dtype, placement.fell_back) == (torch.device("cpu"), torch.float32, True)
    assert resolve_device(None) == (torch.device("cpu"), True)
    with pytest.raises(UsageError, match="device cuda: no CUDA device is available"):
        resolve("cuda")


def test_explicit_choices() -> None:
    placement = resolve("cpu", "bfloat16")
    assert (placement.device, placement.dtype, placement.fell_back) == (torch.device("cpu"), torch.bfloat16, False)
    assert resolve("cpu", torch.float16).dtype_name == "fp16"
    with pytest.raises(UsageError, match="device 'tpu'"):
        resolve("tpu")
    with pytest.raises(UsageError, match="dtype 'int8'"):
        resolve("cpu", "int8")
