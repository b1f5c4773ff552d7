"""The output schema of a benchmark: where it ran (Environment), one row per test, the report.

Field names follow llama-bench wherever they mean the same thing (model_size,
model_n_params, n_threads, type_k/type_v, n_prompt/n_gen/n_depth, avg_ts, samples_ns...),
so its tooling reads our json/jsonl/csv; the rest are ours (KV bytes measured and by
formula, peak bytes, bandwidth, the transformers twin, `test` as llama-bench prints it).
Rows with status "estimate" are not measured: the full model scaled from a --layers cut.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamactl.bench.options import BenchOptions

ProgressFn = Callable[[str], None]  # one line of progress for the CLI to show


@dataclass
class Environment:
    """Where the numbers were taken; repeated on every row of json/csv like llama-bench."""

    llamactl_version: str
    build_commit: str | None
    torch_version: str
    cuda_version: str | None
    backends: str
    gpu_info: str | None
    gpu_memory_bytes: int | None
    cpu_info: str
    cpu_cores: int | None
    cpu_threads: int | None
    n_threads: int
    ram_bytes: int
    peak_bandwidth_gbs: float
    cpu_fallback: bool = False
    omp_wait_policy: str = "default"  # OMP_WAIT_POLICY as torch loaded it ("default": libgomp's own)
    busy_cores_at_start: int = 0  # cores other processes kept busy when llamactl started
    # How the peak was found: the probe's best runs ("probe: best of 5 runs ..."), or "decode"
    # when a decode measured faster than that, which then is the peak (so % peak <= 100).
    peak_bandwidth_source: str = "probe"


@dataclass
class BenchRow:
    """One test (pp or tg) of one configuration; field names follow llama-bench where they agree."""

    model_type: str
    model_filename: str
    attn: str
    n_layer: int
    n_layer_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    type_w: str
    type_k: str  # the KV cache's element type, as ggml names it (f32, f16, bf16)
    type_v: str
    bits: int  # bits per weight as held: 32 / 16 unquantized, 8 / 4 quantized
    n_batch: int
    n_ctx: int
    n_prompt: int
    n_gen: int
    n_depth: int
    test: str
    status: str = "ok"  # ok | oom | error | estimate (scaled to the full model, not measured)
    error: str | None = None
    model_n_params: int | None = None
    avg_ns: float | None = None
    stddev_ns: float | None = None
    avg_ts: float | None = None
    stddev_ts: float | None = None
    median_ts: float | None = None
    ms_per_token: float | None = None
    samples_ns: list[int] = field(default_factory=list)
    samples_ts: list[float] = field(default_factory=list)
    kv_bytes: int | None = None
    kv_bytes_formula: int | None = None
    model_size: int | None = None  # bytes of the weights as held (llama-bench's model_size)
    peak_bytes: int | None = None
    bandwidth_gbs: float | None = None
    bandwidth_frac: float | None = None
    vs: str | None = None
    vs_avg_ts: float | None = None
    vs_stddev_ts: float | None = None
    vs_median_ts: float | None = None
    vs_samples_ts: list[float] = field(default_factory=list)
    speedup: float | None = None
    scheme: str | None = None  # the quantization scheme of bits 8 / 4 (q8, int8, q4, nf4...)
    step: str | None = None  # the decode step: eager, compiled, cuda-graph
    compile_s: float | None = None  # seconds the compiled step's first call took (compiling)


# The stable schema of json/jsonl/csv: environment fields then row fields, in this order.
ENV_FIELDS = tuple(f.name for f in dataclasses.fields(Environment))
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(BenchRow))
FIELDS = ("test_time", *ENV_FIELDS, *ROW_FIELDS)


@dataclass
class BenchReport:
    """Every row of a run (OOM configurations included) and where and when it ran."""

    environment: Environment
    rows: list[BenchRow]
    options: BenchOptions  # as run: the device's defaults filled in
    test_time: str  # ISO 8601, UTC
    # The full model scaled from rows run with fewer --layers: printed beside the rows in
    # table and md, never in json/jsonl/csv, whose every row is a measurement (llama-bench's).
    estimates: list[BenchRow] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """Flat dicts in FIELDS order, one per row (what json/jsonl/csv write)."""
        env = dataclasses.asdict(self.environment)
        return [{"test_time": self.test_time, **env, **dataclasses.asdict(row)} for row in self.rows]


def summarize(samples: list[float]) -> tuple[float, float, float]:
    """(mean, sample standard deviation, median) as the avg/stddev/median fields hold them; sd is 0
    for a single sample."""
    if not samples:
        return 0.0, 0.0, 0.0
    sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return statistics.fmean(samples), sd, statistics.median(samples)
