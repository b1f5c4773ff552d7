"""llamactl.cli.plot: where a plot may be written, and which rows make which line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llamactl.bench import BenchRow
from llamactl.cli.plot import _series, check_plot_path
from llamactl.errors import DestinationError

ROW = BenchRow(
    model_type="7b",
    model_filename="",
    attn="MHA",
    n_layer=2,
    n_layer_model=32,
    n_head=32,
    n_kv_head=32,
    head_dim=128,
    type_w="fp32",
    type_k="f32",
    type_v="f32",
    bits=16,
    n_batch=1,
    n_ctx=4096,
    n_prompt=0,
    n_gen=32,
    n_depth=4064,
    test="tg32 @ d4064",
)


@pytest.mark.parametrize(
    ("name", "message"),
    [("chart.svg", "must end in .png"), ("missing/chart.png", "does not exist"), ("dir.png", "is a directory")],
)
def test_a_plot_path_that_cannot_be_written_is_refused(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DestinationError, match=message):
        check_plot_path(tmp_path / name)
    check_plot_path(tmp_path / "chart.png")  # a new .png in an existing directory is fine


def test_series_are_ok_decode_rows_by_variant_sorted_by_context() -> None:
    rows = [
        dataclasses.replace(ROW, n_ctx=4096),
        dataclasses.replace(ROW, n_ctx=512),
        dataclasses.replace(ROW, attn="MQA", n_kv_head=1, bits=4, n_batch=2),
        dataclasses.replace(ROW, n_gen=0, n_prompt=512, test="pp512"),  # prefill: not on the chart
        dataclasses.replace(ROW, n_ctx=8192, status="oom"),  # no numbers to draw
    ]
    series = _series(rows)
    assert list(series) == ["7b MHA kv32 fp32", "7b MQA kv1 fp32 int4 b2"]
    assert [r.n_ctx for r in series["7b MHA kv32 fp32"]] == [512, 4096]
