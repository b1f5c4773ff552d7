"""Conversions checked against transformers and by bit-exact round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llamactl.checkpoint import open_checkpoint
from llamactl.convert import convert, plan_convert
from llamactl.loading import load_model
from tests._ckpt import load_pth_dir, random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint


def _transformers_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def _ours(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path, device="cpu", dtype=torch.float32).model(tokens)


def _tokens(vocab: int, n: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    ("gqa", "vocab_minus_one"), [(True, False), (False, False), (True, True)], ids=["gqa", "mha", "vocab-1"]
)
def test_meta_mp2_to_hf_loads_in_transformers_with_equal_logits(
    tmp_path: Path, gqa: bool, vocab_minus_one: bool
) -> None:
    args = tiny_args(gqa=gqa)
    src = write_meta_checkpoint(tmp_path / "meta", args, random_meta_state(args), mp=2, vocab_minus_one=vocab_minus_one)
    dst = convert(src, tmp_path / "hf", "hf")
    tokens = _tokens(args.vocab_size)
    diff = (_ours(src, tokens) - _transformers_logits(dst, tokens)).abs().max().item()
    assert diff <= 1e-4
    config = json.loads((dst / "config.json").read_text())
    assert config["num_key_value_heads"] == args.kv_heads and config["vocab_size"] == args.vocab_size


def test_hf_written_by_transformers_reads_back_exactly(tmp_path: Path) -> None:
    args = tiny_args()
    state = random_meta_state(args, seed=3)
    src = write_hf_checkpoint(tmp_path / "hf", args, state, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()  # transformers sharded it
    reader = open_checkpoint(src)
    got = dict(reader.iter_tensors())
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    tokens = _tokens(args.vocab_size)
    assert (_ours(src, tokens) - _transformers_logits(src, tokens)).abs().max().item() <= 1e-4


def test_round_trip_meta_mp2_hf_meta_mp2_is_bit_exact(tmp_path: Path, tiny_tokenizer: Path) -> None:
    args = tiny_args()
    src = write_meta_checkpoint(tmp_path / "a", args, random_meta_state(args), mp=2, tokenizer=tiny_tokenizer)
    convert(src, tmp_path / "hf", "hf")
    back = convert(tmp_path / "hf", tmp_path / "b", "meta", shards=2)
    before, after = load_pth_dir(src), load_pth_dir(back)
    assert len(after) == 2
    for one, two in zip(before, after):
        assert one.keys() == two.keys()
        assert all(torch.equal(one[k], two[k]) and one[k].dtype == two[k].dtype for k in one)
    assert (back / "tokenizer.model").read_bytes() == tiny_tokenizer.read_bytes()
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_round_trip_mp2_mp1_mp4_mp2_is_bit_exact(tmp_path: Path) -> None:
    args = tiny_args(n_heads=8, n_kv_heads=4)
    src = write_meta_checkpoint(tmp_path / "mp2", args, random_meta_state(args, dtype=torch.bfloat16), mp=2)
    mp1 = convert(src, tmp_path / "mp1", "meta", shards=1)
    mp4 = convert(mp1, tmp_path / "mp4", "meta", shards=4)
    mp2 = convert(mp4, tmp_path / "mp2b", "meta", shards=2)
    assert [len(load_pth_dir(p)) for p in (mp1, mp4, mp2)] == [1, 4, 2]
    expected = load_pth_dir(tmp_path / "mp4")
    reference = write_meta_checkpoint(tmp_path / "ref4", args, random_meta_state(args, dtype=torch.bfloat16), mp=4)
    for ours, ref in zip(expected, load_pth_dir(reference)):  # our split equals Meta's rule applied directly
        assert all(torch.equal(ours[k], ref[k]) for k in ref)
    for one, two in zip(load_pth_dir(src), load_pth_dir(mp2)):
        assert all(torch.equal(one[k], two[k]) and two[k].dtype == torch.bfloat16 for k in one)


def test_hf_reshard_by_size_is_bit_exact(tmp_path: Path) -> None:
    args = tiny_args()
    state = random_meta_state(args)
    src = write_hf_checkpoint(tmp_path / "hf", args, state)
    small = convert(src, tmp_path / "small", "hf", max_shard_bytes=120_000)
    index = json.loads((small / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((small / f).stat().st_size <= 120_000 + 90_000 for f in files)
    for f in files:  # each file holds what the index says, readable by safetensors itself
        with safe_open(small / f, "pt") as handle:
            assert {k for k, v in index["weight_map"].items() if v == f} == set(handle.keys())
    merged = convert(small, tmp_path / "one", "hf")
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(merged / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_dtype_cast_and_dry_run(tmp_path: Path) -> None:
    args = tiny_args()
    src = write_meta_checkpoint(tmp_path / "m", args, random_meta_state(args))
    plan = plan_convert(src, tmp_path / "x", "hf", dtype="bf16")
    assert not (tmp_path / "x").exists()
    assert plan.total_bytes == sum(v.numel() * 2 for v in random_meta_state(args).values())
    out = convert(src, tmp_path / "bf16", "hf", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}  # noqa: SIM118


def test_stories260k_matches_transformers_on_our_hf_conversion(tmp_path: Path, stories_dir: Path) -> None:
    reader = open_checkpoint(stories_dir)
    assert (reader.args.dim, reader.args.kv_heads, reader.args.hidden_dim, reader.args.vocab_size) == (64, 4, 172, 512)
    dst = convert(stories_dir, tmp_path / "stories-hf", "hf")
    tokens = torch.tensor([[1, 403, 407, 261, 378]])  # BOS "Once upon a time"
    ours = _ours(stories_dir, tokens)
    assert (ours - _transformers_logits(dst, tokens)).abs().max().item() <= 1e-4
    from transformers import AutoTokenizer  # our tokenizer files load in transformers too

    assert AutoTokenizer.from_pretrained(dst)("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]


@pytest.mark.parametrize(("to", "shards"), [("hf", None), ("meta", 4), ("meta", 1)])
def test_progress_reports_every_planned_byte(tmp_path: Path, to: str, shards: int | None) -> None:
    from llamactl.convert import run_convert

    args = tiny_args(n_heads=8, n_kv_heads=4)
    src = write_meta_checkpoint(tmp_path / "m", args, random_meta_state(args), mp=2)
    plan = plan_convert(src, tmp_path / "out", to, shards=shards)
    seen: list[tuple[str, int]] = []
    run_convert(plan, on_tensor=lambda name, nbytes: seen.append((name, nbytes)))
    assert len(seen) == len(random_meta_state(args))
    assert sum(n for _, n in seen) == plan.total_bytes
    written = sum(p.stat().st_size for p in (tmp_path / "out").iterdir() if p.suffix in (".pth", ".safetensors"))
    assert written >= plan.total_bytes
