"""The fused CPU decode step (native kernels) against the plain forward, and its build and fallbacks."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from llamactl.cpu import build as cpu_build
from llamactl.cpu import matvec
from llamactl.cpu.decode import kernels
from llamactl.engine import FUSED_ENV, EagerStep, FusedCpuStep, choose_step, fused_cpu
from llamactl.loading import load_for_generation, quantize_model
from llamactl.model import Transformer
from llamactl.quantize import get_scheme
from tests._ckpt import random_meta_state, tiny_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _need_kernels(dtype: torch.dtype) -> None:
    if kernels(dtype) is None:
        pytest.skip(f"no native decode kernels for {dtype} here (no C++ compiler, or it lacks that type)")


def _pair(dtype: torch.dtype, gqa: bool = True, **overrides: object) -> tuple[Transformer, Transformer]:
    """Two models with the same random weights: the plain reference and the one the fused step runs."""
    args = tiny_args(gqa=gqa, **overrides)
    state = random_meta_state(args, seed=3)
    out = []
    for _ in range(2):
        model = Transformer(args).eval()
        model.load_state_dict(state)
        out.append(model.to(dtype))
    return out[0], out[1]


def _teacher_forced(
    plain: Transformer, model: Transformer, step: object, prompt: torch.Tensor, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(plain logits, step logits) for `steps` positions, both fed the plain model's greedy tokens."""
    pairs = []
    with torch.inference_mode():
        for m in (plain, model):
            m.setup_cache(1, prompt.shape[1] + steps + 1)
            m(prompt, 0)
        token, pos = prompt[:, -1:], prompt.shape[1]
        for _ in range(steps):
            want = plain(token, pos).clone()
            got = step(token, pos).clone()  # type: ignore[operator]
            pairs.append((want, got))
            token, pos = want[:, -1].argmax(-1, keepdim=True), pos + 1
    return pairs


def _spread(logits: torch.Tensor) -> float:
    return (logits.max() - logits.min()).item()


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_fused_step_gives_the_plain_forwards_logits(dtype_name: str, gqa: bool) -> None:
    dtype = DTYPES[dtype_name]
    _need_kernels(dtype)
    plain, model = _pair(dtype, gqa=gqa)
    step = choose_step(model.fuse_projections(), "eager")
    assert isinstance(step, FusedCpuStep) and step.kind == "fused"
    # bf16 / fp32 projections on the native matvec (where built) write straight into the step's buffers
    direct = matvec.dense_available(dtype)
    assert {p.direct for layer in step.layers for p in (layer.qkv, layer.wo, layer.gate_up, layer.w2)} == {direct}
    prompt = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    # fp32: the same arithmetic in another summation order; 16-bit: a rounding apart after 2 layers
    tolerance = 1e-5 if dtype == torch.float32 else 0.02
    for want, got in _teacher_forced(plain, model, step, prompt, 12):
        assert got.dtype == torch.float32 and got.shape == want.shape == (1, 1, 320)
        assert (got - want).abs().max().item() <= tolerance * _spread(want)


@pytest.mark.parametrize("scheme", ["q4", "q8", "int8"])
def test_fused_step_runs_every_weight_scheme(scheme: str) -> None:
    """Quantized projections are the model's own modules: joined kernels (q4/q8) or separate
    bitsandbytes layers (int8), whose outputs the step joins itself."""
    _need_kernels(torch.bfloat16)
    plain, model = _pair(torch.bfloat16, dim=128, n_heads=4, n_kv_heads=2, multiple_of=64)
    for m in (plain, model):
        quantize_model(m, get_scheme(scheme), "cpu")
        m.fuse_projections()
    step = choose_step(model, "eager")
    assert isinstance(step, FusedCpuStep)
    assert model.layers[0].attention.fused == (scheme != "int8")  # bitsandbytes' parts stay apart
    # q4 / q8 on the native matvec (where built) write straight into the step's buffers
    direct = scheme != "int8" and matvec.available(int(scheme[1]), torch.bfloat16)
    assert {p.direct for layer in step.layers for p in (layer.qkv, layer.wo, layer.gate_up, layer.w2)} == {direct}
    prompt = torch.randint(0, 320, (1, 5), generator=torch.Generator().manual_seed(1))
    for want, got in _teacher_forced(plain, model, step, prompt, 8):
        assert (got - want).abs().max().item() <= 0.02 * _spread(want)


def test_a_projections_forward_hooks_still_run() -> None:
    """Tensor parallel adds its all-reduce after wo and w2 as forward hooks: a q4 projection the
    step would run straight into its buffer runs through its module while it has one."""
    _need_kernels(torch.bfloat16)
    plain, model = _pair(torch.bfloat16, dim=128, n_heads=4, n_kv_heads=2, multiple_of=64)
    for m in (plain, model):
        quantize_model(m, get_scheme("q4"), "cpu")
        m.fuse_projections()
        m.layers[1].feed_forward.w2.register_forward_hook(lambda _m, _a, out: out * 3)
    step = choose_step(model, "eager")
    prompt = torch.randint(0, 320, (1, 5), generator=torch.Generator().manual_seed(4))
    for want, got in _teacher_forced(plain, model, step, prompt, 6):
        assert (got - want).abs().max().item() <= 0.02 * _spread(want)


@pytest.mark.parametrize("shared", [False, True])
def test_long_attention_goes_to_torch_unless_the_kernel_has_torchs_threads(
    monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    """A kernel library without torch's OpenMP pool (one thread) hands attention past ATTEND_LIMIT
    to torch's threaded SDPA; one on torch's threads keeps it. The logits agree either way."""
    _need_kernels(torch.float32)
    if shared and not cpu_build.shares_torch_threads():
        pytest.skip("the kernels do not share torch's threads here (no OpenMP build, or another runtime)")
    plain, model = _pair(torch.float32)
    step = choose_step(model.fuse_projections(), "eager")
    prompt = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    limit = 12 * model.args.n_heads * model.args.head_dim  # positions 0..11 in the kernel, then torch
    monkeypatch.setattr(fused_cpu, "ATTEND_LIMIT", limit)
    if not shared:
        monkeypatch.setattr(fused_cpu, "cpu_threads", lambda: 1)
    calls, torch_attend = [], fused_cpu.attend
    monkeypatch.setattr(fused_cpu, "attend", lambda *a: calls.append(1) or torch_attend(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for want, got in _teacher_forced(plain, model, step, prompt, 8):
            assert (got - want).abs().max().item() <= 1e-5 * _spread(want)
    finally:
        torch.set_num_threads(before)
    assert len(calls) == (0 if shared else 5 * model.args.n_layers)  # positions 12..16, in every layer


def test_what_the_kernels_do_not_cover_runs_the_plain_forward() -> None:
    """A batch, several tokens at once, a position past the cache: the plain forward, its errors."""
    _need_kernels(torch.float32)
    plain, model = _pair(torch.float32)
    step = choose_step(model.fuse_projections(), "eager")
    tokens = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for m in (plain, model):
            m.setup_cache(2, 8)
            m(tokens, 0)
        # the plain forward with the step's (oneDNN-packed) linears: fp32 to rounding
        torch.testing.assert_close(step(tokens[:, :1], 6), plain(tokens[:, :1], 6), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="exceed the KV cache"):
            step(tokens[:1, :1], 8)


def test_stories260k_fused_reproduces_llama2c_golden_output(stories_dir: Path) -> None:
    """An outside oracle: llama2.c's greedy output for stories260K, 200 steps, every one fused."""
    readme = (stories_dir.parent / "README.md").read_text()
    golden = re.search(r"prints exactly:\n\n```\n(.*?)\n```", readme, re.S).group(1)  # type: ignore[union-attr]
    _need_kernels(torch.float32)
    loaded, tok = load_for_generation(stories_dir, device="cpu", dtype="fp32")
    assert isinstance(loaded.step, FusedCpuStep)
    model = loaded.model
    model.setup_cache(1, 201)
    ids, token = [], torch.tensor([[tok.bos_id]])
    with torch.inference_mode():
        for pos in range(200):
            token = loaded.step(token, pos)[:, -1].argmax(-1, keepdim=True)
            ids.append(int(token))
    assert tok.decode(ids) == golden


def test_no_compiler_means_torch_operators_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cpu_build, "_LOADED", {})
    monkeypatch.setenv(cpu_build.CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    _, model = _pair(torch.float32)
    with caplog.at_level(logging.WARNING, logger="llamactl.cpu.build"):
        step = choose_step(model.fuse_projections(), "eager")
        choose_step(model, "eager")
    assert type(step) is EagerStep
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "native CPU kernels unavailable" in warnings[0], warnings
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").glob("*.so"))


def test_a_build_is_cached_and_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Built once into the kernel cache (nothing else left there); a later process loads that file."""
    if cpu_build.load() is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv(cpu_build.CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.setattr(cpu_build, "_LOADED", {})
    assert cpu_build.load() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no staging directory left behind
    first = built[0].stat()
    monkeypatch.setattr(cpu_build, "_LOADED", {})
    assert cpu_build.load() is not None
    again = built[0].stat()
    assert list((tmp_path / "kernels").iterdir()) == built
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rebuilt


def test_opting_out_keeps_torch_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = _pair(torch.float32)
    monkeypatch.setenv(FUSED_ENV, "0")
    assert type(choose_step(model.fuse_projections(), "eager")) is EagerStep
