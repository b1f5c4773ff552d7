"""QuantizedView: which tensors it quantizes, what it reports, what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.checkpoint import open_checkpoint
from llamactl.checkpoint.quantized import QuantizedView
from llamactl.errors import CheckpointError
from llamactl.quantize import QuantizedTensor, QuantSpec
from tests._quantize_util import meta_src, quantize_to


def test_view_quantizes_the_block_projections_minus_skipped(tmp_path: Path) -> None:
    reader = open_checkpoint(meta_src(tmp_path / "src"))
    view = QuantizedView(reader, QuantSpec("int8"), skip=["layers.1.*", "nothing*"], device="cpu")
    assert view.unmatched_skip == ["nothing*"] and len(view.skipped) == 7
    infos = {i.name: i for i in view.tensor_infos()}
    assert infos["layers.0.attention.wq.weight"].scheme == "int8"
    assert infos["layers.1.attention.wq.weight"].scheme is None and infos["norm.weight"].scheme is None
    entries = dict(view.iter_tensors())
    quantized = {n for n, e in entries.items() if isinstance(e, QuantizedTensor)}
    assert quantized == {n for n, i in infos.items() if i.scheme} and len(quantized) == 7
    # The estimate the plan uses is exact for int8 (its parts have fixed sizes).
    assert all(entries[n].nbytes == infos[n].nbytes for n in quantized)


def test_view_refuses_an_already_quantized_source(tmp_path: Path) -> None:
    quantize_to(meta_src(tmp_path / "src"), tmp_path / "q", QuantSpec("nf4"))
    with pytest.raises(CheckpointError, match="already quantized"):
        QuantizedView(open_checkpoint(tmp_path / "q"), QuantSpec("int8"), device="cpu")
