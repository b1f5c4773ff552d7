from __future__ import annotations

import pytest

from llamactl import dtypes
from llamactl.errors import UsageError


@pytest.mark.parametrize("row", dtypes.DTYPE_TABLE, ids=lambda r: r.name)
def test_every_row_agrees_with_torch_and_safetensors(row: dtypes.DType) -> None:
    from safetensors.torch import _TYPES  # the library's own name -> dtype table

    torch_dtype = dtypes.to_torch(row.name)
    assert torch_dtype.itemsize == row.itemsize and torch_dtype.is_floating_point == row.floating
    assert _TYPES[row.safetensors] == torch_dtype
    for spelling in (row.name, row.torch, row.safetensors, torch_dtype, str(torch_dtype)):
        assert dtypes.name_of(spelling) == row.name


def test_gguf_ids_are_ggmls() -> None:
    import gguf

    for row in dtypes.DTYPE_TABLE:
        if row.gguf is not None:
            assert gguf.GGMLQuantizationType(row.gguf).name == row.safetensors.replace("BOOL", "?")


def test_parse_float_dtype() -> None:
    assert dtypes.parse_float_dtype("bfloat16") == "bf16" and dtypes.parse_float_dtype(None) is None
    with pytest.raises(UsageError, match="dtype 'int8': choose one of fp32, fp16, bf16"):
        dtypes.parse_float_dtype("int8")
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        dtypes.lookup("fp8")
