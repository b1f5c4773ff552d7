"""The tiny shape and run helper every llamactl.bench test uses."""

from __future__ import annotations

import torch

from llamactl.bench import BenchOptions, BenchReport, run_bench
from llamactl.config import ModelArgs

CPU = torch.device("cpu")
# 8 heads of dim 8; tiny but every code path of the 7B shape (MHA) and 70B shape (GQA).
TINY = ModelArgs(dim=64, n_layers=2, n_heads=8, vocab_size=320, multiple_of=32, max_seq_len=256)


def tiny_options(**kw: object) -> BenchOptions:
    base = dict(
        args=TINY, ctx=[64], prompt_tokens=[8], gen_tokens=[4], repeat=1, warmup=0, layers=[None], dtypes=["fp32"]
    )
    base.update(kw)
    return BenchOptions(**base)  # type: ignore[arg-type]


def run(**kw: object) -> BenchReport:
    return run_bench(tiny_options(**kw), device=CPU)
