"""The quantization report: sizes from the written files, quality recomputed with transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llamactl.checkpoint import open_checkpoint
from llamactl.convert import plan_convert, run_convert
from llamactl.evaluate import eval_tokens, evaluate_quality
from llamactl.quantize import QuantSpec
from llamactl.quantize.quality import QuantStats
from tests._quantize_util import bnb_args, hf_load, meta_src, read_safetensors


def test_report_numbers_checked_independently(tmp_path: Path, tiny_tokenizer: Path) -> None:
    args = bnb_args()
    src = meta_src(tmp_path / "src", tokenizer=tiny_tokenizer, args=args)
    dst = tmp_path / "q"
    plan = plan_convert(src, dst, quant=QuantSpec("nf4", compute_dtype="fp32"), device="cpu")
    run_convert(plan)
    stats = QuantStats.compare(plan.source.tensor_infos(), open_checkpoint(dst).tensor_infos())
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
    infos = open_checkpoint(dst).tensor_infos()
    on_disk = QuantStats.compare(infos, infos)
    assert (on_disk.params_quantized, on_disk.quantized_bytes_after) == (stats.params_quantized, expected)
    # quality: transformers runs both models; perplexity / agreement / KL computed here by hand
    tokens = eval_tokens(plan.source, "Once upon a time there was a little llama named Lily. " * 3)
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


def _nf4_tensor_bytes(n: int, blocksize: int, qs_json_len: int) -> int:
    """nf4 + double quant: n/2 packed bytes, one uint8 scale per block, fp32 constants."""
    blocks = math.ceil(n / blocksize)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 16 + 4 * 256 + qs_json_len


def _as_hf(meta_dir: Path, out: Path) -> Path:
    """The unquantized SRC as an HF checkpoint written by transformers (independent of llamactl)."""
    from tests._ckpt import write_hf_checkpoint

    args = bnb_args()
    state = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    return write_hf_checkpoint(out, args, state)
