"""Benchmarks: prefill and decode speed, KV-cache and weight memory, bandwidth, vs transformers.

What `llama-bench` measures (pp512 / tg128, mean ± sd over repeats) plus what it does not:
the KV cache by formula and as allocated, weight and peak memory, the effective memory
bandwidth of decode, MHA against GQA/MQA for the same shape, and transformers' own
`LlamaForCausalLM` on the same weights, interleaved with our repeats so both see the same
machine state. Results are plain dataclasses; the CLI formats them.

    options.py  BenchOptions (what to run), plan_bench: device defaults + the one validation
    rows.py     the output schema: Environment, BenchRow, BenchReport, FIELDS (llama-bench names)
    probes.py   the machine: environment, peak bandwidth, timing, peak memory, OOM detection
    models.py   random-weight presets built on the device, checkpoints, quantized variants
    twin.py     transformers' LlamaForCausalLM on the same weights
    runner.py   run_bench: models x cache configurations x tests, interleaved repeats, rows
"""

from __future__ import annotations

from typing import Any

from llamactl.bench.options import (
    ATTN_KINDS,
    BITS,
    CPU_DEFAULTS,
    GPU_DEFAULTS,
    BenchOptions,
    BenchPlan,
    CacheConfig,
    DeviceDefaults,
    ModelKey,
    apply_device_defaults,
    plan_bench,
)
from llamactl.bench.rows import ENV_FIELDS, FIELDS, ROW_FIELDS, BenchReport, BenchRow, Environment, ProgressFn


def run_bench(options: BenchOptions | BenchPlan, progress: ProgressFn | None = None, device: Any = None) -> BenchReport:
    """Run a benchmark (see llamactl.bench.runner.run_bench); torch loads on the first call, not on import."""
    from llamactl.bench.runner import run_bench as run

    return run(options, progress, device)


__all__ = [
    "ATTN_KINDS",
    "BITS",
    "CPU_DEFAULTS",
    "ENV_FIELDS",
    "FIELDS",
    "GPU_DEFAULTS",
    "ROW_FIELDS",
    "BenchOptions",
    "BenchPlan",
    "BenchReport",
    "BenchRow",
    "CacheConfig",
    "DeviceDefaults",
    "Environment",
    "ModelKey",
    "ProgressFn",
    "apply_device_defaults",
    "plan_bench",
    "run_bench",
]
