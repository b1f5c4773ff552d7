"""`llamactl bench` through the real app: the no-GPU default run, output schemas, plot, bad input.

The presets are 7B-wide; to keep CI fast the "7b" preset is swapped for a tiny shape with the
same 32 layers and 32 heads, so the CPU defaults (--layers 2 ...) are exercised as they are.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from llamactl import bench, config, estimate, layout
from tests.cli._run import assert_one_line_error, run_cli

TINY_7B = config.ModelArgs(dim=128, n_layers=32, n_heads=32, vocab_size=320, multiple_of=32)
# Names llama-bench uses for the same things, which the schema must keep.
LLAMA_BENCH_FIELDS = (
    "n_prompt",
    "n_gen",
    "n_batch",
    "n_threads",
    "avg_ns",
    "stddev_ns",
    "avg_ts",
    "stddev_ts",
    "samples_ns",
    "samples_ts",
    "model_type",
    "model_n_params",
    "cpu_info",
    "gpu_info",
    "backends",
    "build_commit",
    "test_time",
    "type_k",
    "type_v",
    "n_depth",
    "model_size",
)
OUR_FIELDS = (
    "kv_bytes",
    "kv_bytes_formula",
    "peak_bytes",
    "bandwidth_gbs",
    "bandwidth_frac",
    "n_kv_head",
    "attn",
    "status",
    "median_ts",
    "ms_per_token",
    "speedup",
    "n_ctx",
)
FAST = ("--prompt-tokens", "16", "--gen-tokens", "4", "--repeat", "2", "--warmup", "0")


@pytest.fixture(autouse=True)
def _tiny_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(config.PRESETS, "7b", TINY_7B)
    monkeypatch.setitem(
        config.PRESETS,
        "70b",
        config.ModelArgs(dim=128, n_layers=80, n_heads=16, n_kv_heads=2, vocab_size=320, multiple_of=32),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_default_run_falls_back_to_the_cpu_and_prints_a_table() -> None:
    out = run_cli("bench", "--ctx", "4096")
    assert out.exit_code == 0, out.stderr
    # One line on stderr says there is no GPU and which CPU defaults apply.
    assert out.stderr.strip().splitlines() == [
        "llamactl: no CUDA GPU found; benchmarking on the CPU with --layers 2 --gen-tokens 32 --repeat 3 "
        "--dtype fp32 (pass them to change)"
    ]
    assert "layers: 2 of 32 (CPU default, --layers to change)" in out.stdout
    assert "device: CPU" in out.stdout and "torch " in out.stdout
    lines = out.stdout.splitlines()
    pp = next(line for line in lines if "pp512" in line)
    tg = next(line for line in lines if "tg32 @ d4064" in line)
    assert "7b" in pp and "2/32" in pp and "MHA" in pp and "fp32" in pp
    # KV column: 2 layers × 32 heads × 4 × 4096 × 4 bytes × 2 = 8 MiB
    assert "8.0" in tg.split("|")[12]
    assert "\x1b[" not in out.stdout  # no ANSI when not a terminal


def test_explicit_options_are_kept_and_no_fallback_line_with_device_cpu() -> None:
    out = run_cli("bench", "--device", "cpu", "--ctx", "64", "--layers", "3", "-o", "json", *FAST)
    assert out.exit_code == 0, out.stderr
    assert out.stderr == ""
    records = json.loads(out.stdout)
    assert {(r["n_layer"], r["n_layer_model"], r["n_gen"] or r["n_prompt"]) for r in records} == {
        (3, 32, 16),
        (3, 32, 4),
    }


def test_json_schema_is_stable_and_uses_llama_bench_names() -> None:
    out = run_cli("bench", "--ctx", "64", "--attn", "mha,gqa,mqa", "--kv-heads", "8", "--json", *FAST)
    assert out.exit_code == 0, out.stderr
    records = json.loads(out.stdout)
    assert len(records) == 6
    for record in records:
        assert tuple(record) == bench.FIELDS
        assert set(LLAMA_BENCH_FIELDS) <= set(record) and set(OUR_FIELDS) <= set(record)
        assert isinstance(record["samples_ts"], list) and len(record["samples_ts"]) == 2
        assert record["kv_bytes"] == record["kv_bytes_formula"]
        assert record["backends"] == "CPU" and record["status"] == "ok"
    kv = {r["attn"]: (r["n_kv_head"], r["kv_bytes"]) for r in records if r["n_gen"]}
    assert kv["MHA"][0] == 32 and kv["GQA"][0] == 8 and kv["MQA"][0] == 1
    assert kv["MHA"][1] == 4 * kv["GQA"][1] == 32 * kv["MQA"][1]


def llama_bench_test_name(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """How llama-bench's markdown printer names a test (tools/llama-bench/llama-bench.cpp)."""
    if n_prompt > 0 and n_gen == 0:
        name = f"pp{n_prompt}"
    elif n_gen > 0 and n_prompt == 0:
        name = f"tg{n_gen}"
    else:
        name = f"pp{n_prompt}+tg{n_gen}"
    return name + (f" @ d{n_depth}" if n_depth > 0 else "")


def test_a_llama_bench_parser_reads_our_json() -> None:
    """The fields a llama-bench JSON reader uses, with llama-bench's types and meanings."""
    out = run_cli("bench", "--ctx", "64", "--dtype", "fp32,bf16", "--json", *FAST)
    assert out.exit_code == 0, out.stderr
    for r in json.loads(out.stdout):
        for name in ("model_size", "model_n_params", "n_threads", "n_prompt", "n_gen", "n_depth", "n_batch"):
            assert isinstance(r[name], int), name
        assert r["model_size"] == r["model_n_params"] * (4 if r["type_w"] == "fp32" else 2)
        assert r["n_threads"] == torch.get_num_threads()
        assert r["type_k"] == r["type_v"] == {"fp32": "f32", "bf16": "bf16"}[r["type_w"]]  # ggml_type_name
        assert r["bits"] == {"fp32": 32, "bf16": 16}[r["type_w"]]
        assert r["test"] == llama_bench_test_name(r["n_prompt"], r["n_gen"], r["n_depth"])
        assert r["n_depth"] + r["n_gen"] == r["n_ctx"] or r["n_prompt"]
        tokens = r["n_prompt"] + r["n_gen"]  # llama-bench's t/s: tokens of the test / sample time
        assert r["samples_ts"] == pytest.approx([tokens * 1e9 / ns for ns in r["samples_ns"]])
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / len(r["samples_ts"]))


def test_table_says_how_the_peak_was_measured_and_explains_its_columns() -> None:
    out = run_cli("bench", "--ctx", "64", *FAST)
    assert out.exit_code == 0, out.stderr
    assert "(best of 5 runs each of a copy, a sum and a matrix-vector product over 256 MiB)" in out.stdout
    tail = out.stdout.rstrip().splitlines()[-4:]
    assert tail[0] == "pp16: prefill of a 16-token prompt (llama-bench's name)"
    assert tail[1].startswith("tg4 @ d60: 4 tokens decoded one at a time after 60 already in the KV cache")
    assert "% peak: that ÷ the peak bandwidth in the header" in tail[2] and "over 2 runs" in tail[2]
    assert tail[3].startswith("estimate: the full 32-layer model")  # the CPU default cuts to 2 layers
    assert "| 7b    | 32/32 (estimate) |" in out.stdout


def test_jsonl_is_one_record_per_line() -> None:
    out = run_cli("bench", "--ctx", "64,128", "-o", "jsonl", *FAST)
    assert out.exit_code == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["n_ctx"], r["test"]) for r in records] == [
        (64, "pp16"),
        (64, "tg4 @ d60"),
        (128, "pp16"),
        (128, "tg4 @ d124"),
    ]
    assert all(tuple(r) == bench.FIELDS for r in records)


def test_csv_has_the_schema_header_and_parses() -> None:
    out = run_cli("bench", "--ctx", "64", "--batch", "1,2", "-o", "csv", *FAST)
    assert out.exit_code == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert tuple(rows[0]) == bench.FIELDS
    assert [(r["n_batch"], r["test"]) for r in rows] == [
        ("1", "pp16"),
        ("1", "tg4 @ d60"),
        ("2", "pp16"),
        ("2", "tg4 @ d60"),
    ]
    for r in rows:
        samples = [float(x) for x in r["samples_ts"].split(";")]
        assert len(samples) == 2
        assert float(r["avg_ts"]) == pytest.approx(sum(samples) / 2)
        assert int(r["kv_bytes"]) == int(r["kv_bytes_formula"]) == 2 * 2 * 32 * 4 * 64 * int(r["n_batch"]) * 4


def test_markdown_table() -> None:
    out = run_cli("bench", "--ctx", "64", "-o", "md", "--preset", "70b", "--layers", "1", *FAST)
    assert out.exit_code == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | layers | attn | kv heads |")
    assert table[1].startswith("|---|")
    assert len(table) == 6  # pp and tg measured with 1 layer, then both estimated for all 80
    assert "| 70b | 1/80 | GQA | 2 |" in table[2]
    assert "| 70b | 80/80 (estimate) | GQA | 2 |" in table[4] and "(estimate)" in table[5]
    legend = out.stdout.split(table[-1], 1)[1]
    assert "pp16: prefill of a 16-token prompt" in legend and "tg4 @ d60: 4 tokens decoded" in legend
    assert "estimate: the full 80-layer model" in legend


def test_vs_transformers_adds_the_ratio() -> None:
    out = run_cli("bench", "--ctx", "64", "--vs", "transformers", "-o", "json", *FAST)
    assert out.exit_code == 0, out.stderr
    for record in json.loads(out.stdout):
        assert record["vs"] == "transformers" and record["speedup"] > 0
    table = run_cli("bench", "--ctx", "64", "--vs", "transformers", *FAST)
    assert "speedup" in table.stdout and "transformers median" in table.stdout


def test_plot_writes_a_png(tmp_path: Path) -> None:
    target = tmp_path / "bench.png"
    out = run_cli("bench", "--ctx", "64,128", "--attn", "mha,mqa", "--plot", str(target), "-o", "json", *FAST)
    assert out.exit_code == 0, out.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no temporary left behind


def test_plot_without_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = run_cli("bench", "--plot", str(tmp_path / "x.png"))
    assert_one_line_error(out, "matplotlib is not installed", "llamactl[plot]")
    assert list(tmp_path.iterdir()) == []


def test_injected_oom_is_a_row_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.model import Transformer

    real = Transformer.setup_cache

    def setup(self: Transformer, batch: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None):
        if max_seq_len == 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, batch, max_seq_len, dtype)

    monkeypatch.setattr(Transformer, "setup_cache", setup)
    out = run_cli("bench", "--ctx", "64,128,256", *FAST)
    assert out.exit_code == 0, out.stderr
    oom = [line for line in out.stdout.splitlines() if "OOM" in line]
    assert len(oom) == 2 and all("d124" in line or "pp16" in line for line in oom)
    measured = [line for line in out.stdout.splitlines() if "| tg4 @" in line and "estimate" not in line]
    assert len(measured) == 3


def test_options_are_validated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.bench import options

    calls = []
    real = options._validate
    monkeypatch.setattr(options, "_validate", lambda opts: (calls.append(opts), real(opts))[1])
    out = run_cli("bench", "--ctx", "64", "-o", "json", *FAST)
    assert out.exit_code == 0, out.stderr
    assert len(calls) == 1  # the CLI plans once and runs that plan


@pytest.mark.parametrize(
    ("args", "fragments", "code"),
    [
        (("--ctx", "4k"), ("--ctx 4k", "'4k' is not an integer"), 2),
        (("--attn", "mha,mla"), ("attn mla",), 2),
        (("--kv-heads", "5", "--attn", "gqa"), ("kv_heads 5", "32 attention heads"), 2),
        (("--ctx", "256", "--prompt-tokens", "512"), ("prompt_tokens 512: longer than ctx 256",), 2),
        (("-o", "xml"), ("--output xml",), 2),
        (("--dtype", "fp8"), ("dtype fp8",), 2),
        (("--preset", "8b"), ("unknown preset '8b'",), 2),
        (("--device", "cuda"), ("device cuda: no CUDA device is available",), 2),
        (("--device", "tpu"), ("device 'tpu'",), 2),
        (("some/model", "--attn", "gqa"), ("attn gqa: only for presets",), 2),
        (("--vs", "llama.cpp"), ("vs llama.cpp",), 2),
        (("--plot", "chart.svg"), ("must end in .png",), 1),
    ],
)
def test_bad_input_is_one_line(args: tuple[str, ...], fragments: tuple[str, ...], code: int) -> None:
    assert_one_line_error(run_cli("bench", *args), *fragments, code=code)


def test_help_lists_every_option_of_the_issue() -> None:
    out = run_cli("bench", "--help")
    assert out.exit_code == 0
    for option in (
        "--preset",
        "--ctx",
        "--prompt-tokens",
        "--gen-tokens",
        "--batch",
        "--attn",
        "--kv-heads",
        "--dtype",
        "--bits",
        "--layers",
        "--warmup",
        "--repeat",
        "--device",
        "--output",
        "--plot",
        "--vs",
    ):
        assert option in out.stdout, option


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_benchmarks_a_checkpoint_in_either_format(fmt: str, tmp_path: Path) -> None:
    from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint

    args = tiny_args(gqa=True)
    write = write_meta_checkpoint if fmt == "meta" else write_hf_checkpoint
    path = write(tmp_path / fmt, args, random_meta_state(args))
    out = run_cli("bench", str(path), "--device", "cpu", "--ctx", "64", "-o", "json", *FAST)
    assert out.exit_code == 0, out.stderr
    records = json.loads(out.stdout)
    assert [r["test"] for r in records] == ["pp16", "tg4 @ d60"]
    for r in records:
        assert (r["model_type"], r["model_filename"]) == (fmt, str(path))
        assert (r["n_layer"], r["n_head"], r["n_kv_head"]) == (args.n_layers, args.n_heads, args.kv_heads)
        assert r["kv_bytes"] == r["kv_bytes_formula"] == estimate.kv_cache_bytes(args, 64, 1, "fp32")
        assert r["model_size"] == layout.param_count(args) * 4


def test_benchmarks_a_checkpoint_quantized_on_load(tmp_path: Path) -> None:
    from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint

    args = tiny_args(gqa=True)
    path = write_meta_checkpoint(tmp_path / "m", args, random_meta_state(args))
    out = run_cli(
        "bench", str(path), "--device", "cpu", "--ctx", "64", "--bits", "16,8,4", "--dtype", "bf16", "-o", "json", *FAST
    )
    assert out.exit_code == 0, out.stderr
    held = {r["bits"]: r["model_size"] for r in json.loads(out.stdout)}
    assert held[16] > held[8] > held[4]


def test_a_checkpoint_stored_quantized_reports_its_own_width(tmp_path: Path) -> None:
    from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint

    args = tiny_args(gqa=True, multiple_of=32)
    path = write_meta_checkpoint(tmp_path / "m", args, random_meta_state(args))
    assert run_cli("quantize", str(path), str(tmp_path / "q4"), "--bits", "4", "--no-eval").exit_code == 0
    out = run_cli("bench", str(tmp_path / "q4"), "--device", "cpu", "--ctx", "64", "-o", "json", *FAST)
    assert out.exit_code == 0, out.stderr
    assert {(r["bits"], r["scheme"]) for r in json.loads(out.stdout)} == {(4, "q4")}


def test_scheme_axis_runs_native_and_bitsandbytes_side_by_side(tmp_path: Path) -> None:
    """--bits 4 is q4; --scheme adds named schemes (nf4: bitsandbytes) to the same run."""
    from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint

    args = tiny_args(gqa=True, multiple_of=32)  # FFN 192: every projection fits q4's blocks
    path = write_meta_checkpoint(tmp_path / "m", args, random_meta_state(args))
    out = run_cli(
        "bench", str(path), "--device", "cpu", "--ctx", "64", "--bits", "4", "--scheme", "nf4", "-o", "json", *FAST
    )
    assert out.exit_code == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {(r["bits"], r["scheme"]) for r in rows} == {(4, "q4"), (4, "nf4")}
    assert all(r["status"] == "ok" and r["avg_ts"] > 0 for r in rows)
    bad = run_cli("bench", str(path), "--device", "cpu", "--scheme", "q5")
    assert bad.exit_code == 2 and "scheme q5: unknown" in bad.stderr
