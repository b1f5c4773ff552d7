"""What a benchmark is asked to run (BenchOptions) and the one place it is checked (plan_bench).

Every list in BenchOptions is one axis of a cross product, as in llama-bench. Fields left None
take the device's default: a CPU run keeps to two minutes on two cores (CPU_DEFAULTS).
`plan_bench` fills those defaults and validates everything exactly once, before any model is
built or anything is measured; what it returns, a BenchPlan, is trusted from then on.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamactl.config import ModelArgs, get_preset
from llamactl.dtypes import FLOAT_NAMES
from llamactl.errors import UsageError
from llamactl.quantize.spec import DEFAULT_SCHEME_FOR_BITS, SCHEMES

if TYPE_CHECKING:
    import torch

ATTN_KINDS = ("mha", "gqa", "mqa")
BITS = (16, 8, 4)  # 16: the dtype as is; 8 and 4: the schemes --bits picks (q8, q4)


@dataclass(frozen=True)
class DeviceDefaults:
    """What options left None become on a device."""

    layers: int | None  # None: every layer of the preset
    gen_tokens: int
    repeat: int
    dtype: str


# Without a GPU, `llamactl bench` must finish in under two minutes on two cores: 7B-wide
# layers, but only a few of them, fewer generated tokens and repeats. Printed in the output.
CPU_DEFAULTS = DeviceDefaults(layers=2, gen_tokens=32, repeat=3, dtype="fp32")
GPU_DEFAULTS = DeviceDefaults(layers=None, gen_tokens=128, repeat=5, dtype="bf16")


@dataclass
class BenchOptions:
    """Everything a benchmark takes; list fields form a cross product like llama-bench's."""

    model: str | None = None  # a checkpoint (path or installed name) instead of the presets
    presets: list[str] = field(default_factory=lambda: ["7b"])
    ctx: list[int] = field(default_factory=lambda: [4096])
    prompt_tokens: list[int] = field(default_factory=lambda: [512])
    gen_tokens: list[int] | None = None  # None: 128, or CPU_DEFAULTS on the CPU
    batch: list[int] = field(default_factory=lambda: [1])
    attn: list[str] = field(default_factory=lambda: ["native"])  # "native": the shape's own heads
    kv_heads: list[int] = field(default_factory=lambda: [8])  # KV heads of the "gqa" variant
    dtypes: list[str] | None = None  # None: bf16 on CUDA, fp32 on the CPU
    bits: list[int] = field(default_factory=lambda: [16])
    schemes: list[str] = field(default_factory=list)  # named schemes (q4, int8, nf4...), after the bits
    layers: list[int | None] | None = None  # None: all, or CPU_DEFAULTS on the CPU; an item None: all
    warmup: int = 1
    repeat: int | None = None  # None: 5, or CPU_DEFAULTS on the CPU
    device: str | None = None  # None: cuda when available, else cpu
    vs: str | None = None  # "transformers" or None
    seed: int = 0
    args: ModelArgs | None = None  # a custom shape instead of the presets (library use, tests)


@dataclass(frozen=True)
class ModelKey:
    """One model a run builds: a point of presets × attn × kv_heads × dtypes × bits × layers.

    Every configuration (context × batch) and test (pp, tg) of the run is measured on it.
    """

    preset: str | None  # None: BenchOptions.model or BenchOptions.args is benchmarked
    attn: str  # "native" or one of ATTN_KINDS
    gqa_heads: int | None  # the kv_heads value of this point; only attn "gqa" uses it
    dtype: str  # short name ("bf16"), weights and KV cache alike
    bits: int  # one of BITS
    scheme: str | None  # the quantization scheme (None: bits 16, unquantized)
    layers: int | None  # keep only the first N layers; None: all of them


@dataclass(frozen=True)
class CacheConfig:
    """One KV-cache shape; its pp and tg tests all run on it (not crossed, like llama-bench)."""

    ctx: int
    batch: int
    prompts: tuple[int, ...]
    gens: tuple[int, ...]

    def tests(self) -> list[tuple[str, int, int, int]]:
        """(name, n_prompt, n_gen, n_depth) for each test; zero lengths are skipped.

        A tg test decodes the last n_gen positions of the context, so it starts at depth
        ctx - n_gen; names are llama-bench's: "pp512", "tg32 @ d4064" (32 tokens decoded
        after 4064 already in the cache).
        """
        pp = [(test_name(p, 0, 0), p, 0, 0) for p in self.prompts if p]
        return pp + [(test_name(0, g, self.ctx - g), 0, g, self.ctx - g) for g in self.gens if g]


def test_name(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """llama-bench's name of a test: pp512, tg128, pp512+tg128, then " @ d4096" at a depth."""
    name = f"pp{n_prompt}" if not n_gen else f"tg{n_gen}" if not n_prompt else f"pp{n_prompt}+tg{n_gen}"
    return name + (f" @ d{n_depth}" if n_depth else "")


@dataclass(frozen=True)
class BenchPlan:
    """A validated run: the options with the device's defaults filled in, and what they expand to.

    Make one with `plan_bench`, which is where every check happens; the runner trusts it.
    """

    options: BenchOptions  # a private copy: no None left in gen_tokens, dtypes, layers, repeat
    device: torch.device
    cpu_fallback: bool  # no device was asked for and there is no GPU
    models: tuple[ModelKey, ...]  # in build order
    configs: tuple[CacheConfig, ...]  # run on every model, in this order

    @property
    def repeat(self) -> int:
        assert self.options.repeat is not None  # filled by plan_bench
        return self.options.repeat


def plan_bench(options: BenchOptions, device: torch.device | None = None) -> BenchPlan:
    """Resolve the device, fill its defaults and validate every option: the one check of a run.

    Args:
        options: what to run; it is copied, never changed.
        device: run here instead of resolving `options.device`.

    Raises:
        UsageError: an option is out of range, options contradict each other, or an unknown preset.
        ConfigError: a custom shape that cannot be a Llama.
    """
    cpu_fallback = False
    if device is None:
        from llamactl.devices import resolve_device  # torch: importing this module must stay cheap

        device, cpu_fallback = resolve_device(options.device)
    opts = apply_device_defaults(options, device)
    _validate(opts)
    models = _model_keys(opts)
    _validate_shapes(opts, models)
    configs = tuple(
        CacheConfig(ctx, batch, tuple(opts.prompt_tokens), tuple(opts.gen_tokens or ()))
        for ctx in opts.ctx
        for batch in opts.batch
    )
    return BenchPlan(opts, device, cpu_fallback, models, configs)


def apply_device_defaults(opts: BenchOptions, device: torch.device) -> BenchOptions:
    """A copy of opts with every option left None set to the device's default (see CPU_DEFAULTS)."""
    defaults = CPU_DEFAULTS if device.type == "cpu" else GPU_DEFAULTS
    opts = copy.deepcopy(opts)  # the plan must not change when the caller's lists do
    if opts.gen_tokens is None:
        opts.gen_tokens = [defaults.gen_tokens]
    if opts.repeat is None:
        opts.repeat = defaults.repeat
    if opts.dtypes is None:
        opts.dtypes = [defaults.dtype]
    if opts.layers is None:
        # Only random-weight shapes are cut down; a checkpoint is benchmarked whole.
        opts.layers = [defaults.layers if opts.model is None else None]
    return opts


def model_args(source: ModelArgs, key: ModelKey) -> ModelArgs:
    """The shape `key` benchmarks: `source` cut to key.layers, with the KV heads of key.attn.

    No checks: plan_bench has validated the shape of every key it made.
    """
    kv_heads = {"native": source.kv_heads, "mha": source.n_heads, "gqa": key.gqa_heads, "mqa": 1}[key.attn]
    layers = source.n_layers if key.layers is None else key.layers
    return dataclasses.replace(source, n_layers=layers, n_kv_heads=kv_heads)


def _model_keys(opts: BenchOptions) -> tuple[ModelKey, ...]:
    """The models of the cross product, in build order (preset, attn, kv heads, dtype, weights, layers).

    The weights axis is the bits (16, or the scheme each width picks) then the named schemes.
    """
    presets: list[str | None] = [None] if opts.model is not None or opts.args is not None else [*opts.presets]
    # kv_heads is an axis only when some variant is GQA (then every variant crosses it).
    heads: list[int | None] = [*opts.kv_heads] if "gqa" in opts.attn else [None]
    weights = [weights_of(b) for b in opts.bits] + [(SCHEMES[s][0], s) for s in opts.schemes]
    product = itertools.product(presets, opts.attn, heads, opts.dtypes or [], weights, opts.layers or [None])
    return tuple(
        ModelKey(preset, attn, gqa, dtype, bits, scheme, layers)
        for preset, attn, gqa, dtype, (bits, scheme), layers in product
    )


def weights_of(bits: int) -> tuple[int, str | None]:
    """(bits, scheme) of a --bits value: 16 unquantized, 8 / 4 the default scheme for that width."""
    return (bits, None) if bits == 16 else (bits, DEFAULT_SCHEME_FOR_BITS[bits])


def _validate(opts: BenchOptions) -> None:
    """Reject impossible values and combinations (device defaults already filled in).

    Messages name the BenchOptions field and the value, never a CLI flag: the library is
    used without the CLI too.
    """
    for name, values in (("ctx", opts.ctx), ("batch", opts.batch)):
        for v in values:
            if v < 1:
                raise UsageError(f"{name} {v}: must be at least 1")
    for name, values in (("prompt_tokens", opts.prompt_tokens), ("gen_tokens", opts.gen_tokens or [])):
        for v in values:
            if v < 0:
                raise UsageError(f"{name} {v}: must not be negative")
            if v > min(opts.ctx):
                raise UsageError(f"{name} {v}: longer than ctx {min(opts.ctx)}")
    for a in opts.attn:
        if a not in (*ATTN_KINDS, "native"):
            raise UsageError(f"attn {a}: expected one of {', '.join(ATTN_KINDS)}")
    for d in opts.dtypes or []:
        if d not in FLOAT_NAMES:
            raise UsageError(f"dtype {d}: expected one of {', '.join(FLOAT_NAMES)}")
    for b in opts.bits:
        if b not in BITS:
            raise UsageError(f"bits {b}: expected 16, 8 or 4")
    for name in opts.schemes:
        if name not in SCHEMES:
            raise UsageError(f"scheme {name}: unknown; choose one of: {', '.join(SCHEMES)}")
    if opts.warmup < 0:
        raise UsageError(f"warmup {opts.warmup}: must not be negative")
    if opts.repeat is not None and opts.repeat < 1:
        raise UsageError(f"repeat {opts.repeat}: must be at least 1")
    if opts.vs not in (None, "transformers"):
        raise UsageError(f"vs {opts.vs}: only 'transformers' is supported")
    if opts.vs and (opts.bits != [16] or opts.schemes):
        raise UsageError(f"vs transformers: compares unquantized weights only (bits 16), not bits {_listed(opts.bits)}")
    if opts.model is not None:
        if opts.attn != ["native"]:
            raise UsageError(
                f"attn {_listed(opts.attn)}: only for presets; a checkpoint's attention is fixed by its weights"
            )
        if opts.layers not in (None, [None]):
            raise UsageError(
                f"layers {_listed(opts.layers or [])}: only for presets; a checkpoint is benchmarked whole"
            )
    for n in opts.layers or []:
        if n is not None and n < 1:
            raise UsageError(f"layers {n}: must be at least 1")


def _listed(values: list[int] | list[str] | list[int | None]) -> str:
    return ",".join(str(v) for v in values)


def _validate_shapes(opts: BenchOptions, models: tuple[ModelKey, ...]) -> None:
    """Every preset exists and every variant is a buildable Llama (checkpoints are checked on load)."""
    if opts.model is not None:
        return
    for key in models:
        source = opts.args if opts.args is not None else get_preset(key.preset)  # type: ignore[arg-type]
        args = model_args(source, key)
        if args.kv_heads < 1 or args.n_heads % args.kv_heads:
            raise UsageError(f"kv_heads {args.kv_heads}: must divide the {args.n_heads} attention heads")
        args.validate(f"preset {key.preset}" if key.preset else "custom shape")
