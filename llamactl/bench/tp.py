"""`bench MODEL --tp N`: a tensor-parallel run's speed, its memory per rank, and its collectives.

One checkpoint loaded over N ranks (`load_model(tp=N)`), then, per repeat, a prefill of
`n_prompt` random tokens (pp) and `n_gen` greedy decode steps after it (tg). Memory is
reported per rank, measured (the tensors each rank holds, gathered from every rank) next to
the formula (`llamactl.estimate` on the rank's shard shapes) and the `--tp 1` formula, so the
1/N split is visible. The collective share is rank 0's time inside all-reduce / all-gather
during decode over the decode time; on CUDA the group synchronizes around each collective
so the time is the collective's own.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llamactl import estimate
from llamactl.dtypes import name_of
from llamactl.engine.memory import weight_bytes
from llamactl.engine.tp import Group, RankStats, ShardedTransformer
from llamactl.generate import decode_one, prefill
from llamactl.loading import load_model


@dataclass
class TPBenchReport:
    """Field names are the --json schema."""

    model: str
    tp: int
    backend: str
    device: str
    dtype: str
    n_ctx: int
    n_prompt: int
    n_gen: int
    repeat: int
    threads_per_rank: int
    pp_ts: float  # prefill tokens/s, median over repeats
    tg_ts: float  # decode tokens/s, median over repeats
    tg_samples_ts: list[float]
    comm_share_decode: float  # rank 0's time in collectives during decode / decode time
    comm_calls_per_token: float
    weight_bytes: list[int]  # measured, per rank
    weight_bytes_formula: int  # per rank
    weight_bytes_tp1_formula: int
    kv_bytes: list[int]  # measured, per rank
    kv_bytes_formula: int  # per rank
    kv_bytes_tp1_formula: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_tp_bench(
    model: str,
    tp: int,
    *,
    ctx: int = 512,
    n_prompt: int = 128,
    n_gen: int = 32,
    repeat: int = 3,
    warmup: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
) -> TPBenchReport:
    """Load `model` over `tp` ranks and time pp / tg; ends the other ranks before returning.

    `tp=1` runs the same measurements on the plain model (the baseline of the same method).
    """
    with load_model(model, device=device, dtype=dtype, max_seq_len=ctx, tp=tp) as loaded:
        net = loaded.model
        group = net.group if isinstance(net, ShardedTransformer) else Group(0, 1, loaded.device)
        group.timing = True
        net.setup_cache(1, ctx)
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, loaded.args.vocab_size, (n_prompt,), generator=gen).tolist()
        pp: list[float] = []
        tg: list[float] = []
        comm: list[float] = []
        calls = 0
        for i in range(warmup + repeat):
            t0 = time.perf_counter()
            logits = prefill(net, prompt, 0)
            t1 = time.perf_counter()
            before_s, before_calls = group.comm.seconds, group.comm.calls
            token = int(logits.argmax())
            for pos in range(n_prompt, n_prompt + n_gen):
                token = int(decode_one(loaded.step, token, pos).argmax())  # type: ignore[arg-type]
            t2 = time.perf_counter()
            if i >= warmup:
                pp.append(n_prompt / (t1 - t0))
                tg.append(n_gen / (t2 - t1))
                comm.append((group.comm.seconds - before_s) / (t2 - t1))
                calls = group.comm.calls - before_calls
        if isinstance(net, ShardedTransformer):
            stats = net.rank_stats()
        else:
            stats = [RankStats(weight_bytes(net), net.cache_bytes, 0, 0)]
        args = loaded.args
        dtype_name = name_of(loaded.dtype)
        infos = loaded.reader.tensor_infos()
        report = TPBenchReport(
            model=str(loaded.reader.path),
            tp=tp,
            backend=torch.distributed.get_backend() if tp > 1 else "none",
            device=str(group.device),
            dtype=dtype_name,
            n_ctx=ctx,
            n_prompt=n_prompt,
            n_gen=n_gen,
            repeat=repeat,
            threads_per_rank=torch.get_num_threads() if group.device.type == "cpu" else 0,
            pp_ts=round(statistics.median(pp), 2),
            tg_ts=round(statistics.median(tg), 2),
            tg_samples_ts=[round(x, 2) for x in tg],
            comm_share_decode=round(statistics.median(comm), 4),
            comm_calls_per_token=calls / n_gen,
            weight_bytes=[s.weight_bytes for s in stats],
            weight_bytes_formula=estimate.weight_bytes(estimate.rank_infos(infos, tp), dtype=dtype_name),
            weight_bytes_tp1_formula=estimate.weight_bytes(infos, dtype=dtype_name),
            kv_bytes=[s.kv_bytes for s in stats],
            kv_bytes_formula=estimate.kv_cache_bytes(args, ctx, dtype=dtype_name, tp=tp),
            kv_bytes_tp1_formula=estimate.kv_cache_bytes(args, ctx, dtype=dtype_name),
        )
    if group.device.type == "cpu":
        report.notes.append("CPU ranks share this machine's cores and memory bandwidth: a speed-up needs GPUs")
    return report
