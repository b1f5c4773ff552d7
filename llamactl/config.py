"""Model hyper-parameters under Meta's names, presets, and the params.json / config.json maps.

`ModelArgs` is the one description of a Llama shape in the whole code base: checkpoints,
the model, `info` and `bench` all read it. Its fields are exactly Meta's `params.json`
keys so that file maps onto it 1:1; Hugging Face's `config.json` is a translation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamactl import jsonio
from llamactl.errors import ConfigError, UsageError, printable

# Sizes Meta uses for multiple_of / ffn_dim_multiplier, tried in this order when the FFN
# width has to be recovered from a Hugging Face config's intermediate_size.
_FFN_RECIPES: tuple[tuple[int, float | None], ...] = (
    (256, None),
    (4096, 1.3),
    (1024, None),
    (4096, None),
    (512, None),
    (128, None),
    (64, None),
    (32, None),
    (16, None),
    (8, None),
    (4, None),
    (2, None),
    (1, None),
)


# No Llama comes near these; a config beyond them is corrupt or hostile, and would make
# llamactl allocate rotary tables or name tensors for hours before failing.
BOUNDS: dict[str, int] = {
    "dim": 1 << 17,
    "n_layers": 1 << 12,
    "n_heads": 1 << 12,
    "n_kv_heads": 1 << 12,
    "vocab_size": 1 << 22,
    "multiple_of": 1 << 17,
    "max_seq_len": 1 << 21,
}


@dataclass
class ModelArgs:
    """A Llama 1 / Llama 2 shape, field for field Meta's params.json.

    `vocab_size` may be -1 in a real params.json: the vocabulary then comes from the
    tokenizer or the embedding, and `with_vocab_size` fills it in.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_heads for MHA, fewer for GQA, 1 for MQA."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width, computed exactly as Meta's FeedForward does (7B: 11008)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def attention_kind(self) -> str:
        if self.kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.kv_heads == 1 else "GQA"

    def validate(self, source: str = "model arguments") -> ModelArgs:
        """Raise ConfigError naming `source` when the shape cannot be a Llama (or is absurdly large).

        Checked in order, so a zero never reaches a division; the bounds keep a config that
        claims 10**9 layers or 10**12 positions from allocating before any tensor is read.
        """
        why = self._problem()
        if why is not None:
            raise ConfigError(f"{source}: {why}")
        return self

    def _problem(self) -> str | None:
        if not (self.dim > 0 and self.n_layers > 0 and self.n_heads > 0):
            return "dim, n_layers and n_heads must be positive"
        over = [f"{n} {getattr(self, n)} > {limit}" for n, limit in BOUNDS.items() if (getattr(self, n) or 0) > limit]
        if over:
            return f"a size exceeds its bound ({', '.join(over)})"
        if self.dim % self.n_heads:
            return f"dim {self.dim} is not divisible by n_heads {self.n_heads}"
        if self.head_dim % 2:
            return f"head dim {self.head_dim} must be even for rotary embeddings"
        if not (self.kv_heads > 0 and self.n_heads % self.kv_heads == 0):
            return f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}"
        for name in ("multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                return f"{name} must be positive, got {getattr(self, name)}"
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                return f"{name} must be positive, got {value}"
        multiplier = self.ffn_dim_multiplier
        if multiplier is not None and not (math.isfinite(multiplier) and 0 < multiplier < 64):
            return f"ffn_dim_multiplier must be a positive number below 64, got {multiplier}"
        return None

    def with_vocab_size(self, vocab_size: int) -> ModelArgs:
        return dataclasses.replace(self, vocab_size=vocab_size)

    def to_params(self) -> dict[str, Any]:
        """The params.json dict (None fields dropped, as Meta's files do)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _pair(dim: int, n_layers: int, n_heads: int, **kw: Any) -> ModelArgs:
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, **kw)


PRESETS: dict[str, ModelArgs] = {
    "7b": _pair(4096, 32, 32),
    "13b": _pair(5120, 40, 40),
    "70b": _pair(8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
}
PRESETS.update({f"{name}-chat": dataclasses.replace(args) for name, args in list(PRESETS.items())})


def get_preset(name: str) -> ModelArgs:
    """Exact lookup; the error lists the valid names (a usage error: the name comes from the command line)."""
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, raising ConfigError that names the file on any problem."""
    try:
        data = jsonio.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _shown(value: Any) -> str:
    """A config value quoted in an error: escaped, and short even when the file holds megabytes."""
    text = repr(value)
    return printable(text if len(text) <= 60 else text[:57] + "...")


def _typed(path: Path, data: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in data or data[key] is None:
        if default is ...:
            raise ConfigError(f"{path}: missing required field {key!r}")
        return default
    value = data[key]
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else (isinstance(value, int) and not isinstance(value, bool))
    )
    if not ok:
        raise ConfigError(f"{path}: field {key!r} should be a number, found {_shown(value)}")
    try:
        return kind(value)
    except OverflowError:
        raise ConfigError(f"{path}: field {key!r} is out of range ({_shown(value)})") from None


def args_from_params(data: dict[str, Any], path: Path) -> ModelArgs:
    """ModelArgs from a Meta params.json dict; unknown keys are ignored as Meta does."""
    args = ModelArgs(
        dim=_typed(path, data, "dim", int),
        n_layers=_typed(path, data, "n_layers", int),
        n_heads=_typed(path, data, "n_heads", int),
        n_kv_heads=_typed(path, data, "n_kv_heads", int, None),
        vocab_size=_typed(path, data, "vocab_size", int, -1),
        multiple_of=_typed(path, data, "multiple_of", int, 256),
        ffn_dim_multiplier=_typed(path, data, "ffn_dim_multiplier", float, None),
        norm_eps=_typed(path, data, "norm_eps", float, 1e-5),
        rope_theta=_typed(path, data, "rope_theta", float, 10000.0),
        max_seq_len=_typed(path, data, "max_seq_len", int, 4096),
    )
    return args.validate(str(path))


def args_from_hf_config(data: dict[str, Any], path: Path) -> ModelArgs:
    """ModelArgs from a transformers LlamaForCausalLM config.json dict."""
    model_type = data.get("model_type")
    architectures = data.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(f"{path}: field 'architectures' should be a list of names, found {_shown(architectures)}")
    if model_type != "llama" and "LlamaForCausalLM" not in architectures:
        found = model_type or (architectures[0] if architectures else "no model_type")
        raise ConfigError(f"{path}: not a Llama checkpoint (model_type {_shown(found)}, expected 'llama')")
    if data.get("rope_scaling") not in (None, {}):
        raise ConfigError(f"{path}: rope_scaling {_shown(data['rope_scaling'])} is not supported (Llama 1/2 only)")
    dim = _typed(path, data, "hidden_size", int)
    n_heads = _typed(path, data, "num_attention_heads", int)
    head_dim = _typed(path, data, "head_dim", int, None)
    if head_dim is not None and n_heads and head_dim * n_heads != dim:
        raise ConfigError(f"{path}: head_dim {head_dim} × {n_heads} heads != hidden_size {dim}")
    intermediate = _typed(path, data, "intermediate_size", int)
    multiple_of, multiplier = ffn_recipe_for(dim, intermediate, path)
    rope_theta = _typed(path, data, "rope_theta", float, None)
    if rope_theta is None and isinstance(data.get("rope_parameters"), dict):
        rope_theta = _typed(path, data["rope_parameters"], "rope_theta", float, None)
    args = ModelArgs(
        dim=dim,
        n_layers=_typed(path, data, "num_hidden_layers", int),
        n_heads=n_heads,
        n_kv_heads=_typed(path, data, "num_key_value_heads", int, n_heads),
        vocab_size=_typed(path, data, "vocab_size", int),
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=_typed(path, data, "rms_norm_eps", float, 1e-5),
        rope_theta=float(rope_theta) if rope_theta is not None else 10000.0,
        max_seq_len=_typed(path, data, "max_position_embeddings", int, 4096),
    )
    return args.validate(str(path))


def ffn_recipe_for(dim: int, intermediate_size: int, path: Path) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's formula give intermediate_size."""
    base = int(2 * (4 * dim) / 3)
    candidates = list(_FFN_RECIPES)
    if base > 0:
        candidates.append((1, intermediate_size / base))
    for multiple_of, multiplier in candidates:
        probe = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if probe.hidden_dim == intermediate_size:
            return multiple_of, multiplier
    raise ConfigError(
        f"{path}: intermediate_size {intermediate_size} cannot be expressed with Meta's "
        f"multiple_of / ffn_dim_multiplier for hidden_size {dim}"
    )


def hf_config_from_args(args: ModelArgs, torch_dtype: str) -> dict[str, Any]:
    """The config.json transformers' LlamaForCausalLM expects for this shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
