"""llamactl.quantize / quantize_run against bitsandbytes' own modules and transformers' bnb integration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llamactl.checkpoint import open_checkpoint
from llamactl.checkpoint.keymap import permute_for_hf
from llamactl.loading import build_model
from llamactl.quantize import (
    QuantizedLinear,
    QuantSpec,
    build_quantized_model,
    checkpoint_quant_stats,
    dequantize_parts,
    quantize_model,
    quantize_tensor,
)
from llamactl.quantize_run import eval_tokens, evaluate_quality, plan_quantize, run_quantize
from tests._quantize_util import bnb_args, bnb_config, hf_load, hf_src, meta_src, read_safetensors

bnb = pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")


def _weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / shape[1] ** 0.5
    w[3, 5] = 0.9  # an outlier, so scales differ per row / block
    return w.to(dtype)


def _bnb_module_state(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """What bitsandbytes' own Linear8bitLt / Linear4bit serialize after quantizing `weight`."""
    out_f, in_f = weight.shape
    if spec.bits == 8:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compress_statistics=spec.double_quant, quant_type=spec.quant_type
        )
        layer.weight.blocksize = spec.blocksize
    layer.weight = type(layer.weight)(
        weight.clone(),
        requires_grad=False,
        **{
            k: v
            for k, v in layer.weight.__dict__.items()
            if k in ("has_fp16_weights", "blocksize", "compress_statistics", "quant_type", "quant_storage", "module")
        },
    )
    layer = layer.to("cpu")  # quantization happens on .to(device), as in bitsandbytes' docs
    return {k: v for k, v in layer.state_dict().items()}


SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=4, quant_type="nf4", double_quant=True),
    QuantSpec(bits=4, quant_type="nf4", double_quant=False, blocksize=128),
    QuantSpec(bits=4, quant_type="fp4", double_quant=True, blocksize=32),
    QuantSpec(bits=4, quant_type="fp4", double_quant=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scheme}-dq{int(s.double_quant)}-b{s.blocksize}")
def test_tensor_bytes_equal_bitsandbytes_modules(spec: QuantSpec, dtype: torch.dtype) -> None:
    weight = _weight((96, 160), dtype)
    ours = quantize_tensor(weight, spec, CPU)
    ref = _bnb_module_state(weight, spec)
    assert sorted(ours) == sorted(ref)
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scheme}-dq{int(s.double_quant)}-b{s.blocksize}")
def test_dequantize_equals_bitsandbytes(spec: QuantSpec) -> None:
    weight = _weight((64, 172), torch.float32)  # 172: not a multiple of any block size
    parts = quantize_tensor(weight, spec, CPU)
    ours = dequantize_parts(parts)
    if spec.bits == 8:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.half())
        ref = bnb.functional.int8_vectorwise_dequant(cb, scb)
        assert (ours - weight).abs().max() <= weight.abs().max() / 127  # one int8 step of the row absmax
    else:
        packed, state = bnb.functional.quantize_4bit(
            weight, blocksize=spec.blocksize, quant_type=spec.quant_type, compress_statistics=spec.double_quant
        )
        ref = bnb.functional.dequantize_4bit(packed, state)
        assert (ours - weight).abs().max() < 0.5 * weight.abs().max()
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, weight)


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoint_equals_what_transformers_saves(tmp_path: Path, bits: int) -> None:
    """transformers quantizes the same fp32 checkpoint itself; every saved tensor must match ours."""
    src = hf_src(tmp_path / "src")
    theirs = tmp_path / "theirs"
    hf_load(src, quantization_config=bnb_config(bits)).save_pretrained(theirs)
    ours = tmp_path / "ours"
    run_quantize(plan_quantize(src, ours, QuantSpec(bits=bits), device="cpu"))
    a, b = read_safetensors(ours), read_safetensors(theirs)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ours_cfg = json.loads((ours / "config.json").read_text())["quantization_config"]
    theirs_cfg = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert ours_cfg == theirs_cfg


@pytest.mark.parametrize("bits", [8, 4])
def test_transformers_loads_ours_and_logits_agree(tmp_path: Path, bits: int) -> None:
    """Meta SRC (q/k permuted before quantizing); transformers+bnb vs llamactl on CPU.

    Both run bitsandbytes' own kernels on identical bytes, so the tolerance only covers the
    two models' attention / rotary arithmetic in fp32: 1e-4 absolute on logits of size ~4.
    """
    src = meta_src(tmp_path / "src")
    dst = tmp_path / "q"
    run_quantize(plan_quantize(src, dst, QuantSpec(bits=bits), device="cpu"))
    hf = hf_load(dst)
    layer = hf.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    tokens = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    ours_model = build_quantized_model(open_checkpoint(dst), CPU, torch.float32)
    with torch.inference_mode():
        ref = hf(tokens).logits.float()
        ours = ours_model(tokens, 0)
        fp = build_model(open_checkpoint(src), CPU, torch.float32)(tokens, 0)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (ours - fp).abs().max() > 1e-3  # quantization really happened


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_equals_quantized_checkpoint(tmp_path: Path, bits: int) -> None:
    src = meta_src(tmp_path / "src")
    dst = tmp_path / "q"
    spec = QuantSpec(bits=bits)
    run_quantize(plan_quantize(src, dst, spec, device="cpu"))
    model = build_model(open_checkpoint(src), CPU, torch.float32)
    assert quantize_model(model, spec, CPU) == 14
    assert isinstance(model.layers[1].attention.wk, QuantizedLinear)
    tokens = torch.arange(1, 25).view(1, -1)
    with torch.inference_mode():
        a = model(tokens, 0)
        b = build_quantized_model(open_checkpoint(dst), CPU, torch.float32)(tokens, 0)
    assert torch.equal(a, b)


def _nf4_tensor_bytes(n: int, blocksize: int, qs_json_len: int) -> int:
    """nf4 + double quant: n/2 packed bytes, one uint8 scale per block, fp32 constants."""
    blocks = math.ceil(n / blocksize)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 16 + 4 * 256 + qs_json_len


def test_report_numbers_checked_independently(tmp_path: Path, tiny_tokenizer: Path) -> None:
    args = bnb_args()
    src = meta_src(tmp_path / "src", tokenizer=tiny_tokenizer, args=args)
    dst = tmp_path / "q"
    plan = plan_quantize(src, dst, QuantSpec(bits=4, compute_dtype="fp32"), device="cpu")
    stats = run_quantize(plan)
    # sizes: from SRC's own state dict and DST's safetensors, read by their libraries
    src_state = torch.load(src / "consolidated.00.pth", weights_only=True)
    dst_state = read_safetensors(dst)
    assert stats.bytes_before == sum(t.numel() * t.element_size() for t in src_state.values())
    assert stats.bytes_after == sum(t.numel() * t.element_size() for t in dst_state.values())
    linear = {k: v for k, v in src_state.items() if ".attention.w" in k or ".feed_forward.w" in k}
    assert (stats.tensors_quantized, stats.params_quantized) == (len(linear), sum(v.numel() for v in linear.values()))
    qs = {k: v for k, v in dst_state.items() if k.endswith("bitsandbytes__nf4")}
    per_tensor = []
    for key, packed in dst_state.items():
        if key.endswith(".weight") and packed.dtype == torch.uint8:
            numel = json.loads(bytes(qs[key + ".quant_state.bitsandbytes__nf4"].tolist()))["shape"]
            per_tensor.append((math.prod(numel), qs[key + ".quant_state.bitsandbytes__nf4"].numel()))
    expected = sum(_nf4_tensor_bytes(n, 64, j) for n, j in per_tensor)
    assert stats.quantized_bytes_after == expected
    assert stats.bits_per_weight == pytest.approx(8 * expected / sum(n for n, _ in per_tensor), rel=1e-12)
    on_disk = checkpoint_quant_stats(open_checkpoint(dst).files)
    assert (on_disk.params_quantized, on_disk.quantized_bytes_after) == (stats.params_quantized, expected)
    # quality: transformers runs both models; perplexity / agreement / KL computed here by hand
    tokens = eval_tokens(plan.reader, "Once upon a time there was a little llama named Lily. " * 3)
    quality = evaluate_quality(src, dst, tokens, device="cpu")
    hf_fp, hf_q = hf_load(_as_hf(src, tmp_path / "src-hf")), hf_load(dst)
    for module in hf_q.modules():  # bnb's AVX512 CPU kernel computes in bf16 despite fp32 compute_dtype
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.inference_mode():
        lp_fp = torch.log_softmax(hf_fp(tokens.view(1, -1)).logits[0, :-1].double(), -1)
        lp_q = torch.log_softmax(hf_q(tokens.view(1, -1)).logits[0, :-1].double(), -1)
    target = tokens[1:]
    ppl = lambda lp: math.exp(torch.nn.functional.nll_loss(lp, target).item())  # noqa: E731
    kl = torch.nn.functional.kl_div(lp_q, lp_fp, log_target=True, reduction="batchmean").item()
    assert quality.tokens == len(target)
    assert quality.perplexity_before == pytest.approx(ppl(lp_fp), rel=1e-5)
    assert quality.perplexity_after == pytest.approx(ppl(lp_q), rel=1e-5)
    assert quality.mean_kl == pytest.approx(kl, rel=1e-4)
    assert quality.top1_agreement == pytest.approx((lp_fp.argmax(-1) == lp_q.argmax(-1)).double().mean().item())
    assert quality.mean_kl > 0 and quality.perplexity_after != quality.perplexity_before


def _as_hf(meta_dir: Path, out: Path) -> Path:
    """The unquantized SRC as an HF checkpoint written by transformers (independent of llamactl)."""
    from tests._ckpt import write_hf_checkpoint

    args = bnb_args()
    state = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    return write_hf_checkpoint(out, args, state)


def test_skip_keeps_float_and_transformers_agrees(tmp_path: Path) -> None:
    src = hf_src(tmp_path / "src")
    dst = tmp_path / "q"
    plan = plan_quantize(src, dst, QuantSpec(bits=8), skip=["layers.1.*", "*.down_proj", "nothing*"], device="cpu")
    assert plan.unmatched_skip == ["nothing*"]
    stats = run_quantize(plan)
    assert stats.tensors_quantized == 14 - 7 - 1
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert "lm_head" in config["llm_int8_skip_modules"]
    assert "model.layers.0.mlp.down_proj" in config["llm_int8_skip_modules"]
    hf = hf_load(dst)
    assert type(hf.model.layers[1].self_attn.q_proj).__name__ == "Linear"
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    tokens = torch.arange(3, 19).view(1, -1)
    with torch.inference_mode():
        torch.testing.assert_close(
            build_quantized_model(open_checkpoint(dst), CPU, torch.float32)(tokens, 0),
            hf(tokens).logits.float(),
            atol=1e-4,
            rtol=0,
        )


def test_permutation_is_applied_before_quantizing(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    dst = tmp_path / "q"
    run_quantize(plan_quantize(src, dst, QuantSpec(bits=4), device="cpu"))
    wq = torch.load(src / "consolidated.00.pth", weights_only=True)["layers.0.attention.wq.weight"]
    saved = read_safetensors(dst)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(saved, quantize_tensor(permute_for_hf(wq, 4), QuantSpec(bits=4))["weight"])
    assert not torch.equal(saved, quantize_tensor(wq, QuantSpec(bits=4))["weight"])


def test_stories260k_int8_greedy_matches_golden_start(stories_dir: Path, tmp_path: Path) -> None:
    """The real trained model, int8: greedy decoding still tells llama2.c's golden story."""
    from llamactl.generate import SamplingParams, generate
    from llamactl.tokenizer import Tokenizer

    dst = tmp_path / "q8"
    run_quantize(plan_quantize(stories_dir, dst, QuantSpec(bits=8), device="cpu"))
    model = build_quantized_model(open_checkpoint(dst), CPU, torch.float32)
    tok = Tokenizer(dst / "tokenizer.model")
    ids = list(generate(model, [tok.bos_id], sampling=SamplingParams(temperature=0.0), max_new_tokens=16))
    assert tok.decode(ids).startswith("Once upon a time, there was a little girl named Lily.")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scheme}-dq{int(s.double_quant)}-b{s.blocksize}")
def test_cuda_quantization_equals_bitsandbytes_modules_on_cuda(spec: QuantSpec) -> None:
    weight = _weight((96, 160), torch.bfloat16)
    ours = quantize_tensor(weight, spec, "cuda")
    out_f, in_f = weight.shape
    if spec.bits == 8:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compress_statistics=spec.double_quant, quant_type=spec.quant_type
        )
        layer.weight.blocksize = spec.blocksize
    layer.weight.data = weight.clone()
    ref = {k: v.cpu() for k, v in layer.to("cuda").state_dict().items()}
    assert sorted(ours) == sorted(ref)
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_transformers_and_llamactl_agree(tmp_path: Path, bits: int) -> None:
    """On CUDA, fp32 activations: the same bnb kernels on the same bytes.

    Tolerance 2e-2: the models' attention arithmetic differs by ~1e-6, which can flip an int8
    activation rounding (int8) or a bf16 compute rounding (4-bit) in a few places.
    Quantize-on-load from the same fp32 weights gives the same bytes, hence equal logits.
    """
    src = meta_src(tmp_path / "src")
    dst = tmp_path / "q"
    run_quantize(plan_quantize(src, dst, QuantSpec(bits=bits), device="cuda"))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(dst, device_map="cuda", dtype=torch.float32).eval()
    ours = build_quantized_model(open_checkpoint(dst), torch.device("cuda"), torch.float32)
    onload = build_model(open_checkpoint(src), torch.device("cuda"), torch.float32)
    quantize_model(onload, QuantSpec(bits=bits), "cuda")
    tokens = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        ref = hf(tokens).logits.float()
        a, b = ours(tokens, 0), onload(tokens, 0)
        fp = build_model(open_checkpoint(src), torch.device("cuda"), torch.float32)(tokens, 0)
    torch.testing.assert_close(a, ref, atol=2e-2, rtol=0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - fp).abs().max() > 5e-2  # quantization really happened
