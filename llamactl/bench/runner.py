"""Running a plan: for each model, for each cache configuration, each test as warm-ups then repeats.

Decode is timed "with the cache filled to the context": the cache is preallocated for `ctx`
positions, positions 0..ctx-G-1 are filled with random keys/values (attention costs the same
whatever the values, and a real 4096-token prefill would dominate the run on a CPU), and G
tokens are generated greedily at positions ctx-G..ctx-1.

With `vs transformers` each of our repeats is followed by one of the twin's, so both see the
same machine state. An out-of-memory error becomes a row with status "oom", never a crash.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from llamactl.bench.models import BuiltModel, ModelShape, build_model, describe_model
from llamactl.bench.options import BenchOptions, BenchPlan, CacheConfig, ModelKey, plan_bench
from llamactl.bench.probes import (
    PeakMemory,
    describe_environment,
    free_memory,
    is_oom,
    oom_message,
    storage_bytes,
    time_ns,
)
from llamactl.bench.rows import BenchReport, BenchRow, Environment, ProgressFn, summarize
from llamactl.bench.twin import HFTwin
from llamactl.dtypes import lookup, name_of
from llamactl.engine import DecodeStep
from llamactl.engine.memory import weight_bytes
from llamactl.estimate import kv_cache_bytes
from llamactl.layout import param_count
from llamactl.model import Transformer


def run_bench(
    options: BenchOptions | BenchPlan,
    progress: ProgressFn | None = None,
    device: torch.device | None = None,
) -> BenchReport:
    """Run the cross product of the options and return every row (OOM configurations included).

    Args:
        options: what to run. BenchOptions are planned, and so validated, here; a BenchPlan
            from `plan_bench` runs as it is.
        progress: called with one short line before each build and test (the CLI's status line).
        device: with BenchOptions, run here instead of resolving `options.device`.

    Ctrl-C or SIGTERM mid-run propagates with `partial_report` set on the exception: the
    rows finished so far, so the caller can still print them.
    """
    if isinstance(options, BenchPlan):
        if device is not None:
            raise ValueError("run_bench: a BenchPlan already has its device; give it to plan_bench")
        plan = options
    else:
        plan = plan_bench(options, device)
    progress = progress or (lambda _msg: None)
    test_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    progress("measuring peak memory bandwidth")
    env = describe_environment(plan.device, plan.cpu_fallback)
    rows: list[BenchRow] = []
    estimates: list[BenchRow] = []
    try:
        for key in plan.models:
            estimates += _bench_model(plan, key, env, progress, rows)
    except KeyboardInterrupt as exc:
        cap_peak_bandwidth(env, rows)
        exc.partial_report = BenchReport(env, rows, plan.options, test_time)  # type: ignore[attr-defined]
        raise
    cap_peak_bandwidth(env, rows)
    return BenchReport(env, rows, plan.options, test_time, estimates)


def cap_peak_bandwidth(env: Environment, rows: list[BenchRow]) -> None:
    """Make "% peak" a true fraction: a decode faster than the probe's best run shows that the
    device's peak is at least that fast, so the peak is raised to it (and says so)."""
    fastest = max((r.bandwidth_gbs for r in rows if r.bandwidth_gbs is not None), default=0.0)
    if fastest > env.peak_bandwidth_gbs:
        # Unrounded: a tiny model decodes at < 0.05 GB/s.
        env.peak_bandwidth_gbs, env.peak_bandwidth_source = fastest, "decode"
    for row in rows:
        if row.bandwidth_gbs is not None and env.peak_bandwidth_gbs:
            row.bandwidth_frac = min(1.0, row.bandwidth_gbs / env.peak_bandwidth_gbs)


def _bench_model(
    plan: BenchPlan, key: ModelKey, env: Environment, progress: ProgressFn, rows: list[BenchRow]
) -> list[BenchRow]:
    """Every configuration and test of one model, appended to rows as each finishes (OOM rows
    when it does not even fit); returns the full-model estimates when --layers cut it."""
    progress(f"building {plan.options.model or key.preset} ({key.attn}) on {plan.device.type}")
    built: BuiltModel | None = None
    start = len(rows)
    try:
        built = build_model(plan, key)
        runner = _ModelRunner(built, plan, env, progress)
        for cfg in plan.configs:
            rows.extend(runner.run(cfg))
        return full_model_estimates(rows[start:], built)
    except Exception as exc:  # a model too big for the device: OOM rows
        if not is_oom(exc):
            raise
        del rows[start:]  # a model that fits only partly is reported as not fitting, as a whole
        rows.extend(_oom_rows(plan, key, exc))
        return []
    finally:
        del built
        free_memory(plan.device)


def _oom_rows(plan: BenchPlan, key: ModelKey, exc: BaseException) -> list[BenchRow]:
    """Rows for a model that could not even be built: its shape from the config, no timings."""
    shape = describe_model(plan, key)
    rows = [_row(shape, cfg, *test) for cfg in plan.configs for test in cfg.tests()]
    for row in rows:
        row.status, row.error = "oom", oom_message(exc)
    return rows


def ggml_type_name(dtype: torch.dtype) -> str:
    """The KV cache's element type as llama-bench's type_k / type_v name it: f32, f16, bf16."""
    return lookup(dtype).safetensors.lower()


def _row(shape: ModelShape, cfg: CacheConfig, test: str, n_prompt: int, n_gen: int, depth: int) -> BenchRow:
    """A row with what is known before timing: the model, the configuration, the formulas."""
    args = shape.args
    kv_type = ggml_type_name(shape.dtype)
    return BenchRow(
        model_type=shape.name,
        model_filename=shape.filename,
        attn=args.attention_kind,
        n_layer=args.n_layers,
        n_layer_model=shape.full_layers,
        n_head=args.n_heads,
        n_kv_head=args.kv_heads,
        head_dim=args.head_dim,
        type_w=name_of(shape.dtype),
        type_k=kv_type,
        type_v=kv_type,
        # Unquantized weights are held in the compute dtype: 32 bits for fp32, 16 for bf16/fp16.
        bits=shape.bits if shape.scheme else 8 * lookup(shape.dtype).itemsize,
        scheme=shape.scheme,
        n_batch=cfg.batch,
        n_ctx=cfg.ctx,
        n_prompt=n_prompt,
        n_gen=n_gen,
        n_depth=depth,
        test=test,
        model_n_params=param_count(args),
        kv_bytes_formula=kv_cache_bytes(args, cfg.ctx, cfg.batch, name_of(shape.dtype)),
    )


def full_model_estimates(rows: list[BenchRow], built: BuiltModel) -> list[BenchRow]:
    """For a model cut by --layers: each measured row scaled to all its layers, status "estimate".

    Time per token grows with the layers (× full / kept: embedding and output head are
    counted as if they were layers too, so the estimate errs slow); weights grow by the
    bytes of one block per missing layer, the KV cache by its formula. Nothing is measured.
    """
    shape = built.shape
    kept, full = shape.args.n_layers, shape.full_layers
    if kept >= full:
        return []
    layer_bytes = weight_bytes(built.model.layers) / kept  # one transformer block as held
    full_args = dataclasses.replace(shape.args, n_layers=full)
    scale = full / kept
    out = []
    for row in rows:
        if row.status != "ok":
            continue
        est = dataclasses.replace(
            row,
            status="estimate",
            n_layer=full,
            model_n_params=param_count(full_args),
            model_size=round(row.model_size + (full - kept) * layer_bytes) if row.model_size else None,
            kv_bytes=None,
            kv_bytes_formula=kv_cache_bytes(full_args, row.n_ctx, row.n_batch, name_of(shape.dtype)),
            avg_ns=row.avg_ns * scale if row.avg_ns else None,
            stddev_ns=row.stddev_ns * scale if row.stddev_ns else None,
            avg_ts=row.avg_ts / scale if row.avg_ts else None,
            stddev_ts=row.stddev_ts / scale if row.stddev_ts else None,
            median_ts=row.median_ts / scale if row.median_ts else None,
            ms_per_token=row.ms_per_token * scale if row.ms_per_token else None,
            samples_ns=[],
            samples_ts=[],
            peak_bytes=None,
            bandwidth_gbs=None,
            bandwidth_frac=None,
            vs=None,
            vs_avg_ts=None,
            vs_stddev_ts=None,
            vs_median_ts=None,
            vs_samples_ts=[],
            speedup=None,
        )
        out.append(est)
    return out


def _prefill(model: Transformer, tokens: torch.Tensor) -> None:
    model(tokens, 0, last_only=True)  # tokens [batch, n_prompt] -> logits [batch, 1, vocab], cache filled


def _decode(step: DecodeStep, first: torch.Tensor, start: int, n_gen: int) -> None:
    """Greedy decode of n_gen tokens at start..; the next token stays on the device (no sync)."""
    tok = first  # [batch, 1]
    for pos in range(start, start + n_gen):
        # logits [batch, 1, vocab] -> the greedy next token [batch, 1]
        tok = step(tok, pos)[:, -1].argmax(-1, keepdim=True)


def _fill_cache(model: Transformer, depth: int, generator: torch.Generator) -> None:
    """Random keys/values at positions 0..depth-1 of every layer's preallocated cache."""
    for layer in model.layers:
        cache = layer.attention.cache
        for buf in (cache.k, cache.v):  # [batch, kv_heads, ctx, head_dim]
            part = buf[:, :, :depth]
            part.copy_(torch.randn(part.shape, dtype=buf.dtype, device=buf.device, generator=generator))


class _ModelRunner:
    """Runs every test of one built model, with the transformers twin when the plan says vs."""

    def __init__(self, built: BuiltModel, plan: BenchPlan, env: Environment, progress: ProgressFn) -> None:
        self.built, self.plan, self.device, self.env, self.progress = built, plan, plan.device, env, progress
        self.generator = torch.Generator(device=plan.device).manual_seed(plan.options.seed)
        self.memory = PeakMemory(plan.device)
        self.twin: HFTwin | None = None
        self.twin_bytes = 0  # the twin's own copies (q/k permuted), not charged to our peak

    def _twin(self) -> HFTwin:
        if self.twin is None:
            before = self.memory.allocated()
            shape = self.built.shape
            self.twin = HFTwin(self.built.model, shape.args, shape.dtype, self.device)
            self.twin_bytes = max(0, self.memory.allocated() - before)
        return self.twin

    def _tokens(self, batch: int, length: int) -> torch.Tensor:
        vocab = self.built.shape.args.vocab_size
        return torch.randint(0, vocab, (batch, length), device=self.device, generator=self.generator)

    def _repeat(self, ours: Callable[[], int], theirs: Callable[[], int] | None) -> tuple[list[int], list[int], int]:
        """Warm-ups then interleaved repeats; returns (our ns, their ns, our peak bytes)."""
        peak = 0
        for _ in range(self.plan.options.warmup):
            self.memory.reset()
            ours()
            peak = max(peak, self.memory.read() - self.twin_bytes)
            if theirs is not None:
                theirs()
        our_ns, their_ns = [], []
        for _ in range(self.plan.repeat):
            self.memory.reset()
            our_ns.append(ours())
            peak = max(peak, self.memory.read() - self.twin_bytes)
            if theirs is not None:
                their_ns.append(theirs())
        return our_ns, their_ns, peak

    def run(self, cfg: CacheConfig) -> list[BenchRow]:
        """The rows of one configuration; an OOM marks the rows not yet timed and the run goes on."""
        model = self.built.model
        rows = [_row(self.built.shape, cfg, *test) for test in cfg.tests()]
        try:
            self._run(cfg, rows)
        except Exception as exc:  # an OOM becomes a row, not a crash
            if not is_oom(exc):
                raise
            for row in rows:
                if row.avg_ts is None:
                    row.status, row.error = "oom", oom_message(exc)
            del exc
            oom = True
        else:
            oom = False
        model.clear_cache()
        free_memory(self.device, collect=oom)
        return rows

    def _run(self, cfg: CacheConfig, rows: list[BenchRow]) -> None:
        shape, model, device = self.built.shape, self.built.model, self.device
        held = weight_bytes(model)
        for row in rows:
            row.model_size = held
        before = self.memory.allocated()
        setup_bytes = model.setup_cache(cfg.batch, cfg.ctx, shape.dtype)
        # On the GPU the allocator's delta; on the CPU RSS is too coarse, so the cache's storage.
        kv_measured = (
            self.memory.allocated() - before
            if device.type == "cuda"
            else storage_bytes(b for layer in model.layers for b in (layer.attention.cache.k, layer.attention.cache.v))
        )
        assert setup_bytes == model.cache_bytes
        for row in rows:
            row.kv_bytes = kv_measured
        vs = self.plan.options.vs == "transformers"
        for row in rows:
            self.progress(f"{shape.name} {row.attn} {row.type_w} b{cfg.batch} {row.test}")
            if row.n_prompt:
                self._prefill_row(row, cfg, vs)
            else:
                self._decode_row(row, cfg, vs)

    def _prefill_row(self, row: BenchRow, cfg: CacheConfig, vs: bool) -> None:
        model, device = self.built.model, self.device
        tokens = self._tokens(cfg.batch, row.n_prompt)

        def ours() -> int:
            with torch.inference_mode():
                return time_ns(device, lambda: _prefill(model, tokens))

        def theirs() -> int:
            twin = self._twin()
            with torch.inference_mode():
                return time_ns(device, lambda: twin.prefill(tokens))

        our_ns, their_ns, peak = self._repeat(ours, theirs if vs else None)
        self._finish(row, our_ns, their_ns, peak, cfg.batch * row.n_prompt, 0)

    def _decode_row(self, row: BenchRow, cfg: CacheConfig, vs: bool) -> None:
        model, device, depth, n_gen = self.built.model, self.device, row.n_depth, row.n_gen
        with torch.inference_mode():
            _fill_cache(model, depth, self.generator)
        first = self._tokens(cfg.batch, 1)

        def ours() -> int:
            with torch.inference_mode():
                return time_ns(device, lambda: _decode(self.built.step, first, depth, n_gen))

        def theirs() -> int:
            twin = self._twin()
            with torch.inference_mode():
                cache = twin.filled_cache(cfg.batch, depth, self.built.shape.dtype, self.generator)
                ids = self._tokens(cfg.batch, depth + 1)
                return time_ns(device, lambda: twin.generate(ids, cache, n_gen))

        our_ns, their_ns, peak = self._repeat(ours, theirs if vs else None)
        self._finish(row, our_ns, their_ns, peak, cfg.batch * n_gen, n_gen)
        step = self.built.step
        row.step = "eager" if getattr(step, "failed", False) else getattr(step, "kind", type(step).__name__)
        row.compile_s = getattr(step, "compile_seconds", None)
        # Bytes one decode step reads: every weight but the embedding table (one row is
        # gathered), plus the KV cache as filled on average over the generated tokens.
        embedding = model.tok_embeddings.weight
        per_step = row.model_size - embedding.nbytes + embedding[0].nbytes * cfg.batch
        per_step += row.kv_bytes_formula * (depth + (n_gen + 1) / 2) / cfg.ctx
        steps_per_s = row.avg_ts / cfg.batch
        row.bandwidth_gbs = per_step * steps_per_s / 1e9  # bandwidth_frac: cap_peak_bandwidth, after every row

    def _finish(
        self, row: BenchRow, our_ns: list[int], their_ns: list[int], peak: int, tokens: int, steps: int
    ) -> None:
        _fill_stats(row, our_ns, tokens, steps)
        row.peak_bytes = peak
        if their_ns:
            row.vs = "transformers"
            row.vs_samples_ts = [tokens * 1e9 / ns for ns in their_ns]
            row.vs_avg_ts, row.vs_stddev_ts, row.vs_median_ts = summarize(row.vs_samples_ts)
            # Medians: one sample slowed by a noisy neighbour must not decide the ratio.
            row.speedup = row.median_ts / row.vs_median_ts


def _fill_stats(row: BenchRow, samples_ns: list[int], tokens: int, steps: int) -> None:
    """Timings of `tokens` tokens in `steps` forward passes into the row (tokens/s per sample)."""
    row.samples_ns = samples_ns
    row.samples_ts = [tokens * 1e9 / ns for ns in samples_ns]
    row.avg_ns, row.stddev_ns, _ = summarize([float(ns) for ns in samples_ns])
    row.avg_ts, row.stddev_ts, row.median_ts = summarize(row.samples_ts)
    row.ms_per_token = row.avg_ns / steps / 1e6 if steps else None
