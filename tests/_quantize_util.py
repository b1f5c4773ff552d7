"""Helpers for the quantize tests: tiny checkpoints and transformers' own bitsandbytes path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llamactl.config import ModelArgs
from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint


def bnb_args(**overrides: Any) -> ModelArgs:
    """A tiny GQA shape bitsandbytes' CPU kernels accept everywhere (FFN 192: a multiple of 32 and 64)."""
    return tiny_args(gqa=True, multiple_of=32, **overrides)


def meta_src(path: Path, tokenizer: Path | None = None, seed: int = 0, args: ModelArgs | None = None) -> Path:
    args = args or bnb_args()
    return write_meta_checkpoint(path, args, random_meta_state(args, seed=seed), tokenizer=tokenizer)


def hf_src(path: Path, seed: int = 0, args: ModelArgs | None = None) -> Path:
    args = args or bnb_args()
    return write_hf_checkpoint(path, args, random_meta_state(args, seed=seed))


def bnb_config(bits: int, quant_type: str = "nf4", double_quant: bool = True) -> Any:
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def hf_load(path: Path, **kwargs: Any) -> Any:
    """transformers' AutoModelForCausalLM on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs).eval()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a directory, read by the safetensors library."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


def bnb_spec(bits: int) -> Any:
    """bitsandbytes' scheme of that width, named explicitly (`--bits` now picks q8 / q4)."""
    from llamactl.quantize import QuantSpec

    return QuantSpec({8: "int8", 4: "nf4"}[bits])


def quantize_to(src: Path, dst: Path, spec: Any, device: str = "cpu", skip: tuple[str, ...] = ()) -> Any:
    """`llamactl quantize` as a library call: convert with a scheme; returns its QuantStats."""
    from llamactl.checkpoint import open_checkpoint
    from llamactl.convert import plan_convert, run_convert
    from llamactl.quantize.quality import QuantStats

    plan = plan_convert(src, dst, quant=spec, skip=skip, device=device)
    run_convert(plan)
    assert plan.quantized is not None
    return QuantStats.compare(plan.source.tensor_infos(), open_checkpoint(dst).tensor_infos(), plan.quantized.skipped)
