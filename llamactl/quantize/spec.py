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

# scheme -> (bits, method). bitsandbytes' schemes write checkpoints transformers loads.
SCHEMES: dict[str, tuple[int, str]] = {
    "int8": (8, "bitsandbytes"),
    "nf4": (4, "bitsandbytes"),
    "fp4": (4, "bitsandbytes"),
}
# What `--bits N` means when no --scheme is given.
DEFAULT_SCHEME_FOR_BITS: dict[int, str] = {8: "int8", 4: "nf4"}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class QuantSpec:
    """One weight-only quantization scheme and its parameters.

    For bitsandbytes it maps 1:1 onto transformers' BitsAndBytesConfig: `blocksize`,
    `double_quant` and `compute_dtype` apply to the 4-bit types, `threshold` (LLM.int8's
    activation outlier threshold) to int8.
    """

    scheme: str
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bf16"
    threshold: float = 6.0

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
        return self

    def describe(self) -> str:
        """One line for tables and `info`, e.g. `nf4 (double quant, blocksize 64, compute bf16)`."""
        if self.scheme == "int8":
            return f"int8 (LLM.int8, outlier threshold {self.threshold:g})"
        dq = "double quant" if self.double_quant else "no double quant"
        return f"{self.scheme} ({dq}, blocksize {self.blocksize}, compute {self.compute_dtype})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"bits": self.bits, "method": self.method}

    # ------------------------------------------------------------------ transformers' config

    def to_hf_config(self, skip_modules: Sequence[str] | None = None) -> dict[str, Any]:
        """`quantization_config` exactly as transformers' BitsAndBytesConfig.to_dict() writes it."""
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
            "llm_int8_skip_modules": list(skip_modules) if skip_modules else None,
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
        if config.get("quant_method") != "bitsandbytes":
            method = str(config.get("quant_method"))[:40]
            raise ConfigError(f"{where}: quantization method {method!r} is not supported (only bitsandbytes)")
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


def parse_spec(
    bits: int | None = None,
    scheme: QuantSpec | None = None,
    *,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    compute_dtype: str | None = None,
    threshold: float | None = None,
) -> QuantSpec | None:
    """The one parser of the quantization options every command shares; None: no quantization.

    `bits` picks the default scheme for that width (or `quant_type` for 4-bit); `scheme` is a
    registered spec (built-in or a plugin's) that the other options refine.
    """
    tuning = {
        "quant type": quant_type,
        "double quant": double_quant,
        "blocksize": blocksize,
        "compute dtype": compute_dtype,
        "int8 threshold": threshold,
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
    if scheme.bits == 8:
        four_only = [n for n in ("double quant", "blocksize", "compute dtype") if tuning[n] is not None]
        if four_only:
            raise UsageError(f"{four_only[0]} applies to 4-bit schemes only")
    elif threshold is not None:
        raise UsageError("int8 threshold applies to int8 only")
    changes = {
        "double_quant": double_quant,
        "blocksize": blocksize,
        "compute_dtype": dtypes.parse_float_dtype(compute_dtype),
        "threshold": threshold,
    }
    return dataclasses.replace(scheme, **{k: v for k, v in changes.items() if v is not None}).validate()


@hookimpl
def register_quantizers(register: Callable[[str, QuantSpec], None]) -> None:
    """The built-in schemes, registered as any plugin's are (their backends load on first use)."""
    for scheme in SCHEMES:
        register(scheme, QuantSpec(scheme))
