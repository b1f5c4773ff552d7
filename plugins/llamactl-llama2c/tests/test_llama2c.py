"""The llama2c plugin against llama2.c's own files: stories260K.bin vs Meta's consolidated.00.pth."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llamactl.checkpoint import open_checkpoint
from llamactl.cli import build_app
from llamactl.errors import CheckpointError


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(build_app(), list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def meta_state(stories: Path) -> dict[str, torch.Tensor]:
    return torch.load(stories / "consolidated.00.pth", weights_only=True, mmap=True)


def write_tiny_meta(path: Path, tied: bool) -> dict[str, torch.Tensor]:
    """A random Meta checkpoint (dim 32, 2 layers, GQA), written by hand with torch.save."""
    gen = torch.Generator().manual_seed(0)
    dim, layers, heads, kv_heads, vocab, hidden = 32, 2, 4, 2, 96, 96  # hidden: multiple_of 32
    kv = kv_heads * dim // heads
    state = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=gen), "norm.weight": torch.rand(dim)}
    state["output.weight"] = state["tok_embeddings.weight"].clone() if tied else torch.randn(vocab, dim, generator=gen)
    for i in range(layers):
        p = f"layers.{i}."
        for name, shape in {
            "attention.wq": (dim, dim),
            "attention.wk": (kv, dim),
            "attention.wv": (kv, dim),
            "attention.wo": (dim, dim),
            "feed_forward.w1": (hidden, dim),
            "feed_forward.w2": (dim, hidden),
            "feed_forward.w3": (hidden, dim),
            "attention_norm": (dim,),
            "ffn_norm": (dim,),
        }.items():
            state[p + name + ".weight"] = torch.randn(*shape, generator=gen)
    path.mkdir(parents=True)
    params = {
        "dim": dim,
        "n_layers": layers,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": vocab,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "max_seq_len": 64,
    }
    (path / "params.json").write_text(json.dumps(params))
    torch.save(state, path / "consolidated.00.pth")
    return state


def test_reader_yields_metas_tensors(stories: Path) -> None:
    reader = open_checkpoint(stories / "llama2c")
    assert reader.format == "llama2c"
    params = json.loads((stories / "params.json").read_text())
    assert {k: getattr(reader.args, k) for k in params} == params
    assert reader.args.max_seq_len == 512
    ref = meta_state(stories)
    got = dict(reader.iter_tensors())
    assert got.keys() == ref.keys()
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name
    assert [i.name for i in reader.tensor_infos()] == list(got)


def test_convert_llama2c_to_meta_matches_the_meta_checkpoint(stories: Path, tmp_path: Path) -> None:
    code, _, err = run("convert", str(stories / "llama2c"), str(tmp_path / "meta"), "--to", "meta")
    assert code == 0, err
    converted = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    ref = meta_state(stories)
    assert converted.keys() == ref.keys() and all(torch.equal(converted[k], ref[k]) for k in ref)


def test_export_of_the_meta_checkpoint_is_llama2cs_file_byte_for_byte(stories: Path, tmp_path: Path) -> None:
    out = tmp_path / "stories.bin"
    code, _, err = run("llama2c-export", str(stories), str(out), "--max-seq-len", "512")
    assert code == 0, err
    assert out.read_bytes() == (stories / "llama2c" / "stories260K.bin").read_bytes()
    code, _, err = run("llama2c-export", str(stories), str(out))
    assert code == 1 and err.startswith("llamactl: error: ") and "already exists" in err


@pytest.mark.parametrize("tied", [True, False])
def test_export_then_read_round_trips(tmp_path: Path, tied: bool) -> None:
    state = write_tiny_meta(tmp_path / "meta", tied)
    (tmp_path / "l2c").mkdir()
    code, _, err = run("llama2c-export", str(tmp_path / "meta"), str(tmp_path / "l2c" / "model.bin"))
    assert code == 0, err
    vocab = struct.unpack("<7i", (tmp_path / "l2c" / "model.bin").read_bytes()[:28])[5]
    assert vocab == (96 if tied else -96)  # llama2.c's flag for a separate output head
    got = dict(open_checkpoint(tmp_path / "l2c").iter_tensors())
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_plugin_is_listed(tmp_path: Path) -> None:
    _, stdout, _ = run("plugins", "--json")
    [plugin] = json.loads(stdout)
    assert plugin["name"] == "llama2c" and plugin["formats"] == ["llama2c"]
    assert plugin["commands"] == ["llama2c-export"] and plugin["status"] == "ok"


def test_not_a_checkpoint(tmp_path: Path, stories: Path) -> None:
    tok_only = tmp_path / "tok"
    tok_only.mkdir()
    (tok_only / "tok512.bin").write_bytes((stories / "llama2c" / "tok512.bin").read_bytes())
    truncated = tmp_path / "cut"
    truncated.mkdir()
    (truncated / "m.bin").write_bytes((stories / "llama2c" / "stories260K.bin").read_bytes()[:-4])
    for folder in (tok_only, truncated):
        with pytest.raises(CheckpointError, match="not a model directory"):
            open_checkpoint(folder)
    newer = tmp_path / "v1"
    newer.mkdir()
    (newer / "m.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(248))
    with pytest.raises(CheckpointError, match="version 1/2 export"):
        open_checkpoint(newer)
