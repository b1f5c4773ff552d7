"""Streaming tensor bytes: writes equal torch's own bytes for any layout; transient passes stay safe."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch

from llamactl.checkpoint.base import FiniteCheck, is_finite, stream_tensors
from llamactl.checkpoint.tensor_io import Scratch, write_tensor


def _torch_bytes(t: torch.Tensor) -> bytes:
    return (
        t.contiguous().numpy().tobytes()
        if t.dtype != torch.bfloat16
        else t.contiguous().view(torch.int16).numpy().tobytes()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_tensor_matches_torch_bytes_for_views_and_casts(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamactl.checkpoint import tensor_io

    monkeypatch.setattr(tensor_io, "CHUNK_BYTES", 1000)  # many chunks, a ragged last one
    base = torch.randn(37, 24)
    views = [base, base.t(), base[:, 3:17], base.view(37, 4, 6).transpose(1, 2), base[5]]
    scratch = Scratch()
    for view in views:
        out = io.BytesIO()
        assert write_tensor(out, view, dtype, scratch) == view.numel() * dtype.itemsize
        assert out.getvalue() == _torch_bytes(view.to(dtype))


def test_scratch_reuses_its_buffer() -> None:
    scratch = Scratch()
    first = scratch.take(0, 1000)
    again = scratch.take(0, 500)
    assert again.data_ptr() == first.data_ptr()
    assert scratch.take(1, 10).data_ptr() != first.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_is_finite_finds_one_nan_or_inf_anywhere(dtype: torch.dtype) -> None:
    for value in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 1, 63, 64, 1000, 4095):
            t = torch.randn(4096).to(dtype)
            t[pos] = value
            assert not is_finite(t), (value, pos)
    assert is_finite(torch.full((10,), 60000.0, dtype=torch.float16))  # large but finite
    assert is_finite(torch.empty(0))


class _Source:
    path = "src"

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "a", torch.zeros(2)

    def iter_transient(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "a", torch.ones(2)


class _Changed(_Source):
    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "a", torch.full((2,), 7.0)


def test_stream_tensors_uses_a_transient_pass_only_where_the_class_defines_both() -> None:
    assert next(stream_tensors(_Source()))[1][0] == 1  # type: ignore[arg-type]
    assert next(stream_tensors(_Changed()))[1][0] == 7  # type: ignore[arg-type]  # subclass changed iter_tensors
    patched = _Source()
    patched.iter_tensors = _Changed().iter_tensors  # type: ignore[method-assign]
    assert next(stream_tensors(patched))[1][0] == 7  # type: ignore[arg-type]
    warnings: list[str] = []
    checked = FiniteCheck(_Source(), warnings.append)  # type: ignore[arg-type]
    assert next(stream_tensors(checked))[1][0] == 1  # type: ignore[index]
