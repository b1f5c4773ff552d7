"""llamactl.bench.options: device defaults, the typed model keys, and the one validation of a run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamactl import bench
from llamactl.bench import options as bench_options
from llamactl.bench import runner
from llamactl.bench.options import BenchOptions, CacheConfig, ModelKey, plan_bench
from llamactl.devices import resolve_device
from llamactl.errors import LlamactlError, UsageError
from tests.bench._util import CPU, TINY, run, tiny_options


def test_cpu_defaults_shrink_only_what_was_not_given() -> None:
    opts = bench.apply_device_defaults(bench.BenchOptions(), CPU)
    assert (opts.layers, opts.gen_tokens, opts.repeat, opts.dtypes) == ([2], [32], 3, ["fp32"])
    given = bench.apply_device_defaults(bench.BenchOptions(layers=[4], gen_tokens=[128], repeat=5), CPU)
    assert (given.layers, given.gen_tokens, given.repeat) == ([4], [128], 5)
    gpu = bench.apply_device_defaults(bench.BenchOptions(), torch.device("cuda"))
    assert (gpu.layers, gpu.gen_tokens, gpu.repeat, gpu.dtypes) == ([None], [128], 5, ["bf16"])


def test_a_checkpoint_is_never_cut_to_the_cpu_default_layers() -> None:
    opts = bench.apply_device_defaults(bench.BenchOptions(model="some/model"), CPU)
    assert opts.layers == [None]


def test_kv_heads_must_divide_heads() -> None:
    with pytest.raises(UsageError, match="kv_heads 3: must divide the 8 attention heads"):
        run(attn=["gqa"], kv_heads=[3])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt_tokens": [100]}, "prompt_tokens 100: longer than ctx 64"),
        ({"attn": ["mla"]}, "attn mla"),
        ({"dtypes": ["int3"]}, "dtype int3"),
        ({"bits": [3]}, "bits 3"),
        ({"schemes": ["q5"]}, "scheme q5: unknown"),
        ({"vs": "transformers", "schemes": ["q4"]}, "bits 16"),
        ({"vs": "llama.cpp"}, "vs llama.cpp"),
        ({"vs": "transformers", "bits": [4]}, "bits 16"),
        ({"repeat": 0}, "repeat 0: must be at least 1"),
        ({"args": None, "presets": ["8b"]}, "unknown preset '8b'"),
    ],
)
def test_bad_options_are_rejected_before_any_work(change: dict[str, object], message: str) -> None:
    with pytest.raises(Exception, match=message.replace("(", r"\(")) as info:
        run(**change)
    assert info.type.__module__ == "llamactl.errors"


def test_device_cuda_without_cuda_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == (CPU, True)
    with pytest.raises(LlamactlError, match="device cuda: no CUDA device"):
        resolve_device("cuda")
    # plan_bench resolves the device the same way and remembers that it fell back.
    plan = plan_bench(tiny_options())
    assert (plan.device, plan.cpu_fallback) == (CPU, True)
    with pytest.raises(LlamactlError, match="device cuda: no CUDA device"):
        plan_bench(tiny_options(device="cuda"))


# ----------------------------------------------------------------------------- the plan


def test_plan_fills_the_defaults_on_a_copy() -> None:
    asked = BenchOptions(args=TINY, ctx=[64], prompt_tokens=[8])
    plan = plan_bench(asked, device=CPU)
    assert (plan.options.layers, plan.options.gen_tokens, plan.repeat, plan.options.dtypes) == ([2], [32], 3, ["fp32"])
    assert (asked.layers, asked.gen_tokens, asked.repeat, asked.dtypes) == (None, None, None, None)
    asked.ctx.append(128)  # the caller's lists are not the plan's
    assert plan.options.ctx == [64] and len(plan.configs) == 1


def test_model_keys_are_typed_frozen_and_in_build_order() -> None:
    plan = plan_bench(tiny_options(attn=["mha", "gqa"], kv_heads=[2, 4], dtypes=["fp32", "bf16"]), device=CPU)
    assert all(isinstance(key, ModelKey) for key in plan.models)
    assert [(k.attn, k.gqa_heads, k.dtype) for k in plan.models] == [
        ("mha", 2, "fp32"),
        ("mha", 2, "bf16"),
        ("mha", 4, "fp32"),
        ("mha", 4, "bf16"),
        ("gqa", 2, "fp32"),
        ("gqa", 2, "bf16"),
        ("gqa", 4, "fp32"),
        ("gqa", 4, "bf16"),
    ]
    key = plan.models[0]
    assert (key.preset, key.bits, key.layers) == (None, 16, None)  # a custom shape, not a preset
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.attn = "mqa"  # type: ignore[misc]


def test_kv_heads_is_an_axis_only_when_a_variant_is_gqa() -> None:
    plan = plan_bench(tiny_options(attn=["mha", "mqa"], kv_heads=[2, 4]), device=CPU)
    assert [(k.attn, k.gqa_heads) for k in plan.models] == [("mha", None), ("mqa", None)]


def test_presets_are_one_key_each() -> None:
    plan = plan_bench(BenchOptions(presets=["7b", "70b"], layers=[1], dtypes=["bf16"]), device=CPU)
    assert [(k.preset, k.attn, k.layers) for k in plan.models] == [("7b", "native", 1), ("70b", "native", 1)]


def test_cache_configs_and_their_tests() -> None:
    plan = plan_bench(tiny_options(ctx=[32, 64], batch=[1, 2], prompt_tokens=[0, 8], gen_tokens=[4]), device=CPU)
    assert [(c.ctx, c.batch) for c in plan.configs] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    # A zero length is no test; tg decodes the last positions of the context.
    assert CacheConfig(64, 1, (0, 8), (4,)).tests() == [("pp8", 8, 0, 0), ("tg4 @ d60", 0, 4, 60)]


def test_options_are_validated_once_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[BenchOptions] = []
    real = bench_options._validate
    monkeypatch.setattr(bench_options, "_validate", lambda opts: (calls.append(opts), real(opts))[1])
    run()
    assert len(calls) == 1  # run_bench(BenchOptions) plans, and so validates, once
    plan = plan_bench(tiny_options(), device=CPU)
    assert len(calls) == 2
    bench.run_bench(plan)
    assert len(calls) == 2  # a plan is trusted as it is


def test_a_plan_has_its_device() -> None:
    plan = plan_bench(tiny_options(), device=CPU)
    with pytest.raises(ValueError, match="already has its device"):
        bench.run_bench(plan, device=CPU)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers": [0]}, "layers 0: must be at least 1"),
        ({"ctx": [0]}, "ctx 0: must be at least 1"),
        ({"batch": [0]}, "batch 0: must be at least 1"),
        ({"gen_tokens": [-1]}, "gen_tokens -1: must not be negative"),
        ({"warmup": -1}, "warmup -1: must not be negative"),
        ({"args": dataclasses.replace(TINY, dim=66)}, "dim 66 is not divisible by n_heads 8"),
        ({"model": "some/model", "args": None, "layers": [1]}, "layers 1: only for presets"),
    ],
)
def test_every_check_happens_before_anything_is_measured(
    change: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def measured(*a: object, **kw: object) -> None:
        raise AssertionError("measured before the options were checked")

    monkeypatch.setattr(runner, "describe_environment", measured)
    monkeypatch.setattr(runner, "build_model", measured)
    with pytest.raises(LlamactlError, match=message):
        run(**change)


def test_bits_pick_the_native_schemes_and_schemes_follow() -> None:
    """--bits 8 / 4 mean q8 / q4; named schemes (bitsandbytes' too) join the same axis after them."""
    plan = plan_bench(tiny_options(bits=[16, 8, 4], schemes=["int8", "nf4"]), CPU)
    assert [(k.bits, k.scheme) for k in plan.models] == [(16, None), (8, "q8"), (4, "q4"), (8, "int8"), (4, "nf4")]
