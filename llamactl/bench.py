"""Benchmarks: prefill and decode speed, KV-cache and weight memory, bandwidth, vs transformers.

What `llama-bench` measures (pp512 / tg128, mean ± sd over repeats) plus what it does not:
the KV cache by formula and as allocated, weight and peak memory, the effective memory
bandwidth of decode, MHA against GQA/MQA for the same shape, and transformers' own
`LlamaForCausalLM` on the same weights, interleaved with our repeats so both see the same
machine state. Results are plain dataclasses; the CLI formats them.

Decode is timed "with the cache filled to the context": the cache is preallocated for `ctx`
positions, positions 0..ctx-G-1 are filled with random keys/values (attention costs the same
whatever the values, and a real 4096-token prefill would dominate the run on a CPU), and G
tokens are generated greedily at positions ctx-G..ctx-1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamactl import __version__
from llamactl.config import ModelArgs, get_preset
from llamactl.devices import resolve_device
from llamactl.dtypes import FLOAT_NAMES, name_of, to_torch
from llamactl.errors import UsageError
from llamactl.estimate import kv_cache_bytes
from llamactl.graphs import decode_step
from llamactl.layout import param_count
from llamactl.model import Transformer

ATTN_KINDS = ("mha", "gqa", "mqa")
# Without a GPU, `llamactl bench` must finish in under two minutes on two cores: 7B-wide
# layers, but only a few of them, fewer generated tokens and repeats. Printed in the output.
CPU_DEFAULTS = {"layers": 2, "gen_tokens": 32, "repeat": 3, "dtype": "fp32"}
GPU_DEFAULTS = {"dtype": "bf16"}
ProgressFn = Callable[[str], None]


# --------------------------------------------------------------------------- formulas


def kv_heads_for(attn: str, args: ModelArgs, gqa_heads: int) -> int:
    """KV heads of the MHA / GQA / MQA variant of a shape ('native' keeps the model's own)."""
    if attn == "native":
        return args.kv_heads
    heads = {"mha": args.n_heads, "gqa": gqa_heads, "mqa": 1}[attn]
    if heads < 1 or args.n_heads % heads:
        raise UsageError(f"--kv-heads {heads}: must divide the {args.n_heads} attention heads")
    return heads


def summarize(samples: list[float]) -> tuple[float, float, float]:
    """(mean, sample standard deviation, median); sd is 0 for a single sample."""
    if not samples:
        return 0.0, 0.0, 0.0
    sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return statistics.fmean(samples), sd, statistics.median(samples)


# --------------------------------------------------------------------------- data


@dataclass
class BenchOptions:
    """Everything `llamactl bench` takes; list fields form a cross product like llama-bench."""

    model: str | None = None
    presets: list[str] = field(default_factory=lambda: ["7b"])
    ctx: list[int] = field(default_factory=lambda: [4096])
    prompt_tokens: list[int] = field(default_factory=lambda: [512])
    gen_tokens: list[int] | None = None  # None: 128, or CPU_DEFAULTS on the CPU
    batch: list[int] = field(default_factory=lambda: [1])
    attn: list[str] = field(default_factory=lambda: ["native"])
    kv_heads: list[int] = field(default_factory=lambda: [8])
    dtypes: list[str] | None = None  # None: bf16 on CUDA, fp32 on the CPU
    bits: list[int] = field(default_factory=lambda: [16])
    layers: list[int] | None = None  # None: all, or CPU_DEFAULTS on the CPU for presets
    warmup: int = 1
    repeat: int | None = None  # None: 5, or CPU_DEFAULTS on the CPU
    device: str | None = None  # None: cuda when available, else cpu
    vs: str | None = None  # "transformers" or None
    seed: int = 0
    args: ModelArgs | None = None  # a custom shape instead of the presets (library use, tests)


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
    type_k: str
    bits: int
    n_batch: int
    n_ctx: int
    n_prompt: int
    n_gen: int
    n_depth: int
    test: str
    status: str = "ok"  # ok | oom | error
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
    weight_bytes: int | None = None
    peak_bytes: int | None = None
    bandwidth_gbs: float | None = None
    bandwidth_frac: float | None = None
    vs: str | None = None
    vs_avg_ts: float | None = None
    vs_stddev_ts: float | None = None
    vs_median_ts: float | None = None
    vs_samples_ts: list[float] = field(default_factory=list)
    speedup: float | None = None


# The stable schema of json/jsonl/csv: environment fields then row fields, in this order.
ENV_FIELDS = tuple(f.name for f in dataclasses.fields(Environment))
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(BenchRow))
FIELDS = ("test_time", *ENV_FIELDS, *ROW_FIELDS)


@dataclass
class BenchReport:
    environment: Environment
    rows: list[BenchRow]
    options: BenchOptions
    test_time: str

    def records(self) -> list[dict[str, Any]]:
        """Flat dicts in FIELDS order, one per row (what json/jsonl/csv write)."""
        env = dataclasses.asdict(self.environment)
        return [{"test_time": self.test_time, **env, **dataclasses.asdict(row)} for row in self.rows]


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """Short commit of the checkout llamactl runs from, if it is one (no error otherwise)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.cache
def peak_bandwidth_gbs(device: torch.device) -> float:
    """measure_copy_bandwidth once per device and process (it allocates and moves 0.5-2 GB)."""
    return round(measure_copy_bandwidth(device), 1)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Peak memory bandwidth in GB/s: the best of a copy (bytes read + written), a sum and a
    matrix-vector product (bytes read) over the same buffer.

    Decode streams weights through matrix-vector products, so that is the ceiling it is held
    to; on a CPU a plain copy also pays write-allocate traffic and understates the peak.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    matrix, vector = src.view(-1, 1024), torch.ones(1024, device=device)
    kernels = [(2 * nbytes, lambda: dst.copy_(src)), (nbytes, src.sum), (nbytes, lambda: torch.mv(matrix, vector))]
    best = 0.0
    for moved, kernel in kernels:
        kernel()  # warm-up: page in, pick kernels
        ns = min(_time_ns(device, kernel) for _ in range(10 if device.type == "cuda" else 4))
        best = max(best, moved / ns)  # bytes per ns == GB/s
    return best


def describe_environment(device: torch.device, cpu_fallback: bool = False) -> Environment:
    import psutil

    gpu_info = gpu_mem = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_info, gpu_mem = props.name, props.total_memory
    return Environment(
        llamactl_version=__version__,
        build_commit=_git_commit(),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        backends="CUDA" if device.type == "cuda" else "CPU",
        gpu_info=gpu_info,
        gpu_memory_bytes=gpu_mem,
        cpu_info=_cpu_model(),
        cpu_cores=psutil.cpu_count(logical=False),
        cpu_threads=psutil.cpu_count(logical=True),
        n_threads=torch.get_num_threads(),
        ram_bytes=psutil.virtual_memory().total,
        peak_bandwidth_gbs=peak_bandwidth_gbs(device),
        cpu_fallback=cpu_fallback,
    )


# --------------------------------------------------------------------------- timing and memory


def _time_ns(device: torch.device, fn: Callable[[], Any]) -> int:
    """Wall time of fn in ns; CUDA events with synchronisation on the GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return max(1, round(start.elapsed_time(end) * 1e6))
    begin = time.perf_counter_ns()
    fn()
    return max(1, time.perf_counter_ns() - begin)


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind tensors (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class PeakMemory:
    """Peak memory of a stretch of code: torch.cuda statistics, or the process's peak RSS on CPU.

    On Linux the RSS high-water mark is reset through /proc/self/clear_refs; elsewhere the
    current RSS at `read()` is the best stand-in.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        import psutil

        return psutil.Process().memory_info().rss

    def allocated(self) -> int:
        """Bytes held right now: what tensors asked the CUDA allocator for, or RSS on CPU.

        `requested_bytes` rather than memory_allocated(): the latter counts whole allocator
        blocks, and a cached block too big to split (remainder <= 1 MiB) would be charged to
        the KV cache in full.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.memory_stats(self.device)["requested_bytes.all.current"])
        import psutil

        return psutil.Process().memory_info().rss


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory from CUDA or the CPU allocator."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free(device: torch.device, collect: bool = True) -> None:
    """Give memory back between configurations (gc.collect costs ~0.1 s, so only when needed)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- models


@dataclass
class _Built:
    """A model ready to benchmark, with what we know about it."""

    model: Transformer
    args: ModelArgs  # the shape actually built (after --layers / --attn)
    full_layers: int
    name: str
    filename: str
    dtype: torch.dtype
    bits: int


def build_random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A Transformer with random weights made directly on `device` (meta construction, no CPU copy)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    bound = 0.02 * 3**0.5  # uniform with sd 0.02: three times faster than normal_ on a CPU
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.uniform_(-bound, bound, generator=generator)
    model.reset_rope(args.max_seq_len)  # to_empty left the rotary tables uninitialised
    return model.eval()


def quantize_in_place(model: Transformer, bits: int, dtype: torch.dtype, device: torch.device) -> None:
    """int8 / nf4 through llamactl.quantize (bitsandbytes), computing in the benchmark's dtype."""
    from llamactl.quantize import QuantSpec, quantize_model

    quantize_model(model, QuantSpec(bits=bits, compute_dtype=name_of(dtype)), device)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as held: quantized projections at their packed size plus statistics."""
    quantized = [m for m in model.modules() if hasattr(m, "nbytes") and hasattr(m, "scheme")]
    inside = {id(p) for m in quantized for p in m.parameters()}
    plain = _storage_bytes(p for p in model.parameters() if id(p) not in inside)
    return plain + sum(int(m.nbytes) for m in quantized)


def _preset_args(preset: str | ModelArgs, attn: str, gqa_heads: int, layers: int | None) -> tuple[ModelArgs, int]:
    args = get_preset(preset) if isinstance(preset, str) else dataclasses.replace(preset)
    full = args.n_layers
    if layers is not None:
        if layers < 1:
            raise UsageError(f"--layers {layers}: must be at least 1")
        args = dataclasses.replace(args, n_layers=layers)
    args = dataclasses.replace(args, n_kv_heads=kv_heads_for(attn, args, gqa_heads))
    return args.validate(f"preset {preset}"), full


def _build(opts: BenchOptions, key: tuple, device: torch.device) -> _Built:
    preset, attn, gqa_heads, dtype_name, bits, layers = key
    dtype = to_torch(dtype_name)
    if opts.model is not None:
        from llamactl.loading import load_model

        loaded = load_model(opts.model, device=device, dtype=dtype)
        model, args = loaded.model, loaded.args
        name = Path(opts.model).name
        built = _Built(model, args, args.n_layers, name, str(opts.model), dtype, bits)
    else:
        args, full = _preset_args(opts.args or preset, attn, gqa_heads, layers)
        model = build_random_model(args, device, dtype, opts.seed)
        built = _Built(model, args, full, _model_name(opts, preset), "", dtype, bits)
    if bits != 16:
        quantize_in_place(built.model, bits, dtype, device)
    else:
        built.model.fuse_projections()
    return built


# --------------------------------------------------------------------------- the transformers twin


class _HFTwin:
    """transformers' LlamaForCausalLM sharing our weights (q/k permuted copies) on the same device."""

    def __init__(self, built: _Built, device: torch.device) -> None:
        try:
            import transformers
            from transformers import LlamaConfig, LlamaForCausalLM
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        except ImportError:
            from llamactl.errors import MissingDependencyError

            raise MissingDependencyError(
                "--vs transformers: transformers is not installed (pip install transformers)"
            ) from None
        from llamactl.checkpoint.keymap import meta_to_hf_name, permute_for_hf, rotary_heads
        from llamactl.config import hf_config_from_args

        transformers.logging.set_verbosity_error()
        args = built.args
        dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[built.dtype]
        config = LlamaConfig(**hf_config_from_args(args, dtype_name))
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            hf = LlamaForCausalLM(config)
        state = {}
        for name, tensor in built.model.state_dict().items():
            heads = rotary_heads(name, args.n_heads, args.kv_heads)
            hf_name = meta_to_hf_name(name)
            if hf_name is not None:
                state[hf_name] = permute_for_hf(tensor, heads).contiguous() if heads else tensor
        hf.load_state_dict(state, strict=True, assign=True)
        hf.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)
        hf.generation_config = transformers.GenerationConfig(
            do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=None
        )
        self.model = hf.eval()
        self.config = config
        self.device = device

    def prefill(self, tokens: torch.Tensor) -> None:
        self.model(input_ids=tokens, use_cache=True)

    def filled_cache(self, batch: int, depth: int, dtype: torch.dtype, generator: torch.Generator) -> Any:
        """A DynamicCache already holding `depth` random positions in every layer."""
        from transformers import DynamicCache

        cfg = self.config
        cache = DynamicCache(config=cfg)
        shape = (batch, cfg.num_key_value_heads, depth, cfg.head_dim)
        kv = torch.randn(shape, dtype=dtype, device=self.device, generator=generator)
        for i in range(cfg.num_hidden_layers):
            cache.update(kv, kv, i)  # update copies, so one random tensor serves every layer
        return cache

    def generate(self, ids: torch.Tensor, cache: Any, n_gen: int) -> None:
        with warnings.catch_warnings():  # 5.x renames past_key_values -> cache; both work
            warnings.simplefilter("ignore", FutureWarning)
            self._generate(ids, cache, n_gen)

    def _generate(self, ids: torch.Tensor, cache: Any, n_gen: int) -> None:
        self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=n_gen,
            min_new_tokens=n_gen,
            do_sample=False,
        )


# --------------------------------------------------------------------------- one configuration


def _prefill(model: Transformer, tokens: torch.Tensor) -> None:
    model(tokens, 0)


def _decode(model: Transformer, first: torch.Tensor, start: int, n_gen: int) -> None:
    """Greedy decode of n_gen tokens at start..; the next token stays on the device (no sync)."""
    tok = first
    for pos in range(start, start + n_gen):
        tok = decode_step(model, tok, pos)[:, -1].argmax(-1, keepdim=True)


def _fill_cache(model: Transformer, depth: int, generator: torch.Generator) -> None:
    """Random keys/values at positions 0..depth-1 of every layer's preallocated cache."""
    for layer in model.layers:
        cache = layer.attention.cache
        for buf in (cache.k, cache.v):
            part = buf[:, :, :depth]
            part.copy_(torch.randn(part.shape, dtype=buf.dtype, device=buf.device, generator=generator))


@dataclass
class _Config:
    """One cache shape; its pp and tg tests run on it (not crossed with each other, like llama-bench)."""

    ctx: int
    batch: int
    prompts: list[int]
    gens: list[int]

    def tests(self) -> list[tuple[str, int, int, int]]:
        """(name, n_prompt, n_gen, n_depth) for each test; zero lengths are skipped."""
        pp = [(f"pp{p}", p, 0, 0) for p in self.prompts if p]
        return pp + [(f"tg{g}@{self.ctx}", 0, g, self.ctx - g) for g in self.gens if g]


def _row(built: _Built, attn: str, cfg: _Config, test: str, n_prompt: int, n_gen: int, depth: int) -> BenchRow:
    args = built.args
    return BenchRow(
        model_type=built.name,
        model_filename=built.filename,
        attn=args.attention_kind,
        n_layer=args.n_layers,
        n_layer_model=built.full_layers,
        n_head=args.n_heads,
        n_kv_head=args.kv_heads,
        head_dim=args.head_dim,
        type_w=name_of(built.dtype),
        type_k=name_of(built.dtype),
        bits=built.bits,
        n_batch=cfg.batch,
        n_ctx=cfg.ctx,
        n_prompt=n_prompt,
        n_gen=n_gen,
        n_depth=depth,
        test=test,
        model_n_params=param_count(args),
        kv_bytes_formula=kv_cache_bytes(args, cfg.ctx, cfg.batch, name_of(built.dtype)),
    )


def _fill_stats(row: BenchRow, samples_ns: list[int], tokens: int, steps: int) -> None:
    row.samples_ns = samples_ns
    row.samples_ts = [tokens * 1e9 / ns for ns in samples_ns]
    row.avg_ns, row.stddev_ns, _ = summarize([float(ns) for ns in samples_ns])
    row.avg_ts, row.stddev_ts, row.median_ts = summarize(row.samples_ts)
    row.ms_per_token = row.avg_ns / steps / 1e6 if steps else None


class _Runner:
    """Runs every test of one built model, with the twin when --vs transformers."""

    def __init__(
        self, built: _Built, opts: BenchOptions, device: torch.device, env: Environment, progress: ProgressFn
    ) -> None:
        self.built, self.opts, self.device, self.env, self.progress = built, opts, device, env, progress
        self.generator = torch.Generator(device=device).manual_seed(opts.seed)
        self.memory = PeakMemory(device)
        self.twin: _HFTwin | None = None
        self.twin_bytes = 0

    def _twin(self) -> _HFTwin:
        if self.twin is None:
            before = self.memory.allocated()
            self.twin = _HFTwin(self.built, self.device)
            self.twin_bytes = max(0, self.memory.allocated() - before)
        return self.twin

    def _tokens(self, batch: int, length: int) -> torch.Tensor:
        vocab = self.built.args.vocab_size
        return torch.randint(0, vocab, (batch, length), device=self.device, generator=self.generator)

    def _repeat(self, ours: Callable[[], int], theirs: Callable[[], int] | None) -> tuple[list[int], list[int], int]:
        """Warm-ups then interleaved repeats; returns (our ns, their ns, our peak bytes)."""
        peak = 0
        for _ in range(self.opts.warmup):
            self.memory.reset()
            ours()
            peak = max(peak, self.memory.read() - self.twin_bytes)
            if theirs is not None:
                theirs()
        our_ns, their_ns = [], []
        for _ in range(self.opts.repeat or 1):
            self.memory.reset()
            our_ns.append(ours())
            peak = max(peak, self.memory.read() - self.twin_bytes)
            if theirs is not None:
                their_ns.append(theirs())
        return our_ns, their_ns, peak

    def run(self, cfg: _Config, attn: str) -> list[BenchRow]:
        built, model = self.built, self.built.model
        rows = [_row(built, attn, cfg, *test) for test in cfg.tests()]
        try:
            self._run(cfg, rows)
        except Exception as exc:  # an OOM becomes a row, not a crash
            if not is_oom(exc):
                raise
            for row in rows:
                if row.avg_ts is None:
                    row.status, row.error = "oom", _oom_message(exc)
            del exc
            oom = True
        else:
            oom = False
        model.clear_cache()
        _free(self.device, collect=oom)
        return rows

    def _run(self, cfg: _Config, rows: list[BenchRow]) -> None:
        built, model, device = self.built, self.built.model, self.device
        held = weight_bytes(model)
        for row in rows:
            row.weight_bytes = held
        before = self.memory.allocated()
        setup_bytes = model.setup_cache(cfg.batch, cfg.ctx, built.dtype)
        kv_measured = (
            self.memory.allocated() - before
            if device.type == "cuda"
            else _storage_bytes(b for layer in model.layers for b in (layer.attention.cache.k, layer.attention.cache.v))
        )
        assert setup_bytes == sum(layer.attention.cache.nbytes for layer in model.layers)
        for row in rows:
            row.kv_bytes = kv_measured
        vs = self.opts.vs == "transformers"
        for row in rows:
            self.progress(f"{built.name} {row.attn} {row.type_w} b{cfg.batch} {row.test}")
            if row.n_prompt:
                self._prefill_row(row, cfg, vs)
            else:
                self._decode_row(row, cfg, vs)

    def _prefill_row(self, row: BenchRow, cfg: _Config, vs: bool) -> None:
        model, device = self.built.model, self.device
        tokens = self._tokens(cfg.batch, row.n_prompt)

        def ours() -> int:
            with torch.inference_mode():
                return _time_ns(device, lambda: _prefill(model, tokens))

        def theirs() -> int:
            twin = self._twin()
            with torch.inference_mode():
                return _time_ns(device, lambda: twin.prefill(tokens))

        our_ns, their_ns, peak = self._repeat(ours, theirs if vs else None)
        self._finish(row, our_ns, their_ns, peak, cfg.batch * row.n_prompt, 0)

    def _decode_row(self, row: BenchRow, cfg: _Config, vs: bool) -> None:
        model, device, depth, n_gen = self.built.model, self.device, row.n_depth, row.n_gen
        with torch.inference_mode():
            _fill_cache(model, depth, self.generator)
        first = self._tokens(cfg.batch, 1)

        def ours() -> int:
            with torch.inference_mode():
                return _time_ns(device, lambda: _decode(model, first, depth, n_gen))

        def theirs() -> int:
            twin = self._twin()
            with torch.inference_mode():
                cache = twin.filled_cache(cfg.batch, depth, self.built.dtype, self.generator)
                ids = self._tokens(cfg.batch, depth + 1)
                return _time_ns(device, lambda: twin.generate(ids, cache, n_gen))

        our_ns, their_ns, peak = self._repeat(ours, theirs if vs else None)
        self._finish(row, our_ns, their_ns, peak, cfg.batch * n_gen, n_gen)
        # Bytes one decode step reads: every weight but the embedding table (one row is
        # gathered), plus the KV cache as filled on average over the generated tokens.
        embedding = model.tok_embeddings.weight
        per_step = row.weight_bytes - embedding.nbytes + embedding[0].nbytes * cfg.batch
        per_step += row.kv_bytes_formula * (depth + (n_gen + 1) / 2) / cfg.ctx
        steps_per_s = row.avg_ts / cfg.batch
        row.bandwidth_gbs = per_step * steps_per_s / 1e9
        if self.env.peak_bandwidth_gbs:
            row.bandwidth_frac = row.bandwidth_gbs / self.env.peak_bandwidth_gbs

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


def _oom_message(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "out of memory"


# --------------------------------------------------------------------------- the whole run


def apply_device_defaults(opts: BenchOptions, device: torch.device) -> BenchOptions:
    """Fill options left unset with the device's defaults (smaller on the CPU, see CPU_DEFAULTS)."""
    cpu = device.type == "cpu"
    opts = dataclasses.replace(opts)
    if opts.gen_tokens is None:
        opts.gen_tokens = [CPU_DEFAULTS["gen_tokens"] if cpu else 128]
    if opts.repeat is None:
        opts.repeat = CPU_DEFAULTS["repeat"] if cpu else 5
    if opts.dtypes is None:
        opts.dtypes = [CPU_DEFAULTS["dtype"] if cpu else GPU_DEFAULTS["dtype"]]
    if opts.layers is None:
        opts.layers = [CPU_DEFAULTS["layers"]] if cpu and opts.model is None else [None]  # type: ignore[list-item]
    return opts


def validate_options(opts: BenchOptions) -> None:
    """Reject impossible combinations before any model is built."""
    for name, values in (("--ctx", opts.ctx), ("--batch", opts.batch)):
        for v in values:
            if v < 1:
                raise UsageError(f"{name} {v}: must be at least 1")
    for name, values in (("--prompt-tokens", opts.prompt_tokens), ("--gen-tokens", opts.gen_tokens or [])):
        for v in values:
            if v < 0:
                raise UsageError(f"{name} {v}: must not be negative")
            if v > min(opts.ctx):
                raise UsageError(f"{name} {v}: longer than --ctx {min(opts.ctx)}")
    for a in opts.attn:
        if a not in (*ATTN_KINDS, "native"):
            raise UsageError(f"--attn {a}: expected one of {', '.join(ATTN_KINDS)}")
    for d in opts.dtypes or []:
        if d not in FLOAT_NAMES:
            raise UsageError(f"--dtype {d}: expected one of {', '.join(FLOAT_NAMES)}")
    for b in opts.bits:
        if b not in (16, 8, 4):
            raise UsageError(f"--bits {b}: expected 16, 8 or 4")
    if opts.warmup < 0 or (opts.repeat is not None and opts.repeat < 1):
        raise UsageError("--warmup must be >= 0 and --repeat >= 1")
    if opts.vs not in (None, "transformers"):
        raise UsageError(f"--vs {opts.vs}: only 'transformers' is supported")
    if opts.vs and opts.bits != [16]:
        raise UsageError("--vs transformers: compares unquantized weights only (--bits 16)")
    if opts.model is not None:
        if opts.attn != ["native"]:
            raise UsageError("--attn needs --preset: a checkpoint's attention is fixed by its weights")
        if opts.layers not in (None, [None]):
            raise UsageError("--layers needs --preset: a checkpoint is benchmarked whole")
    else:
        shapes = [opts.args] if opts.args is not None else [get_preset(p) for p in opts.presets]
        for args in shapes:
            for attn, heads in itertools.product(opts.attn, opts.kv_heads):
                kv_heads_for(attn, args, heads)


def run_bench(
    opts: BenchOptions,
    progress: ProgressFn | None = None,
    device: torch.device | None = None,
    cpu_fallback: bool = False,
) -> BenchReport:
    """Run the cross product of `opts` and return every row (OOM configurations included)."""
    progress = progress or (lambda _msg: None)
    if device is None:
        device, cpu_fallback = resolve_device(opts.device)
    opts = apply_device_defaults(opts, device)
    validate_options(opts)
    test_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    progress("measuring peak memory bandwidth")
    env = describe_environment(device, cpu_fallback)
    rows: list[BenchRow] = []
    presets = [None] if opts.model is not None or opts.args is not None else opts.presets
    model_keys = itertools.product(
        presets, opts.attn, opts.kv_heads if _uses_gqa(opts) else [8], opts.dtypes, opts.bits, opts.layers
    )
    configs = [_Config(ctx, b, opts.prompt_tokens, opts.gen_tokens) for ctx in opts.ctx for b in opts.batch]
    for key in model_keys:
        rows.extend(_bench_model(opts, key, configs, device, env, progress))
    return BenchReport(env, rows, opts, test_time)


def _model_name(opts: BenchOptions, preset: str | None) -> str:
    return preset if opts.args is None else f"custom-{opts.args.dim}d"


def _uses_gqa(opts: BenchOptions) -> bool:
    return "gqa" in opts.attn


def _bench_model(
    opts: BenchOptions,
    key: tuple,
    configs: list[_Config],
    device: torch.device,
    env: Environment,
    progress: ProgressFn,
) -> list[BenchRow]:
    preset, attn = key[0], key[1]
    progress(f"building {opts.model or preset} ({attn}) on {device.type}")
    built: _Built | None = None
    try:
        built = _build(opts, key, device)
        runner = _Runner(built, opts, device, env, progress)
        return [row for cfg in configs for row in runner.run(cfg, attn)]
    except Exception as exc:  # a model too big for the device: OOM rows
        if not is_oom(exc):
            raise
        return _oom_rows(opts, key, configs, exc)
    finally:
        del built
        _free(device)


def _oom_rows(opts: BenchOptions, key: tuple, configs: list[_Config], exc: BaseException) -> list[BenchRow]:
    """Rows for a model that could not even be built: shape from the preset, no timings."""
    preset, attn, gqa_heads, dtype_name, bits, layers = key
    if opts.model is not None:
        from llamactl.checkpoint import open_checkpoint

        args = open_checkpoint(opts.model).args
        full = args.n_layers
        name = Path(opts.model).name
    else:
        args, full = _preset_args(opts.args or preset, attn, gqa_heads, layers)
        name = _model_name(opts, preset)
    dtype = to_torch(dtype_name)
    stub = _Built(
        model=torch.nn.Linear(1, 1, bias=False),
        args=args,
        full_layers=full,
        name=name,  # type: ignore[arg-type]
        filename=opts.model or "",
        dtype=dtype,
        bits=bits,
    )
    rows = [_row(stub, attn, cfg, *test) for cfg in configs for test in cfg.tests()]
    for row in rows:
        row.status, row.error = "oom", _oom_message(exc)
    return rows
