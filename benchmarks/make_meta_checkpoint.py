#!/usr/bin/env python3
"""Write a random fp16 Meta checkpoint with model-parallel shards: test data for convert_vs_cp.py.

The default is 7B-shaped (dim 4096, 32 heads, FFN 11008, vocab 32000) with only 3 layers and
MP=2: two consolidated.NN.pth files of ~0.87 GB each (1.75 GB in all), split by Meta's rules
(column-parallel wq/wk/wv/w1/w3/output on dim 0, row-parallel wo/w2 and the embedding on dim 1,
norms replicated). Written by plain `torch.save`, as Meta's own checkpoints are, independent of
llamactl's writers. Values are seeded noise: convert moves bytes, it does not look at them.

    python benchmarks/make_meta_checkpoint.py /work/bench-data/meta7b-3l-mp2 --layers 3 --mp 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

_DIM0 = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_DIM1 = ("wo.weight", "w2.weight", "tok_embeddings.weight")


def shapes(dim: int, layers: int, hidden: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Meta tensor names -> full shapes (no GQA: Llama-2 7B)."""
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        p = f"layers.{i}."
        out |= {p + f"attention.{w}.weight": (dim, dim) for w in ("wq", "wk", "wv", "wo")}
        out |= {p + "feed_forward.w1.weight": (hidden, dim), p + "feed_forward.w2.weight": (dim, hidden)}
        out |= {p + "feed_forward.w3.weight": (hidden, dim)}
        out |= {p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,)}
    out["output.weight"] = (vocab, dim)
    return out


def piece(name: str, tensor: torch.Tensor, mp: int, rank: int) -> torch.Tensor:
    if name.endswith(_DIM0):
        return tensor.chunk(mp, dim=0)[rank].clone()
    if name.endswith(_DIM1):
        return tensor.chunk(mp, dim=1)[rank].clone()
    return tensor.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--mp", type=int, default=2)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    hidden = 256 * -(-int(2 * 4 * opts.dim / 3) // 256)  # Meta's FFN size for multiple_of 256 (4096 -> 11008)
    gen = torch.Generator().manual_seed(0)
    full = {
        name: (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        for name, shape in shapes(opts.dim, opts.layers, hidden, opts.vocab).items()
    }
    for rank in range(opts.mp):
        shard = {name: piece(name, t, opts.mp, rank) for name, t in full.items()}
        torch.save(shard, opts.out / f"consolidated.{rank:02d}.pth")
        del shard
    params = {"dim": opts.dim, "n_layers": opts.layers, "n_heads": opts.dim // 128, "multiple_of": 256}
    params |= {"norm_eps": 1e-5, "vocab_size": -1}
    (opts.out / "params.json").write_text(json.dumps(params) + "\n")
    total = sum(p.stat().st_size for p in opts.out.glob("*.pth"))
    print(f"{opts.out}: {opts.mp} shards, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
