"""bnb checkpoints: what transformers saves and loads, read back through the reader protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamactl.checkpoint import open_checkpoint
from llamactl.convert import plan_convert, run_convert
from llamactl.loading import build_model, quantize_model
from llamactl.quantize import QuantSpec
from llamactl.quantize.bnb import QuantizedLinear
from llamactl.quantize.quality import QuantStats
from tests._quantize_util import bnb_config, bnb_spec, hf_load, hf_src, meta_src, quantize_to, read_safetensors

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoint_equals_what_transformers_saves(tmp_path: Path, bits: int) -> None:
    """transformers quantizes the same fp32 checkpoint itself; every saved tensor must match ours."""
    src = hf_src(tmp_path / "src")
    theirs = tmp_path / "theirs"
    hf_load(src, quantization_config=bnb_config(bits)).save_pretrained(theirs)
    ours = tmp_path / "ours"
    quantize_to(src, ours, bnb_spec(bits), device="cpu")
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
    quantize_to(src, dst, bnb_spec(bits), device="cpu")
    hf = hf_load(dst)
    layer = hf.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    tokens = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    ours_model = build_model(open_checkpoint(dst), CPU, torch.float32)
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
    spec = bnb_spec(bits)
    quantize_to(src, dst, spec, device="cpu")
    model = build_model(open_checkpoint(src), CPU, torch.float32)
    assert quantize_model(model, spec, CPU) == 14
    assert isinstance(model.layers[1].attention.wk, QuantizedLinear)
    tokens = torch.arange(1, 25).view(1, -1)
    with torch.inference_mode():
        a = model(tokens, 0)
        b = build_model(open_checkpoint(dst), CPU, torch.float32)(tokens, 0)
    assert torch.equal(a, b)


def test_skip_keeps_float_and_transformers_agrees(tmp_path: Path) -> None:
    src = hf_src(tmp_path / "src")
    dst = tmp_path / "q"
    plan = plan_convert(src, dst, quant=QuantSpec("int8"), skip=["layers.1.*", "*.down_proj", "nothing*"], device="cpu")
    assert plan.quantized is not None and plan.quantized.unmatched_skip == ["nothing*"]
    run_convert(plan)
    stats = QuantStats.compare(plan.source.tensor_infos(), open_checkpoint(dst).tensor_infos())
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
            build_model(open_checkpoint(dst), CPU, torch.float32)(tokens, 0),
            hf(tokens).logits.float(),
            atol=1e-4,
            rtol=0,
        )


def test_stories260k_int8_greedy_matches_golden_start(stories_dir: Path, tmp_path: Path) -> None:
    """The real trained model, int8: greedy decoding still tells llama2.c's golden story."""
    from llamactl.generate import SamplingParams, generate
    from llamactl.tokenizer import load_tokenizer

    dst = tmp_path / "q8"
    quantize_to(stories_dir, dst, QuantSpec("int8"), device="cpu")
    model = build_model(open_checkpoint(dst), CPU, torch.float32)
    tok = load_tokenizer(dst / "tokenizer.model")
    ids = list(generate(model, [tok.bos_id], sampling=SamplingParams(temperature=0.0), max_new_tokens=16))
    assert tok.decode(ids).startswith("Once upon a time, there was a little girl named Lily.")


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
    quantize_to(src, dst, bnb_spec(bits), device="cuda")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(dst, device_map="cuda", dtype=torch.float32).eval()
    ours = build_model(open_checkpoint(dst), torch.device("cuda"), torch.float32)
    onload = build_model(open_checkpoint(src), torch.device("cuda"), torch.float32)
    quantize_model(onload, bnb_spec(bits), "cuda")
    tokens = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        ref = hf(tokens).logits.float()
        a, b = ours(tokens, 0), onload(tokens, 0)
        fp = build_model(open_checkpoint(src), torch.device("cuda"), torch.float32)(tokens, 0)
    torch.testing.assert_close(a, ref, atol=2e-2, rtol=0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - fp).abs().max() > 5e-2  # quantization really happened
