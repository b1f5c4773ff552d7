"""llamactl.bench.rows: the schema's field order and the flat records json/jsonl/csv write."""

from __future__ import annotations

import dataclasses

import pytest

from llamactl.bench import ENV_FIELDS, FIELDS, ROW_FIELDS, BenchOptions, BenchReport, BenchRow, Environment
from llamactl.bench.rows import summarize


def _environment() -> Environment:
    return Environment(
        llamactl_version="0.1.0",
        build_commit=None,
        torch_version="2.13.0",
        cuda_version=None,
        backends="CPU",
        gpu_info=None,
        gpu_memory_bytes=None,
        cpu_info="cpu",
        cpu_cores=2,
        cpu_threads=2,
        n_threads=2,
        ram_bytes=1 << 30,
        peak_bandwidth_gbs=10.0,
    )


def _row(test: str) -> BenchRow:
    return BenchRow(
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
        n_prompt=512 if test.startswith("pp") else 0,
        n_gen=0 if test.startswith("pp") else 32,
        n_depth=0 if test.startswith("pp") else 4064,
        test=test,
        samples_ts=[1.0, 2.0],
    )


def test_fields_are_the_test_time_then_environment_then_row_fields() -> None:
    assert ("test_time", *ENV_FIELDS, *ROW_FIELDS) == FIELDS
    assert len(set(FIELDS)) == len(FIELDS)  # no row field shadows an environment field
    assert ROW_FIELDS[:2] == ("model_type", "model_filename") and ENV_FIELDS[0] == "llamactl_version"


def test_records_are_flat_in_fields_order() -> None:
    report = BenchReport(_environment(), [_row("pp512"), _row("tg32 @ d4064")], BenchOptions(), "2024-01-01T00:00:00Z")
    records = report.records()
    assert [tuple(r) for r in records] == [FIELDS, FIELDS]
    assert [r["test"] for r in records] == ["pp512", "tg32 @ d4064"]
    assert records[1]["test_time"] == "2024-01-01T00:00:00Z" and records[1]["backends"] == "CPU"
    assert records[0]["samples_ts"] == [1.0, 2.0]  # lists stay lists; csv joins them
    assert records[0] == {
        "test_time": "2024-01-01T00:00:00Z",
        **dataclasses.asdict(report.environment),
        **dataclasses.asdict(report.rows[0]),
    }


def test_summarize_is_mean_sample_sd_and_median() -> None:
    mean, sd, median = summarize([1.0, 2.0, 6.0])
    assert (mean, median) == (3.0, 2.0)
    assert sd == pytest.approx(2.6457513)  # sample (n - 1) standard deviation, as llama-bench
    assert summarize([5.0]) == (5.0, 0.0, 5.0)
    assert summarize([]) == (0.0, 0.0, 0.0)
