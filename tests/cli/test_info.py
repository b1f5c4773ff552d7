"""`llamactl info` against published figures, on sparse full-size skeleton checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llamactl.config import get_preset
from tests._ckpt import meta_split, random_meta_state, tiny_args, write_hf_checkpoint
from tests.cli._run import assert_one_line_error, run_cli

# Parameter counts as published with the Hugging Face releases of Llama 2.
PUBLISHED_PARAMETERS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}


def _sparse_meta(path: Path, preset: str, mp: int) -> Path:
    """A full-size Meta checkpoint whose tensors are holes on disk (torch skip_data)."""
    args = get_preset(preset)
    path.mkdir()
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "multiple_of": args.multiple_of,
        "norm_eps": 1e-5,
        "vocab_size": -1,
    }
    if args.n_kv_heads:
        params |= {"n_kv_heads": args.n_kv_heads, "ffn_dim_multiplier": args.ffn_dim_multiplier}
    (path / "params.json").write_text(json.dumps(params))
    hd = args.head_dim
    shapes = {
        "tok_embeddings.weight": (32000, args.dim),
        "norm.weight": (args.dim,),
        "output.weight": (32000, args.dim),
    }
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (args.dim, args.dim),
            p + "attention.wk.weight": (args.kv_heads * hd, args.dim),
            p + "attention.wv.weight": (args.kv_heads * hd, args.dim),
            p + "attention.wo.weight": (args.dim, args.dim),
            p + "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            p + "feed_forward.w3.weight": (args.hidden_dim, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        }
    with FakeTensorMode():
        full = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in shapes.items()}
        shards = [{k: meta_split(k, v, mp)[m] for k, v in full.items()} for m in range(mp)]
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        for m, shard in enumerate(shards):
            torch.save(shard, path / f"consolidated.{m:02d}.pth")
    return path


@pytest.mark.parametrize(("preset", "mp", "kv_per_token"), [("7b", 1, 524_288), ("70b", 8, 327_680)])
def test_info_on_full_size_checkpoints_matches_published_figures(
    tmp_path: Path, preset: str, mp: int, kv_per_token: int
) -> None:
    path = _sparse_meta(tmp_path / preset, preset, mp)
    outcome = run_cli("info", str(path), "--json", "--ctx", "4096")
    assert outcome.exit_code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    params = PUBLISHED_PARAMETERS[preset]
    assert report["parameters"] == params
    assert report["vocab_size"] == 32000  # from the embedding: params.json says -1
    assert report["weight_files"] == mp and report["format"] == "meta" and report["dtype"] == "bfloat16"
    assert report["memory"]["weights_fp16"] == 2 * params
    assert report["memory"]["kv_cache_per_token"] == kv_per_token  # 2 x layers x kv heads x 128 x 2 bytes
    assert report["memory"]["kv_cache_at_ctx"] == kv_per_token * 4096
    assert params < report["memory"]["weights_int8"] < 1.2 * params
    assert 0.5 * params < report["memory"]["weights_nf4"] < 0.6 * params  # 4 bits + absmax + 16-bit embeddings


def test_info_human_output_and_name_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMACTL_HOME", str(home))
    args = tiny_args()
    write_hf_checkpoint(home / "models" / "tiny-chat", args, random_meta_state(args))
    outcome = run_cli("info", "tiny-chat")
    assert outcome.exit_code == 0, outcome.stderr
    assert "GQA: 4 heads, 2 KV heads" in outcome.stdout and "hf" in outcome.stdout
    assert "\x1b[" not in outcome.stdout  # no ANSI when not a terminal


def test_info_unknown_name_lists_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models" / "7b-chat").mkdir(parents=True)
    assert_one_line_error(run_cli("info", "13b-chat"), "13b-chat", "7b-chat")


@pytest.mark.slow
def test_info_tp_shows_memory_per_gpu_and_the_gpus_70b_needs(tmp_path: Path) -> None:
    path = _sparse_meta(tmp_path / "70b", "70b", 8)
    outcome = run_cli("info", str(path), "--json", "--ctx", "4096", "--tp", "8")
    assert outcome.exit_code == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    params = PUBLISHED_PARAMETERS["70b"]
    norms = (2 * 80 + 1) * 8192 * 2  # replicated on every rank; everything else is cut in 8
    per = report["memory_per_rank"]
    assert report["tp"] == 8
    assert per["weights_fp16"] == (2 * params - norms) // 8 + norms
    assert per["kv_cache_at_ctx"] == 327_680 * 4096 // 8  # 1 of the 8 KV heads per rank
    # 70B fp16 (128 GiB): --tp 2 on 80 GB GPUs, --tp 8 on 24 GB ones, or 4-bit on one 80 GB GPU.
    assert report["gpus"]["80GB"] == {"fp16": 2, "int8": 1, "nf4": 1}
    assert report["gpus"]["24GB"] == {"fp16": 8, "int8": 4, "nf4": 2}
    human = run_cli("info", str(path), "--tp", "8")
    assert "per GPU, --tp 8" in human.stdout and "fp16 --tp 2, int8 1 GPU, nf4 1 GPU" in human.stdout
    assert_one_line_error(run_cli("info", str(path), "--tp", "3"), "--tp 3: n_heads 64 is not divisible by 3", code=2)
