"""llamactl.bench.runner on tiny models: KV bytes against the formula, MHA/GQA/MQA, the cross
product, statistics, what is timed, OOM rows, quantized rows and the race with transformers."""

from __future__ import annotations

import statistics

import pytest
import torch

from llamactl import bench, estimate, layout
from llamactl.bench import models
from llamactl.config import ModelArgs
from llamactl.model import Transformer
from tests.bench._util import TINY, run

# ----------------------------------------------------------------------------- memory and shapes


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_measured_kv_bytes_equal_the_formula(dtype: str) -> None:
    report = run(dtypes=[dtype], batch=[1, 3], ctx=[64, 128])
    element = 4 if dtype == "fp32" else 2
    assert len(report.rows) == 8
    for row in report.rows:
        expected = 2 * TINY.n_layers * TINY.n_heads * TINY.head_dim * row.n_ctx * row.n_batch * element
        assert row.kv_bytes == row.kv_bytes_formula == expected, row


def test_mha_gqa_mqa_rows_have_their_kv_heads_and_kv_in_ratio() -> None:
    report = run(attn=["mha", "gqa", "mqa"], kv_heads=[2])
    by_attn = {row.attn: row for row in report.rows if row.n_gen}
    assert {a: r.n_kv_head for a, r in by_attn.items()} == {"MHA": 8, "GQA": 2, "MQA": 1}
    mha = by_attn["MHA"].kv_bytes
    for row in by_attn.values():
        assert row.n_head == 8 and row.status == "ok"
        assert row.kv_bytes * (row.n_head // row.n_kv_head) == mha
    # GQA/MQA shrink wk and wv, nothing else.
    kv_weights = 2 * TINY.n_layers * TINY.dim * TINY.head_dim * 4  # per KV head, fp32
    assert by_attn["MHA"].model_size - by_attn["GQA"].model_size == 6 * kv_weights


def test_cross_product_of_list_options() -> None:
    report = run(ctx=[32, 64], batch=[1, 2], attn=["mha", "mqa"], prompt_tokens=[4, 8], gen_tokens=[2, 3])
    # 2 attn × 2 ctx × 2 batch × (2 pp tests + 2 tg tests): like llama-bench, prompt and
    # generation lengths are separate tests, not crossed with each other.
    keys = [(r.attn, r.n_ctx, r.n_batch, r.test) for r in report.rows]
    assert len(keys) == len(set(keys)) == 32
    assert {k[3] for k in keys} == {"pp4", "pp8", "tg2 @ d30", "tg3 @ d29", "tg2 @ d62", "tg3 @ d61"}
    assert [r.attn for r in report.rows] == ["MHA"] * 16 + ["MQA"] * 16  # one model build per variant
    assert all(r.status == "ok" for r in report.rows)


# ----------------------------------------------------------------------------- what is timed


def test_statistics_and_samples() -> None:
    report = run(repeat=4)
    for row in report.rows:
        tokens = row.n_batch * (row.n_prompt or row.n_gen)
        assert len(row.samples_ns) == len(row.samples_ts) == 4
        assert row.samples_ts == pytest.approx([tokens * 1e9 / ns for ns in row.samples_ns])
        assert row.avg_ts == pytest.approx(statistics.mean(row.samples_ts))
        assert row.stddev_ts == pytest.approx(statistics.stdev(row.samples_ts))
        assert row.median_ts == pytest.approx(statistics.median(row.samples_ts))
        assert row.avg_ns == pytest.approx(statistics.mean(row.samples_ns))


def test_decode_runs_one_token_per_step_with_the_cache_filled_to_ctx(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    real_forward = Transformer.forward

    def spy(self: Transformer, tokens: torch.Tensor, start: int = 0, last_only: bool = False) -> torch.Tensor:
        calls.append((tokens.shape[0], tokens.shape[1], start))
        logits = real_forward(self, tokens, start, last_only=last_only)
        assert last_only is (tokens.shape[1] > 1) and logits.shape[1] == 1  # prefill: the last position's only
        return logits

    monkeypatch.setattr(Transformer, "forward", spy)
    report = run(ctx=[64], prompt_tokens=[8], gen_tokens=[5], batch=[2], warmup=1, repeat=3)
    prefill = [c for c in calls if c[1] > 1]
    decode = [c for c in calls if c[1] == 1]
    assert prefill == [(2, 8, 0)] * 4  # 1 warm-up + 3 repeats
    assert decode == [(2, 1, pos) for _ in range(4) for pos in range(59, 64)]  # positions ctx-5 .. ctx-1
    tg = report.rows[1]
    assert (tg.test, tg.n_depth, tg.n_gen) == ("tg5 @ d59", 59, 5)
    assert tg.avg_ts == pytest.approx(statistics.mean(2 * 5 * 1e9 / ns for ns in tg.samples_ns))


def test_bandwidth_is_bytes_read_per_step_times_steps_per_second() -> None:
    report = run(ctx=[64], gen_tokens=[4], batch=[1], repeat=2)
    tg = report.rows[1]
    args = TINY
    embedding = args.vocab_size * args.dim * 4
    kv_per_position = 2 * args.n_layers * args.n_heads * args.head_dim * 4
    mean_filled = 60 + (4 + 1) / 2  # positions attended, averaged over the 4 steps
    per_step = tg.model_size - embedding + args.dim * 4 + kv_per_position * mean_filled
    assert tg.bandwidth_gbs == pytest.approx(per_step * tg.avg_ts / 1e9)
    assert tg.bandwidth_frac == pytest.approx(tg.bandwidth_gbs / report.environment.peak_bandwidth_gbs)
    assert report.rows[0].bandwidth_gbs is None  # prefill is compute-bound; no bandwidth figure


def test_weight_and_peak_memory() -> None:
    report = run()
    for row in report.rows:
        assert row.model_size == layout.param_count(TINY) * 4
        assert row.peak_bytes >= row.model_size + row.kv_bytes  # RSS high-water mark covers both


# ----------------------------------------------------------------------------- OOM rows


def test_injected_oom_becomes_a_row_and_the_run_continues(monkeypatch: pytest.MonkeyPatch) -> None:
    real_setup = Transformer.setup_cache

    def setup(self: Transformer, batch: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None):
        if max_seq_len == 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_setup(self, batch, max_seq_len, dtype)

    monkeypatch.setattr(Transformer, "setup_cache", setup)
    report = run(ctx=[64, 128, 256])
    status = [(r.n_ctx, r.test, r.status) for r in report.rows]
    assert status == [
        (64, "pp8", "ok"),
        (64, "tg4 @ d60", "ok"),
        (128, "pp8", "oom"),
        (128, "tg4 @ d124", "oom"),
        (256, "pp8", "ok"),
        (256, "tg4 @ d252", "ok"),
    ]
    oom = report.rows[2]
    assert oom.avg_ts is None and oom.samples_ts == [] and "out of memory" in oom.error
    assert oom.kv_bytes_formula == estimate.kv_cache_bytes(TINY, 128, 1, "fp32")


def test_oom_while_building_the_model_gives_rows_for_every_test(monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = models.build_random_model

    def build(args: ModelArgs, *a: object, **kw: object) -> Transformer:
        if args.kv_heads == 8:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_build(args, *a, **kw)

    monkeypatch.setattr(models, "build_random_model", build)
    report = run(attn=["mha", "mqa"])
    assert [(r.attn, r.status) for r in report.rows] == [("MHA", "oom"), ("MHA", "oom"), ("MQA", "ok"), ("MQA", "ok")]
    assert report.rows[0].n_kv_head == 8 and report.rows[0].kv_bytes_formula > 0


def test_other_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **kw: object) -> int:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Transformer, "setup_cache", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run()


# ----------------------------------------------------------------------------- quantized, vs transformers


def test_quantized_rows_hold_fewer_weight_bytes() -> None:
    report = run(bits=[16, 8, 4], dtypes=["bf16"], gen_tokens=[2], prompt_tokens=[4], repeat=1, warmup=0)
    held = {row.bits: row.model_size for row in report.rows}
    assert all(row.status == "ok" and row.avg_ts > 0 for row in report.rows)
    assert held[16] > held[8] > held[4]


def test_vs_transformers_reports_both_and_the_ratio() -> None:
    report = run(vs="transformers", dtypes=["fp32", "bf16"], attn=["gqa"], kv_heads=[2], repeat=2, warmup=1)
    for row in report.rows:
        assert row.vs == "transformers" and len(row.vs_samples_ts) == 2
        assert row.speedup == pytest.approx(statistics.median(row.samples_ts) / statistics.median(row.vs_samples_ts))
        assert row.vs_avg_ts == pytest.approx(statistics.mean(row.vs_samples_ts))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_measured_kv_bytes_equal_the_formula() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    args = ModelArgs(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, max_seq_len=1024)
    opts = bench.BenchOptions(
        args=args,
        ctx=[512, 1024],
        prompt_tokens=[64],
        gen_tokens=[8],
        repeat=2,
        attn=["mha", "gqa"],
        kv_heads=[2],
        dtypes=["bf16", "fp32"],
        layers=[None],
    )
    report = bench.run_bench(opts, device=torch.device("cuda"))
    assert report.environment.backends == "CUDA" and report.environment.gpu_info
    for row in report.rows:
        assert row.status == "ok"
        assert row.kv_bytes == row.kv_bytes_formula  # delta of the CUDA allocator's requested bytes
        assert row.peak_bytes >= row.model_size + row.kv_bytes


@pytest.mark.gpu
def test_cuda_real_oom_becomes_a_row() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    free, _ = torch.cuda.mem_get_info()
    args = ModelArgs(dim=512, n_layers=2, n_heads=8, vocab_size=512, max_seq_len=1024)
    per_position = 2 * 2 * 512 * 2  # bf16 K and V, 2 layers
    huge = int(free * 2 // per_position)  # a cache twice the free memory
    opts = bench.BenchOptions(
        args=args, ctx=[256, huge], prompt_tokens=[16], gen_tokens=[4], repeat=1, dtypes=["bf16"], layers=[None]
    )
    report = bench.run_bench(opts, device=torch.device("cuda"))
    assert [r.status for r in report.rows] == ["ok", "ok", "oom", "oom"]


# ----------------------------------------------------------------------------- estimates, bits, % peak


def test_a_cut_model_gets_full_model_estimates_outside_the_records() -> None:
    four = ModelArgs(dim=64, n_layers=4, n_heads=8, vocab_size=320, multiple_of=32, max_seq_len=256)
    report = run(args=four, layers=[1], repeat=2)
    assert [r.n_layer for r in report.rows] == [1, 1] and len(report.estimates) == 2
    for measured, est in zip(report.rows, report.estimates, strict=True):
        assert est.status == "estimate" and est.test == measured.test and est.n_layer == est.n_layer_model == 4
        assert est.model_n_params == layout.param_count(four)
        assert est.model_size == layout.param_count(four) * 4  # fp32: every weight of all 4 layers
        assert est.kv_bytes_formula == estimate.kv_cache_bytes(four, 64, 1, "fp32") == 4 * measured.kv_bytes_formula
        assert est.kv_bytes is None and est.samples_ns == [] and est.peak_bytes is None
        assert est.avg_ts == pytest.approx(measured.avg_ts / 4)
        assert est.avg_ns == pytest.approx(measured.avg_ns * 4)
    tg = report.estimates[1]
    assert tg.ms_per_token == pytest.approx(report.rows[1].ms_per_token * 4)
    assert all(r["status"] != "estimate" for r in report.records())  # json/csv: measurements only
    assert run().estimates == []  # nothing cut, nothing estimated


def test_bits_and_kv_types_follow_the_dtype() -> None:
    report = run(dtypes=["fp32", "bf16"])
    assert {(r.type_w, r.bits, r.type_k, r.type_v) for r in report.rows} == {
        ("fp32", 32, "f32", "f32"),
        ("bf16", 16, "bf16", "bf16"),
    }


def test_percent_peak_never_exceeds_100() -> None:
    import dataclasses

    from llamactl.bench.runner import cap_peak_bandwidth

    report = run(repeat=2)
    assert all(0 < r.bandwidth_frac <= 1 for r in report.rows if r.n_gen)
    assert report.environment.peak_bandwidth_source.startswith("probe: best of 5 runs")
    env = dataclasses.replace(report.environment, peak_bandwidth_gbs=0.0001)  # a probe that read too little
    rows = [dataclasses.replace(r) for r in report.rows]
    cap_peak_bandwidth(env, rows)
    tg = rows[1]
    assert env.peak_bandwidth_source == "decode" and env.peak_bandwidth_gbs == pytest.approx(tg.bandwidth_gbs)
    assert tg.bandwidth_frac == pytest.approx(min(1.0, tg.bandwidth_gbs / env.peak_bandwidth_gbs))
    assert tg.bandwidth_frac <= 1
