"""llamactl.bench on tiny models: KV bytes against the formula and published figures, MHA/GQA/MQA,
OOM rows, statistics, what is timed, and the transformers twin really holding the same weights."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from llamactl import bench, estimate, layout
from llamactl.config import ModelArgs
from llamactl.errors import LlamactlError, UsageError
from llamactl.model import Transformer

CPU = torch.device("cpu")
# 8 heads of dim 8; tiny but every code path of the 7B shape (MHA) and 70B shape (GQA).
TINY = ModelArgs(dim=64, n_layers=2, n_heads=8, vocab_size=320, multiple_of=32, max_seq_len=256)


def tiny_options(**kw: object) -> bench.BenchOptions:
    base = dict(
        args=TINY, ctx=[64], prompt_tokens=[8], gen_tokens=[4], repeat=1, warmup=0, layers=[None], dtypes=["fp32"]
    )
    base.update(kw)
    return bench.BenchOptions(**base)  # type: ignore[arg-type]


def run(**kw: object) -> bench.BenchReport:
    return bench.run_bench(tiny_options(**kw), device=CPU)


# ----------------------------------------------------------------------------- memory


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
    assert by_attn["MHA"].weight_bytes - by_attn["GQA"].weight_bytes == 6 * kv_weights


def test_kv_heads_must_divide_heads() -> None:
    with pytest.raises(UsageError, match="--kv-heads 3"):
        run(attn=["gqa"], kv_heads=[3])


def test_cross_product_of_list_options() -> None:
    report = run(ctx=[32, 64], batch=[1, 2], attn=["mha", "mqa"], prompt_tokens=[4, 8], gen_tokens=[2, 3])
    # 2 attn × 2 ctx × 2 batch × (2 pp tests + 2 tg tests): like llama-bench, prompt and
    # generation lengths are separate tests, not crossed with each other.
    keys = [(r.attn, r.n_ctx, r.n_batch, r.test) for r in report.rows]
    assert len(keys) == len(set(keys)) == 32
    assert {k[3] for k in keys} == {"pp4", "pp8", "tg2@32", "tg3@32", "tg2@64", "tg3@64"}
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

    def spy(self: Transformer, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        calls.append((tokens.shape[0], tokens.shape[1], start))
        return real_forward(self, tokens, start)

    monkeypatch.setattr(Transformer, "forward", spy)
    report = run(ctx=[64], prompt_tokens=[8], gen_tokens=[5], batch=[2], warmup=1, repeat=3)
    prefill = [c for c in calls if c[1] > 1]
    decode = [c for c in calls if c[1] == 1]
    assert prefill == [(2, 8, 0)] * 4  # 1 warm-up + 3 repeats
    assert decode == [(2, 1, pos) for _ in range(4) for pos in range(59, 64)]  # positions ctx-5 .. ctx-1
    tg = report.rows[1]
    assert (tg.test, tg.n_depth, tg.n_gen) == ("tg5@64", 59, 5)
    assert tg.avg_ts == pytest.approx(statistics.mean(2 * 5 * 1e9 / ns for ns in tg.samples_ns))


def test_bandwidth_is_bytes_read_per_step_times_steps_per_second() -> None:
    report = run(ctx=[64], gen_tokens=[4], batch=[1], repeat=2)
    tg = report.rows[1]
    args = TINY
    embedding = args.vocab_size * args.dim * 4
    kv_per_position = 2 * args.n_layers * args.n_heads * args.head_dim * 4
    mean_filled = 60 + (4 + 1) / 2  # positions attended, averaged over the 4 steps
    per_step = tg.weight_bytes - embedding + args.dim * 4 + kv_per_position * mean_filled
    assert tg.bandwidth_gbs == pytest.approx(per_step * tg.avg_ts / 1e9)
    assert tg.bandwidth_frac == pytest.approx(tg.bandwidth_gbs / report.environment.peak_bandwidth_gbs)
    assert report.rows[0].bandwidth_gbs is None  # prefill is compute-bound; no bandwidth figure


def test_weight_and_peak_memory() -> None:
    report = run()
    for row in report.rows:
        assert row.weight_bytes == layout.param_count(TINY) * 4
        assert row.peak_bytes >= row.weight_bytes + row.kv_bytes  # RSS high-water mark covers both


def test_random_model_is_built_on_the_device_in_its_dtype() -> None:
    model = bench.build_random_model(TINY, CPU, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.freqs_cis.dtype == torch.complex64
    torch.testing.assert_close(model.freqs_cis, Transformer(TINY).freqs_cis)  # to_empty left nothing uninitialised
    assert float(model.layers[0].attention.wq.weight.detach().float().std()) == pytest.approx(0.02, rel=0.1)


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
        (64, "tg4@64", "ok"),
        (128, "pp8", "oom"),
        (128, "tg4@128", "oom"),
        (256, "pp8", "ok"),
        (256, "tg4@256", "ok"),
    ]
    oom = report.rows[2]
    assert oom.avg_ts is None and oom.samples_ts == [] and "out of memory" in oom.error
    assert oom.kv_bytes_formula == estimate.kv_cache_bytes(TINY, 128, 1, "fp32")


def test_oom_while_building_the_model_gives_rows_for_every_test(monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = bench.build_random_model

    def build(args: ModelArgs, *a: object, **kw: object) -> Transformer:
        if args.kv_heads == 8:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_build(args, *a, **kw)

    monkeypatch.setattr(bench, "build_random_model", build)
    report = run(attn=["mha", "mqa"])
    assert [(r.attn, r.status) for r in report.rows] == [("MHA", "oom"), ("MHA", "oom"), ("MQA", "ok"), ("MQA", "ok")]
    assert report.rows[0].n_kv_head == 8 and report.rows[0].kv_bytes_formula > 0


def test_other_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **kw: object) -> int:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Transformer, "setup_cache", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run()


# ----------------------------------------------------------------------------- options


def test_cpu_defaults_shrink_only_what_was_not_given() -> None:
    opts = bench.apply_device_defaults(bench.BenchOptions(), CPU)
    assert (opts.layers, opts.gen_tokens, opts.repeat, opts.dtypes) == ([2], [32], 3, ["fp32"])
    given = bench.apply_device_defaults(bench.BenchOptions(layers=[4], gen_tokens=[128], repeat=5), CPU)
    assert (given.layers, given.gen_tokens, given.repeat) == ([4], [128], 5)
    gpu = bench.apply_device_defaults(bench.BenchOptions(), torch.device("cuda"))
    assert (gpu.layers, gpu.gen_tokens, gpu.repeat, gpu.dtypes) == ([None], [128], 5, ["bf16"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt_tokens": [100]}, "--prompt-tokens 100: longer than --ctx 64"),
        ({"attn": ["mla"]}, "--attn mla"),
        ({"dtypes": ["int3"]}, "--dtype int3"),
        ({"bits": [3]}, "--bits 3"),
        ({"vs": "llama.cpp"}, "--vs llama.cpp"),
        ({"vs": "transformers", "bits": [4]}, "--bits 16"),
        ({"repeat": 0}, "--repeat"),
        ({"args": None, "presets": ["8b"]}, "unknown preset '8b'"),
    ],
)
def test_bad_options_are_rejected_before_any_work(change: dict[str, object], message: str) -> None:
    with pytest.raises(Exception, match=message.replace("(", r"\(")) as info:
        run(**change)
    assert info.type.__module__ == "llamactl.errors"


def test_device_cuda_without_cuda_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.resolve_device(None) == (CPU, True)
    with pytest.raises(LlamactlError, match="device cuda: no CUDA device"):
        bench.resolve_device("cuda")


def test_quantized_rows_hold_fewer_weight_bytes() -> None:
    pytest.importorskip("bitsandbytes")
    report = run(bits=[16, 8, 4], dtypes=["bf16"], gen_tokens=[2], prompt_tokens=[4], repeat=1, warmup=0)
    held = {row.bits: row.weight_bytes for row in report.rows}
    assert all(row.status == "ok" and row.avg_ts > 0 for row in report.rows)
    assert held[16] > held[8] > held[4]


# ----------------------------------------------------------------------------- vs transformers


def test_transformers_twin_holds_the_same_weights() -> None:
    pytest.importorskip("transformers")
    args = dataclasses.replace(TINY, n_kv_heads=2)
    model = bench.build_random_model(args, CPU, torch.float32, seed=3)
    twin = bench._HFTwin(bench._Built(model, args, 2, "tiny", "", torch.float32, 16), CPU)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(tokens, 0)
        theirs = twin.model(input_ids=tokens).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # The twin shares every unpermuted tensor instead of copying it.
    assert twin.model.lm_head.weight.data_ptr() == model.output.weight.data_ptr()


def test_transformers_generate_decodes_one_token_per_step_from_the_filled_cache() -> None:
    pytest.importorskip("transformers")
    model = bench.build_random_model(TINY, CPU, torch.float32)
    twin = bench._HFTwin(bench._Built(model, TINY, 2, "tiny", "", torch.float32, 16), CPU)
    seen: list[tuple[int, int]] = []
    twin.model.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append((kw["input_ids"].shape[1], int(kw["position_ids"][0, 0]))), with_kwargs=True
    )
    cache = twin.filled_cache(1, 40, torch.float32, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        twin.generate(torch.zeros(1, 41, dtype=torch.long), cache, 5)
    assert seen == [(1, pos) for pos in range(40, 45)]


def test_vs_transformers_reports_both_and_the_ratio() -> None:
    pytest.importorskip("transformers")
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
        assert row.peak_bytes >= row.weight_bytes + row.kv_bytes


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
