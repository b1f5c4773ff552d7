"""Native q8 / q4 checkpoints: GGUF's bytes under HF names, loaded without re-quantizing."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamactl import layout
from llamactl.checkpoint import open_checkpoint
from llamactl.checkpoint.quantized import DequantizedView
from llamactl.convert import plan_convert, run_convert
from llamactl.errors import CheckpointError, UsageError
from llamactl.loading import load_model
from llamactl.quantize import QuantizedTensor, QuantSpec
from llamactl.quantize.native import NativeLinear
from llamactl.rotary import permute_for_hf
from tests._ckpt import random_meta_state
from tests._quantize_util import bnb_args, meta_src, quantize_to, read_safetensors

GGML = {"q8": gguf.GGMLQuantizationType.Q8_0, "q4": gguf.GGMLQuantizationType.Q4_0}


@pytest.mark.parametrize("scheme", ["q8", "q4"])
def test_stored_bytes_are_ggufs(tmp_path: Path, scheme: str) -> None:
    """Every block projection is gguf.quants.quantize of the source weight (HF rows for wq / wk)."""
    args = bnb_args()
    src = meta_src(tmp_path / "src", args=args)
    state = random_meta_state(args)
    stats = quantize_to(src, tmp_path / "q", QuantSpec(scheme))
    assert stats.tensors_quantized == 7 * args.n_layers
    stored = read_safetensors(tmp_path / "q")
    for name, weight in state.items():
        hf_name = layout.meta_to_hf(name)
        if not layout.is_quantizable(name):
            assert stored[hf_name].dtype == weight.dtype
            continue
        heads = layout.rotary_heads(name, args)
        rows = permute_for_hf(weight, heads) if heads else weight
        assert np.array_equal(stored[hf_name].numpy(), gguf.quants.quantize(rows.numpy(), GGML[scheme])), name
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config == {
        "quant_method": "llamactl",
        "scheme": scheme,
        "bits": int(scheme[1]),
        "group_size": 32,
        "compute_dtype": "bfloat16",
        "modules_to_not_convert": None,
    }


def test_reader_and_load_without_requantizing(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    quantize_to(src, tmp_path / "q", QuantSpec("q4"))
    reader = open_checkpoint(tmp_path / "q")
    assert reader.format == "native" and reader.quant == QuantSpec("q4")
    infos = {i.name: i for i in reader.tensor_infos()}
    wq = infos["layers.0.attention.wq.weight"]
    assert (wq.scheme, wq.shape, wq.stored_bytes) == ("q4", (64, 64), 64 * 2 * 18)
    entries = dict(reader.iter_tensors())
    assert isinstance(entries["layers.0.attention.wk.weight"], QuantizedTensor)
    assert entries["layers.0.attention.wk.weight"].row_heads == 2
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        saved = load_model(tmp_path / "q", device="cpu")
        on_load = load_model(src, device="cpu", quant=QuantSpec("q4"))
        assert saved.dtype == torch.bfloat16  # the native compute dtype, never fp32 by default
        assert any(isinstance(m, NativeLinear) for m in saved.model.modules())
        assert torch.equal(saved.model(tokens), on_load.model(tokens))


def test_group_size_and_unfit_shapes(tmp_path: Path) -> None:
    """q4 g64; a 176-wide FFN cannot be blocked in w2 (in = 176): kept unquantized and listed."""
    from tests._ckpt import tiny_args

    args = tiny_args(gqa=True)  # FFN 176
    src = meta_src(tmp_path / "src", args=args)
    spec = QuantSpec("q4", group_size=64)
    plan = plan_convert(src, tmp_path / "q", quant=spec)
    assert plan.quantized is not None and sorted(plan.quantized.unfit) == [
        f"layers.{i}.feed_forward.w2.weight" for i in range(args.n_layers)
    ]
    run_convert(plan)
    reader = open_checkpoint(tmp_path / "q")
    assert reader.quant == spec
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["modules_to_not_convert"] == [f"model.layers.{i}.mlp.down_proj" for i in range(args.n_layers)]
    assert read_safetensors(tmp_path / "q")["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    load_model(tmp_path / "q", device="cpu").model(torch.tensor([[1, 2, 3]]))


def test_native_to_native_keeps_bytes_and_other_targets_refuse(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    quantize_to(src, tmp_path / "q", QuantSpec("q8"))
    run_convert(plan_convert(tmp_path / "q", tmp_path / "copy", "native"))
    a, b = read_safetensors(tmp_path / "q"), read_safetensors(tmp_path / "copy")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # A plain target holds the dequantized weights: exactly what the native kernels compute with.
    run_convert(plan_convert(tmp_path / "q", tmp_path / "hf", "hf"))
    plain = open_checkpoint(tmp_path / "hf")
    assert plain.quant is None
    view = DequantizedView(open_checkpoint(tmp_path / "q"))
    wanted = dict(view.iter_tensors())
    got = dict(plain.iter_tensors())
    assert sorted(wanted) == sorted(got) and all(torch.equal(wanted[k], got[k]) for k in wanted)
    with pytest.raises(CheckpointError, match="already quantized"):
        plan_convert(tmp_path / "q", tmp_path / "qq", quant=QuantSpec("q4"))
    with pytest.raises(UsageError, match="cannot store q4"):
        plan_convert(src, tmp_path / "bnb", "bnb", quant=QuantSpec("q4"))


def test_corrupt_block_rows_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = meta_src(tmp_path / "src")
    quantize_to(src, tmp_path / "q", QuantSpec("q4"))
    file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not rows of 18-byte blocks"):
        open_checkpoint(tmp_path / "q")


@pytest.mark.slow
def test_transformers_refuses_rather_than_misloads(tmp_path: Path) -> None:
    """transformers has no loader for GGML blocks in safetensors: it must fail, not load garbage."""
    from tests._quantize_util import hf_load

    src = meta_src(tmp_path / "src")
    quantize_to(src, tmp_path / "q", QuantSpec("q4"))
    with pytest.raises((ValueError, KeyError, RuntimeError, ImportError)):
        hf_load(tmp_path / "q")
