"""The Meta format: shards merged on the fly, written back split, both checked independently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamactl.checkpoint import open_checkpoint
from llamactl.checkpoint.meta import FORMAT, detect_meta
from llamactl.errors import CheckpointError
from tests._ckpt import load_pth_dir, random_meta_state, tiny_args, write_meta_checkpoint


def test_reader_merges_model_parallel_shards(tmp_path: Path) -> None:
    args = tiny_args(gqa=True)
    state = random_meta_state(args)
    reader = open_checkpoint(write_meta_checkpoint(tmp_path / "m", args, state, mp=2))
    assert reader.format == "meta" and len(reader.files) == 2
    assert {i.name: i.shape for i in reader.tensor_infos()} == {n: tuple(t.shape) for n, t in state.items()}
    assert all(torch.equal(t, state[n]) for n, t in reader.iter_tensors())


def test_writer_splits_as_meta_does(tmp_path: Path) -> None:
    args = tiny_args(gqa=True)
    state = random_meta_state(args)
    src = open_checkpoint(write_meta_checkpoint(tmp_path / "m", args, state))
    assert FORMAT.plan is not None and FORMAT.write is not None
    from llamactl.checkpoint.formats import WriteOptions

    out = tmp_path / "o"
    out.mkdir()
    options = WriteOptions(shards=2)
    FORMAT.write(out, src, FORMAT.plan(src, options), options)
    shards = load_pth_dir(out)
    # Meta's rule, applied here by hand: column-parallel on dim 0, row-parallel on dim 1.
    assert torch.equal(shards[1]["layers.0.attention.wq.weight"], state["layers.0.attention.wq.weight"].chunk(2, 0)[1])
    assert torch.equal(
        shards[0]["layers.1.feed_forward.w2.weight"], state["layers.1.feed_forward.w2.weight"].chunk(2, 1)[0]
    )
    assert torch.equal(shards[1]["norm.weight"], state["norm.weight"])
    assert "max_seq_len" not in json.loads((out / "params.json").read_text())


def test_detection(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text("{}")
    assert detect_meta(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not detect_meta(tmp_path)  # a directory holding both is read as Hugging Face


def test_shards_that_disagree_are_refused(tmp_path: Path) -> None:
    args = tiny_args()
    path = write_meta_checkpoint(tmp_path / "m", args, random_meta_state(args), mp=2)
    second = torch.load(path / "consolidated.01.pth", weights_only=True)
    second["norm.weight"] = second["norm.weight"].half()
    torch.save(second, path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: tensor norm.weight disagrees"):
        open_checkpoint(path)
