"""Builders for tiny Llama checkpoints, written independently of llamactl's own writers.

Meta layout is produced from Meta's model-parallel rules restated here; HF layout by
transformers' own `save_pretrained`, so tests compare llamactl against outside references.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamactl.config import ModelArgs

# Meta's model.py: ColumnParallelLinear -> dim 0, RowParallelLinear / ParallelEmbedding -> dim 1.
_DIM0 = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_DIM1 = ("wo.weight", "w2.weight", "tok_embeddings.weight")


def tiny_args(gqa: bool = True, vocab_size: int = 320, **overrides: object) -> ModelArgs:
    """dim 64, 2 layers, 4 heads (2 KV heads with GQA); FFN 176 via multiple_of 16."""
    base = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2 if gqa else None,
        vocab_size=vocab_size,
        multiple_of=16,
        norm_eps=1e-5,
        max_seq_len=256,
    )
    base.update(overrides)
    return ModelArgs(**base)  # type: ignore[arg-type]


def random_meta_state(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Meta-named weights with a scale that keeps logits well conditioned."""
    gen = torch.Generator().manual_seed(seed)
    hd, kv, hidden = (
        args.dim // args.n_heads,
        (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads),
        args.hidden_dim,
    )

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(args.dim, generator=gen)).to(dtype)

    state = {
        "tok_embeddings.weight": w(args.vocab_size, args.dim),
        "norm.weight": norm(),
        "output.weight": w(args.vocab_size, args.dim),
    }
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": w(args.n_heads * hd, args.dim),
            p + "attention.wk.weight": w(kv, args.dim),
            p + "attention.wv.weight": w(kv, args.dim),
            p + "attention.wo.weight": w(args.dim, args.n_heads * hd),
            p + "feed_forward.w1.weight": w(hidden, args.dim),
            p + "feed_forward.w2.weight": w(args.dim, hidden),
            p + "feed_forward.w3.weight": w(hidden, args.dim),
            p + "attention_norm.weight": norm(),
            p + "ffn_norm.weight": norm(),
        }
    return state


def meta_split(name: str, tensor: torch.Tensor, mp: int) -> list[torch.Tensor]:
    if name.endswith(_DIM0):
        return [t.clone() for t in torch.chunk(tensor, mp, dim=0)]
    if name.endswith(_DIM1):
        return [t.clone() for t in torch.chunk(tensor, mp, dim=1)]
    return [tensor.clone() for _ in range(mp)]


def write_meta_checkpoint(
    path: Path,
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    mp: int = 1,
    vocab_minus_one: bool = False,
    tokenizer: Path | None = None,
) -> Path:
    """params.json (as Meta ships it: no max_seq_len) + consolidated.NN.pth."""
    path.mkdir(parents=True, exist_ok=True)
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "multiple_of": args.multiple_of,
        "norm_eps": args.norm_eps,
        "vocab_size": -1 if vocab_minus_one else args.vocab_size,
    }
    if args.n_kv_heads is not None:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    (path / "params.json").write_text(json.dumps(params))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for name, tensor in state.items():
        for shard, piece in zip(shards, meta_split(name, tensor, mp)):
            shard[name] = piece
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    if tokenizer is not None:
        (path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return path


def hf_reference_model(args: ModelArgs, state: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    """transformers' LlamaForCausalLM holding the same weights (Meta -> HF done by hand here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kv = args.n_kv_heads or args.n_heads
    config = LlamaConfig(
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=kv,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",  # the plain reference path
    )
    model = LlamaForCausalLM(config).eval()

    def perm(w: torch.Tensor, heads: int) -> torch.Tensor:  # transformers' convert_llama_weights_to_hf.permute
        d1, d2 = w.shape
        return w.view(heads, d1 // heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)

    hf = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf |= {
            h + "self_attn.q_proj.weight": perm(state[m + "attention.wq.weight"], args.n_heads),
            h + "self_attn.k_proj.weight": perm(state[m + "attention.wk.weight"], kv),
            h + "self_attn.v_proj.weight": state[m + "attention.wv.weight"],
            h + "self_attn.o_proj.weight": state[m + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": state[m + "feed_forward.w1.weight"],
            h + "mlp.down_proj.weight": state[m + "feed_forward.w2.weight"],
            h + "mlp.up_proj.weight": state[m + "feed_forward.w3.weight"],
            h + "input_layernorm.weight": state[m + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": state[m + "ffn_norm.weight"],
        }
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    return model


def write_hf_checkpoint(
    path: Path, args: ModelArgs, state: dict[str, torch.Tensor], max_shard_size: str = "5GB"
) -> Path:
    """An HF checkpoint written by transformers itself."""
    hf_reference_model(args, state).save_pretrained(path, max_shard_size=max_shard_size)
    return path


def load_pth_dir(path: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(f, weights_only=True) for f in sorted(path.glob("consolidated.*.pth"))]
