"""`llamactl quantize` through the real app: report, DST layout, end to end, bad input."""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamactl.cli import build_app
from tests._quantize_util import hf_src, meta_src, read_safetensors


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(build_app(), list(args))
    return result.exit_code, result.stdout, result.stderr


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llamactl: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.endswith(".partial")]


def test_quantize_nf4_json_report_and_layout(tmp_path: Path, tiny_tokenizer: Path) -> None:
    src = meta_src(tmp_path / "src", tokenizer=tiny_tokenizer)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    code, out, err = run("quantize", str(src), str(tmp_path / "q4"), "--scheme", "nf4", "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["scheme"] == "nf4" and report["tensors_quantized"] == 14 and report["tensors_total"] == 21
    assert 4.0 < report["bits_per_weight"] < 8.0 and report["bytes_after"] < report["bytes_before"]
    q = report["quality"]
    assert q["tokens"] > 10 and 0 <= q["top1_agreement"] <= 1 and q["mean_kl"] > 0
    assert q["perplexity_before"] > 1 and q["perplexity_after"] > 1
    dst = tmp_path / "q4"
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert (dst / "tokenizer.model").read_bytes() == tiny_tokenizer.read_bytes()
    tensors = read_safetensors(dst)
    assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in tensors
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight.absmax" not in tensors
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # input untouched
    _no_leftovers(tmp_path)


def test_quantize_int8_table_and_options(tmp_path: Path) -> None:
    src = hf_src(tmp_path / "src")
    code, out, err = run("quantize", str(src), str(tmp_path / "q8"), "--scheme", "int8", "--no-eval")
    assert code == 0, err
    assert "int8 (LLM.int8" in out and "tensors quantized" in out and "perplexity" not in out
    tensors = read_safetensors(tmp_path / "q8")
    assert tensors["model.layers.1.self_attn.k_proj.SCB"].dtype.is_floating_point
    assert tensors["model.layers.1.self_attn.k_proj.weight_format"].item() == 0
    code, out, err = run(
        "quantize",
        str(src),
        str(tmp_path / "f"),
        "--bits",
        "4",
        "--quant-type",
        "fp4",
        "--no-double-quant",
        "--blocksize",
        "128",
        "--compute-dtype",
        "fp16",
        "--no-eval",
        "--json",
    )
    assert code == 0, err
    cfg = json.loads(out)["quantization_config"]
    assert (cfg["bnb_4bit_quant_type"], cfg["bnb_4bit_use_double_quant"], cfg["bnb_4bit_compute_dtype"]) == (
        "fp4",
        False,
        "float16",
    )
    assert (
        json.loads(
            bytes(
                read_safetensors(tmp_path / "f")[
                    "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"
                ].tolist()
            )
        )["blocksize"]
        == 128
    )


def test_quantize_then_generate_end_to_end(stories_dir: Path, tmp_path: Path) -> None:
    """Real trained model: quantize (int8), then `llamactl generate` greedy tells the golden story."""
    dst = tmp_path / "q8"
    code, _, err = run("quantize", str(stories_dir), str(dst), "--bits", "8", "--no-eval")
    assert code == 0, err
    code, out, err = run("generate", str(dst), "", "-t", "0", "-n", "16", "--device", "cpu")
    assert code == 0, err
    assert out.startswith("Once upon a time, there was a little girl named Lily.")


def test_eval_file_is_used(tmp_path: Path, tiny_tokenizer: Path) -> None:
    src = meta_src(tmp_path / "src", tokenizer=tiny_tokenizer)
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    code, out, err = run("quantize", str(src), str(tmp_path / "q"), "--bits", "8", "--eval", str(text), "--json")
    assert code == 0, err
    short = json.loads(out)["quality"]["tokens"]
    code, out, err = run("quantize", str(src), str(tmp_path / "q"), "--bits", "8", "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["quality"]["tokens"] != short


def test_bits_3_lists_supported(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--bits", "3")
    assert code == 2
    assert "bits 3" in _one_error_line(err) and "8, 4" in err
    assert not (tmp_path / "q").exists()


def test_already_quantized_src(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    assert run("quantize", str(src), str(tmp_path / "q"), "--bits", "8", "--no-eval")[0] == 0
    code, _, err = run("quantize", str(tmp_path / "q"), str(tmp_path / "qq"), "--bits", "4", "--no-eval")
    assert code == 1 and "already quantized" in _one_error_line(err)
    assert not (tmp_path / "qq").exists()


def test_bitsandbytes_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = meta_src(tmp_path / "src")
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--scheme", "nf4")
    assert code == 1 and "pip install" in _one_error_line(err) and "bitsandbytes" in err
    assert not (tmp_path / "q").exists()


def test_bitsandbytes_without_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes.functional as bf

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("native library libbitsandbytes_cpu.so not found")

    monkeypatch.setattr(bf, "quantize_4bit", broken)
    src = meta_src(tmp_path / "src")
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--scheme", "int8", "--device", "cpu")
    line = _one_error_line(err)
    assert code == 1 and "no usable backend on cpu" in line and "pip install" in line
    assert not (tmp_path / "q").exists()


def test_skip_matching_nothing_warns(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    code, out, err = run(
        "quantize",
        str(src),
        str(tmp_path / "q"),
        "--bits",
        "8",
        "--no-eval",
        "--json",
        "--skip",
        "layers.9.*",
        "--skip",
        "*.wo.weight",
    )
    assert code == 0, err
    assert "llamactl: warning: --skip layers.9.*: matches no quantizable tensor" in err
    assert "*.wo.weight" not in err
    assert json.loads(out)["tensors_quantized"] == 14 - 2


def test_dst_exists(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    dst = tmp_path / "q"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = run("quantize", str(src), str(dst), "--bits", "8", "--no-eval")
    assert code == 1 and "already exists" in _one_error_line(err) and "--force" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_src_corrupt(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    weights = src / "consolidated.00.pth"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--bits", "4", "--no-eval")
    assert code == 1 and str(weights) in _one_error_line(err)
    assert not (tmp_path / "q").exists()
    _no_leftovers(tmp_path)


def test_four_bit_options_with_bits_8_are_usage_errors(tmp_path: Path) -> None:
    src = meta_src(tmp_path / "src")
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--bits", "8", "--quant-type", "fp4")
    assert code == 2 and "quant type applies to 4-bit schemes only" in _one_error_line(err)
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--scheme", "nf4", "--blocksize", "48")
    assert code == 2 and "32, 64, 128" in _one_error_line(err)
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--bits", "4", "--blocksize", "64")
    assert code == 2 and "blocksize applies to bitsandbytes 4-bit schemes" in _one_error_line(err)
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--bits", "4", "--group-size", "48")
    assert code == 2 and "group size 48: unsupported; choose one of: 32, 64, 128" in _one_error_line(err)
    code, _, err = run("quantize", str(src), str(tmp_path / "q"), "--scheme", "int8", "--group-size", "64")
    assert code == 2 and "group size applies to the native schemes (q8, q4) only" in _one_error_line(err)
