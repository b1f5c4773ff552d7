"""The models a benchmark runs: a preset with random weights made on the device, or a checkpoint.

`describe_model` says what rows report about a model without building it (so a model too big
for the device still gets rows); `build_model` builds it, quantized when the key asks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llamactl.bench.options import BenchOptions, BenchPlan, ModelKey, model_args
from llamactl.config import ModelArgs, get_preset
from llamactl.dtypes import name_of, to_torch
from llamactl.engine import DecodeStep, choose_step
from llamactl.model import Transformer

if TYPE_CHECKING:
    from llamactl.quantize import QuantSpec


@dataclass(frozen=True)
class ModelShape:
    """What a row says about its model."""

    args: ModelArgs  # the shape actually built (after layers / attn)
    full_layers: int  # layers of the preset or checkpoint before any cut
    name: str  # model_type: the preset, "custom-<dim>d", or the checkpoint's directory name
    filename: str  # the checkpoint as given; "" for random weights
    dtype: torch.dtype
    bits: int
    scheme: str | None = None


@dataclass
class BuiltModel:
    """A model ready to benchmark, with what we know about it."""

    model: Transformer
    shape: ModelShape
    step: DecodeStep  # chosen once, after the weights are fused or quantized


def describe_model(plan: BenchPlan, key: ModelKey) -> ModelShape:
    """The shape `key` names, read from the preset or the checkpoint's config (no weights)."""
    opts, dtype = plan.options, to_torch(key.dtype)
    if opts.model is not None:
        from llamactl.checkpoint import open_checkpoint

        args = open_checkpoint(opts.model).args
        return ModelShape(args, args.n_layers, Path(opts.model).name, str(opts.model), dtype, key.bits, key.scheme)
    source = opts.args if opts.args is not None else get_preset(key.preset)  # type: ignore[arg-type]
    name = f"custom-{source.dim}d" if opts.args is not None else str(key.preset)
    return ModelShape(model_args(source, key), source.n_layers, name, "", dtype, key.bits, key.scheme)


def build_model(plan: BenchPlan, key: ModelKey) -> BuiltModel:
    """Build the model `key` names on the plan's device: quantized for bits 8/4, else projections fused."""
    opts, device, dtype = plan.options, plan.device, to_torch(key.dtype)
    quant = quant_spec(key.scheme, dtype)
    if opts.model is not None:
        from llamactl.loading import load_model

        loaded = load_model(opts.model, device=device, dtype=dtype, quant=quant, step=step_kind(opts))
        args = loaded.args
        held = quant or loaded.reader.quant  # a checkpoint stored quantized runs at its own width
        bits, scheme = (held.bits, held.scheme) if held is not None else (key.bits, key.scheme)
        shape = ModelShape(args, args.n_layers, Path(opts.model).name, str(opts.model), dtype, bits, scheme)
        assert loaded.step is not None
        return BuiltModel(loaded.model, shape, loaded.step)
    shape = describe_model(plan, key)
    model = build_random_model(shape.args, device, dtype, opts.seed)
    if quant is not None:
        from llamactl.loading import quantize_model

        quantize_model(model, quant, device)
    else:
        model.fuse_projections()
    return BuiltModel(model, shape, choose_step(model, step_kind(opts)))


def step_kind(opts: BenchOptions) -> str:
    """The decode step kind the options ask for (--compile, --no-compile, else "auto")."""
    return "auto" if opts.compile is None else "compiled" if opts.compile else "eager"


def build_random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A Transformer with random weights made directly on `device` (meta construction, no CPU copy)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    bound = 0.02 * 3**0.5  # uniform with sd 0.02: three times faster than normal_ on a CPU
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.uniform_(-bound, bound, generator=generator)
    model.reset_rope(args.max_seq_len)  # to_empty left the rotary tables uninitialised
    return model.eval()


def quant_spec(scheme: str | None, dtype: torch.dtype) -> QuantSpec | None:
    """The registered scheme `key.scheme` names (None: unquantized), as `load_model(quant=...)` applies it.

    bitsandbytes' 4-bit computes in the benchmark's dtype; the native schemes keep their own
    compute dtype (bf16: their kernels are never run in fp32 unless asked).
    """
    if scheme is None:
        return None
    from llamactl.quantize import get_scheme

    spec = get_scheme(scheme)
    if spec.method == "bitsandbytes" and spec.bits == 4:
        spec = dataclasses.replace(spec, compute_dtype=name_of(dtype))
    return spec
