"""The Hugging Face format: transformers' own files read, ours written so transformers reads them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamactl.checkpoint import open_checkpoint
from llamactl.checkpoint.hf import detect_hf, plan_hf
from llamactl.layout import TensorInfo
from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint


def test_reader_sees_transformers_files_in_metas_layout(tmp_path: Path) -> None:
    args = tiny_args(gqa=True)
    state = random_meta_state(args)
    reader = open_checkpoint(write_hf_checkpoint(tmp_path / "hf", args, state, max_shard_size="20KB"))
    assert reader.format == "hf" and len(reader.files) > 1  # sharded, with an index
    got = dict(reader.iter_tensors())
    assert set(got) == set(state) and all(torch.equal(got[n], state[n]) for n in state)


def test_tied_embeddings_give_an_output_head(tmp_path: Path) -> None:
    args = tiny_args()
    state = random_meta_state(args)
    state["output.weight"] = state["tok_embeddings.weight"]
    path = write_hf_checkpoint(tmp_path / "hf", args, state)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    got = dict(open_checkpoint(path).iter_tensors())
    assert torch.equal(got["output.weight"], state["tok_embeddings.weight"])


def test_pytorch_bin_is_read_through_the_safe_index(tmp_path: Path) -> None:
    args = tiny_args()
    state = random_meta_state(args)
    path = write_hf_checkpoint(tmp_path / "hf", args, state)
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    got = dict(open_checkpoint(path).iter_tensors())
    assert all(torch.equal(got[n], state[n]) for n in state)


def test_plan_keeps_transformers_order_and_size_limit() -> None:
    infos = [TensorInfo(n, s, "fp32") for n, s in {"output.weight": (10, 4), "layers.0.attention.wq.weight": (4, 4),
                                                    "tok_embeddings.weight": (10, 4), "norm.weight": (4,)}.items()]  # fmt: skip
    plan = plan_hf(infos, max_shard_bytes=170, dtype="bf16")
    names = [i.name for _, file in plan for i in file]
    assert names == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    assert [n for n, _ in plan] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert all(i.dtype == "bf16" for _, file in plan for i in file)


def test_detection_leaves_bitsandbytes_checkpoints_to_bnb(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    assert not detect_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert detect_hf(tmp_path)
