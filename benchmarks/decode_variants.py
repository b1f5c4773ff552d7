#!/usr/bin/env python3
"""Decode speed of llamactl's step under variants, each in its own child process, interleaved.

Variants vary the thread count, OpenMP's wait policy (it must be set before torch loads,
hence the child processes), a busy core (another process spinning during the run), the
weights' dtype and the step (eager, or the compiled static-shape step). The model is random
(seeded) with the given shape; decode runs `--tokens` greedy steps after `--depth` positions.

    OMP_NUM_THREADS= python benchmarks/decode_variants.py --shape 110m --rounds 3 \\
        --variant threads=1 --variant threads=2 --variant threads=2,busy=1 --variant threads=1,busy=1 \\
        --variant threads=2,busy=1,wait=PASSIVE

A variant is comma-separated key=value: threads (int), wait (PASSIVE/ACTIVE/unset), busy (0/1),
dtype (fp32/bf16/fp16), step (eager/compiled). Prints tok/s medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    "110m": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256, max_seq_len=1024),
    "260k": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512),
}

_CHILD = r"""
import json, sys, time
import torch
from llamactl.config import ModelArgs
from llamactl.engine import choose_step
from llamactl.model import Transformer
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
model = Transformer(ModelArgs(**cfg["shape"]))
for p in model.parameters():
    p.requires_grad_(False)
    p.normal_(0, 0.02)
model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]).fuse_projections()
model.setup_cache(1, cfg["ctx"])
start = time.perf_counter()
step = choose_step(model, cfg["step"])
tok = torch.tensor([[1]])
with torch.inference_mode():
    for pos in range(cfg["depth"]):
        step(tok, pos)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    out = []
    for pos in range(cfg["depth"], cfg["depth"] + cfg["tokens"]):
        tok = step(tok, pos)[:, -1].argmax(-1, keepdim=True)
        out.append(int(tok))
print(json.dumps({"tok_s": cfg["tokens"] / (time.perf_counter() - start), "setup_s": setup, "tokens": out}))
"""


def spin(stop: float) -> None:
    while time.time() < stop:
        pass


def run(variant: dict[str, str], opts: argparse.Namespace) -> dict[str, float]:
    cfg = {
        "threads": int(variant.get("threads", "2")),
        "dtype": variant.get("dtype", "fp32"),
        "step": variant.get("step", "eager"),
        "shape": SHAPES[opts.shape],
        "ctx": opts.depth + opts.tokens,
        "depth": opts.depth,
        "tokens": opts.tokens,
    }
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if variant.get("wait", "unset") != "unset":
        env["OMP_WAIT_POLICY"] = variant["wait"]
    else:
        env.pop("OMP_WAIT_POLICY", None)
    spinner = None
    if variant.get("busy") == "1":
        spinner = multiprocessing.Process(target=spin, args=(time.time() + 600,))
        spinner.start()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
    finally:
        if spinner is not None:
            spinner.terminate()
            spinner.join()
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="110m")
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    opts = parser.parse_args()
    variants = [dict(kv.split("=", 1) for kv in v.split(",")) for v in opts.variant]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in opts.variant}
    for round_ in range(opts.rounds):
        for name, variant in zip(opts.variant, variants):
            results[name].append(run(variant, opts))
            print(f"round {round_} {name}: {results[name][-1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    print(f"shape {opts.shape}, depth {opts.depth}, {opts.tokens} tokens, medians of {opts.rounds} interleaved rounds")
    for name, rows in results.items():
        tok_s = statistics.median(r["tok_s"] for r in rows)
        setup = statistics.median(r["setup_s"] for r in rows)
        same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
        print(f"  {name:40s} {tok_s:8.1f} tok/s   setup {setup:6.2f} s   tokens stable: {same}")


if __name__ == "__main__":
    main()
