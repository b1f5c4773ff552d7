"""QuantSpec: what a quantization scheme is, parsed once from the same options on every command.

Torch-free on purpose: `llamactl list` and `info` read a checkpoint's quantization_config
through it without loading any kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llamactl import dtypes
from llamactl.errors import ConfigError, UsageError
from llamactl.plugins import hookimpl

# scheme -> (bits, method). bitsandbytes' schemes write checkpoints transformers loads; the
# native ones (torch's own int8 / int4 kernels) store GGUF's Q8_0 / Q4_0 blocks.
SCHEMES: dict[str, tuple[int, str]] = {
    "q8": (8, "native"),
    "q4": (4, "native"),
    "int8": (8, "bitsandbytes"),
    "nf4": (4, "bitsandbytes"),
    "fp4": (4, "bitsandbytes"),
}
# What `--bits N` means when no --scheme is given: the fast native schemes.
DEFAULT_SCHEME_FOR_BITS: dict[int, str] = {8: "q8", 4: "q4"}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
GROUP_SIZES = (32, 64, 128)  # native schemes: weights per block (32: exactly GGML's Q8_0 / Q4_0)
NATIVE_METHOD = "llamactl"  # quantization_config.quant_method of native checkpoints


@dataclass(frozen=True)
class QuantSpec:
    """One weight-only quantization scheme and its parameters.

    For bitsandbytes it maps 1:1 onto transformers' BitsAndBytesConfig: `blocksize`,
    `double_quant` and `compute_dtype` apply to the 4-bit types, `threshold` (LLM.int8's
    activation outlier threshold) to int8. The native schemes (q8, q4) use `group_size`
    (weights per block with one fp16 scale) and `compute_dtype` (what activations are cast to
    for the kernel: bf16 by default, never fp32 unless asked).
    """

    scheme: str
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bf16"
    threshold: float = 6.0
    group_size: int = 32

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme][0]

    @property
    def method(self) -> str:
        return SCHEMES[self.scheme][1]

    def validate(self) -> QuantSpec:
        if self.scheme not in SCHEMES:
            raise UsageError(f"quantization scheme {self.scheme!r}: unknown; choose one of: {', '.join(SCHEMES)}")
        if self.blocksize not in BLOCKSIZES:
            raise UsageError(
                f"blocksize {self.blocksize}: unsupported; choose one of: {', '.join(map(str, BLOCKSIZES))}"
            )
        if self.compute_dtype not in dtypes.FLOAT_NAMES:
            raise UsageError(f"compute dtype {self.compute_dtype}: choose one of: {', '.join(dtypes.FLOAT_NAMES)}")
        if not self.threshold >= 0:
            raise UsageError(f"int8 threshold {self.threshold}: must be >= 0")
        if self.group_size not in GROUP_SIZES:
            raise UsageError(
                f"group size {self.group_size}: unsupported; choose one of: {', '.join(map(str, GROUP_SIZES))}"
            )
        return self

    def describe(self) -> str:
        """One line for tables and `info`, e.g. `nf4 (double quant, blocksize 64, compute bf16)`."""
        if self.method == "native":
            ggml = {"q8": "Q8_0", "q4": "Q4_0"}[self.scheme] if self.group_size == 32 else None
            blocks = f"GGUF {ggml} blocks" if ggml else f"blocks of {self.group_size}"
            return f"{self.scheme} ({blocks}, fp16 scales, compute {self.compute_dtype})"
        if self.scheme == "int8":
            return f"int8 (LLM.int8, outlier threshold {self.threshold:g})"
        dq = "double quant" if self.double_quant else "no double quant"
        return f"{self.scheme} ({dq}, blocksize {self.blocksize}, compute {self.compute_dtype})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"bits": self.bits, "method": self.method}

    # ------------------------------------------------------------------ transformers' config

    def to_hf_config(self, skip_modules: Sequence[str] | None = None) -> dict[str, Any]:
        """`quantization_config`: for bitsandbytes exactly as transformers' BitsAndBytesConfig
        .to_dict() writes it; for the native schemes llamactl's own (quant_method "llamactl")."""
        if self.method == "native":
            return {
                "quant_method": NATIVE_METHOD,
                "scheme": self.scheme,
                "bits": self.bits,
                "group_size": self.group_size,
                "compute_dtype": dtypes.lookup(self.compute_dtype).hf,
                "modules_to_not_convert": list(skip_modules) if skip_modules else None,
            }
        four = self.bits == 4
        return {
            "_load_in_4bit": four,
            "_load_in_8bit": not four,
            "bnb_4bit_compute_dtype": dtypes.lookup(self.compute_dtype).hf if four else "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.scheme if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant if four else False,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            # Setting the list replaces transformers' default (the head), so the head is named too.
            "llm_int8_skip_modules": ["lm_head", *skip_modules] if skip_modules else None,
            "llm_int8_threshold": self.threshold,
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "quant_method": "bitsandbytes",
        }

    @classmethod
    def from_hf_config(cls, config: Any, where: str = "config.json") -> QuantSpec:
        """Read a `quantization_config`; anything but bitsandbytes int8 / 4-bit is an error."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}: quantization_config must be an object, found {type(config).__name__}")
        if config.get("quant_method") == NATIVE_METHOD:
            return cls._from_native_config(config, where)
        if config.get("quant_method") != "bitsandbytes":
            method = str(config.get("quant_method"))[:40]
            raise ConfigError(
                f"{where}: quantization method {method!r} is not supported (only bitsandbytes and {NATIVE_METHOD})"
            )
        four = bool(config.get("load_in_4bit") or config.get("_load_in_4bit"))
        eight = bool(config.get("load_in_8bit") or config.get("_load_in_8bit"))
        if four == eight:
            raise ConfigError(f"{where}: quantization_config must set exactly one of load_in_4bit / load_in_8bit")
        try:
            threshold = float(config.get("llm_int8_threshold", 6.0))
            if eight:  # the 4-bit fields of an 8-bit config mean nothing: keep the defaults
                return cls("int8", threshold=threshold).validate()
            compute = dtypes.parse_float_dtype(str(config.get("bnb_4bit_compute_dtype") or "float32"))
            spec = cls(
                scheme=str(config.get("bnb_4bit_quant_type") or "nf4"),
                double_quant=bool(config.get("bnb_4bit_use_double_quant", False)),
                compute_dtype=compute or "fp32",
                threshold=threshold,
            )
            if spec.scheme not in ("nf4", "fp4"):
                raise UsageError(f"4-bit quant type {spec.scheme!r} is not nf4 or fp4")
            return spec.validate()
        except (UsageError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: bad quantization_config ({exc})") from None

    @classmethod
    def _from_native_config(cls, config: Mapping[str, Any], where: str) -> QuantSpec:
        try:
            scheme = str(config.get("scheme"))
            if SCHEMES.get(scheme, (0, ""))[1] != "native":
                raise UsageError(f"scheme {scheme[:40]!r} is not q8 or q4")
            group = config.get("group_size", 32)
            if not isinstance(group, int) or isinstance(group, bool):
                raise UsageError(f"group_size {group!r} is not an integer")
            compute = dtypes.parse_float_dtype(str(config.get("compute_dtype") or "bfloat16"))
            return cls(scheme, group_size=group, compute_dtype=compute or "bf16").validate()
        except (UsageError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: bad quantization_config ({exc})") from None


def parse_spec(
    bits: int | None = None,
    scheme: QuantSpec | None = None,
    *,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    compute_dtype: str | None = None,
    threshold: float | None = None,
    group_size: int | None = None,
) -> QuantSpec | None:
    """The one parser of the quantization options every command shares; None: no quantization.

    `bits` picks the default scheme for that width (q8 / q4; `quant_type` nf4 / fp4 picks
    bitsandbytes' 4-bit instead); `scheme` is a registered spec (built-in or a plugin's) that
    the other options refine. Each option applies only to the schemes that have it.
    """
    tuning = {
        "quant type": quant_type,
        "double quant": double_quant,
        "blocksize": blocksize,
        "compute dtype": compute_dtype,
        "int8 threshold": threshold,
        "group size": group_size,
    }
    if bits is not None and scheme is not None:
        raise UsageError("give either bits or a scheme, not both")
    if bits is None and scheme is None:
        given = [name for name, value in tuning.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs bits or a scheme to apply to")
        return None
    if scheme is None:
        if bits not in DEFAULT_SCHEME_FOR_BITS:
            raise UsageError(f"bits {bits}: unsupported; choose one of: {', '.join(map(str, DEFAULT_SCHEME_FOR_BITS))}")
        four = [s for s, (b, method) in SCHEMES.items() if b == 4 and method == "bitsandbytes"]
        if quant_type is not None and bits != 4:
            raise UsageError("quant type applies to 4-bit schemes only")
        if quant_type is not None and quant_type not in four:
            raise UsageError(f"quant type {quant_type!r}: unsupported; choose one of: {', '.join(four)}")
        name = quant_type or DEFAULT_SCHEME_FOR_BITS[bits]
        scheme = QuantSpec(name)
    elif quant_type is not None:
        raise UsageError("quant type applies to bits, not to a named scheme")
    _check_applies(scheme, tuning)
    changes = {
        "double_quant": double_quant,
        "blocksize": blocksize,
        "compute_dtype": dtypes.parse_float_dtype(compute_dtype),
        "threshold": threshold,
        "group_size": group_size,
    }
    return dataclasses.replace(scheme, **{k: v for k, v in changes.items() if v is not None}).validate()


def _check_applies(scheme: QuantSpec, tuning: Mapping[str, object]) -> None:
    """Refuse an option the scheme has no use for (one line naming both)."""
    native = scheme.method == "native"
    owners = {
        "double quant": ("bitsandbytes 4-bit schemes (nf4, fp4)", scheme.method == "bitsandbytes" and scheme.bits == 4),
        "blocksize": ("bitsandbytes 4-bit schemes (nf4, fp4)", scheme.method == "bitsandbytes" and scheme.bits == 4),
        "compute dtype": ("4-bit and native schemes", native or scheme.bits == 4),
        "int8 threshold": ("int8", scheme.scheme == "int8"),
        "group size": ("the native schemes (q8, q4)", native),
    }
    for name, (who, applies) in owners.items():
        if tuning[name] is not None and not applies and scheme.method in ("native", "bitsandbytes"):
            hint = " (name the scheme nf4 or fp4)" if who.startswith("bitsandbytes") and native else ""
            raise UsageError(f"{name} applies to {who} only, not {scheme.scheme}{hint}")


@hookimpl
def register_quantizers(register: Callable[[str, QuantSpec], None]) -> None:
    """The built-in schemes, registered as any plugin's are (their backends load on first use)."""
    for scheme in SCHEMES:
        register(scheme, QuantSpec(scheme))
