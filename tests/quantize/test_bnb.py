"""The bitsandbytes backend against bitsandbytes' own modules and functions."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from llamactl.quantize import QuantSpec
from llamactl.quantize.bnb import dequantize_parts, quantize_tensor
from llamactl.rotary import permute_for_hf
from tests._quantize_util import meta_src, quantize_to, read_safetensors

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
            in_f, out_f, bias=False, compress_statistics=spec.double_quant, quant_type=spec.scheme
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
    QuantSpec("int8"),
    QuantSpec("nf4", double_quant=True),
    QuantSpec("nf4", double_quant=False, blocksize=128),
    QuantSpec("fp4", double_quant=True, blocksize=32),
    QuantSpec("fp4", double_quant=False),
]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
            weight, blocksize=spec.blocksize, quant_type=spec.scheme, compress_statistics=spec.double_quant
        )
        ref = bnb.functional.dequantize_4bit(packed, state)
        assert (ours - weight).abs().max() < 0.5 * weight.abs().max()
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, weight)


def test_permutation_is_applied_before_quantizing(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    dst = tmp_path / "q"
    quantize_to(src, dst, QuantSpec("nf4"), device="cpu")
    wq = torch.load(src / "consolidated.00.pth", weights_only=True)["layers.0.attention.wq.weight"]
    saved = read_safetensors(dst)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(saved, quantize_tensor(permute_for_hf(wq, 4), QuantSpec("nf4"))["weight"])
    assert not torch.equal(saved, quantize_tensor(wq, QuantSpec("nf4"))["weight"])


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
            in_f, out_f, bias=False, compress_statistics=spec.double_quant, quant_type=spec.scheme
        )
        layer.weight.blocksize = spec.blocksize
    layer.weight.data = weight.clone()
    ref = {k: v.cpu() for k, v in layer.to("cuda").state_dict().items()}
    assert sorted(ours) == sorted(ref)
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key
