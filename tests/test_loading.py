"""load_model: device/dtype choice, quantize-on-load, quantized checkpoints, info on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamactl.devices import resolve
from llamactl.errors import CheckpointError, UsageError
from llamactl.loading import load_model
from llamactl.quantize import QuantSpec
from tests._quantize_util import bnb_spec, meta_src, quantize_to
from tests.cli._run import run_cli


def test_auto_device_without_cuda_is_cpu_fp32() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    placement = resolve()
    assert (placement.device, placement.dtype, placement.fell_back) == (torch.device("cpu"), torch.float32, True)
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve("cuda")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_equals_loading_the_quantized_checkpoint(tmp_path: Path, bits: int) -> None:
    src = meta_src(tmp_path / "src")
    quantize_to(src, tmp_path / "q", bnb_spec(bits), device="cpu")
    tokens = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_load = load_model(src, device="cpu", quant=bnb_spec(bits)).model(tokens)
        from_disk = load_model(tmp_path / "q", device="cpu").model(tokens)
        full = load_model(src, device="cpu").model(tokens)
    assert torch.equal(on_load, from_disk)
    assert not torch.equal(on_load, full)  # it really is quantized
    assert (on_load - full).abs().max() < (0.5 if bits == 8 else 2.0)
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(tmp_path / "q", device="cpu", quant=bnb_spec(bits))


def test_info_reports_quantized_scheme_and_bits(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    stats = quantize_to(src, tmp_path / "q", QuantSpec("nf4"), device="cpu")
    outcome = run_cli("info", str(tmp_path / "q"), "--json")
    assert outcome.exit_code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    source = json.loads(run_cli("info", str(src), "--json").stdout)
    assert report["parameters"] == source["parameters"] == stats.params_total
    assert report["dtype"] == "nf4" and report["quantization"]["description"].startswith("nf4")
    assert report["quantization"]["bits_per_weight"] == pytest.approx(stats.bits_per_weight, abs=1e-3)


def test_load_for_generation_opens_the_checkpoint_once(
    tmp_path: Path, tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llamactl.loading as loading
    from llamactl.engine import EagerStep

    src = meta_src(tmp_path / "src", tokenizer=tiny_tokenizer)
    opened = []
    real = loading.open_checkpoint
    monkeypatch.setattr(loading, "open_checkpoint", lambda model: opened.append(model) or real(model))
    loaded, tok = loading.load_for_generation(src, device="cpu")
    assert opened == [src] and loaded.reader.path == Path(src)
    assert isinstance(loaded.step, EagerStep) and loaded.step.model is loaded.model
    assert tok.vocab_size == loaded.args.vocab_size
    assert all(layer.attention.fused and layer.feed_forward.fused for layer in loaded.model.layers)
