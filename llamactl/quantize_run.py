"""`llamactl quantize`: stream a checkpoint into a bitsandbytes HF checkpoint, then measure it.

Like convert: `plan_quantize` validates everything before a byte is written; `run_quantize`
streams tensor by tensor (permuted to HF's q/k layout, then quantized) into a temporary
directory beside DST that is renamed into place only when complete; `evaluate_quality`
compares the two models on a text, loading one at a time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from llamactl.atomic import atomic_directory, check_destination
from llamactl.checkpoint import CheckpointReader, open_checkpoint
from llamactl.checkpoint.hf import DTYPE_NAMES, INDEX_FILE, shard_file_names, write_hf_config, write_tokenizer_files
from llamactl.checkpoint.keymap import meta_to_hf_name, permute_for_hf, rotary_heads
from llamactl.checkpoint.meta import tensor_bytes
from llamactl.checkpoint.safetensors_io import safetensors_header
from llamactl.checkpoint.sharding import TensorInfo
from llamactl.devices import resolve, resolve_device
from llamactl.errors import CheckpointError, UsageError
from llamactl.quantize import (
    Quality,
    QuantSpec,
    QuantStats,
    build_quantized_model,
    compare_logits,
    is_quantizable,
    matches_skip,
    model_logits,
    module_name,
    quantize_tensor,
    require_bitsandbytes,
)

Progress = Callable[[str, int], None]  # (tensor name, source bytes read)


@dataclass
class QuantizePlan:
    """What a quantization will do, decided before anything is written."""

    reader: CheckpointReader
    dst: Path
    spec: QuantSpec
    device: torch.device
    to_quantize: set[str]
    skipped: list[str] = field(default_factory=list)
    unmatched_skip: list[str] = field(default_factory=list)
    max_shard_bytes: int = 5 * 10**9

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.reader.tensor_infos())

    @property
    def tensor_count(self) -> int:
        return len(self.reader.tensor_infos())

    @property
    def skip_modules(self) -> list[str] | None:
        """`llm_int8_skip_modules` for config.json: None unless --skip left projections in float."""
        if not self.skipped:
            return None
        return ["lm_head", *(module_name(meta_to_hf_name(n) or n) for n in self.skipped)]


def plan_quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    spec: QuantSpec,
    *,
    skip: Sequence[str] = (),
    force: bool = False,
    device: torch.device | str | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> QuantizePlan:
    """Open SRC and check the request (bits, SRC not already quantized, DST, bitsandbytes)."""
    spec.validate()
    reader = open_checkpoint(src)
    if reader.quantization is not None:
        method = reader.quantization.get("quant_method", "unknown")
        raise CheckpointError(f"{reader.path}: already quantized ({method}); quantize the unquantized original")
    dst_path = Path(dst).expanduser()
    check_destination(reader.path, dst_path, force)
    dev, _ = resolve_device(device)
    require_bitsandbytes(dev)
    names = [info.name for info in reader.tensor_infos() if is_quantizable(info.name)]
    used: set[str] = set()
    skipped = []
    for name in names:
        hits = matches_skip(name, skip)
        used.update(hits)
        if hits:
            skipped.append(name)
    return QuantizePlan(
        reader,
        dst_path,
        spec,
        dev,
        set(names) - set(skipped),
        skipped,
        [p for p in skip if p not in used],
        max_shard_bytes,
    )


class _AppendingShard:
    """A safetensors file built in one pass: tensor bytes go to a side file as they come
    (quantized sizes are only known after quantizing), the header is written at the end."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.handle: IO[bytes] = open(data_path, "wb")  # noqa: SIM115 (closed in finish)
        self.infos: list[TensorInfo] = []
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        self.handle.write(data)
        self.infos.append(TensorInfo(name, tuple(tensor.shape), tensor.dtype))
        self.nbytes += len(data)

    def finish(self, path: Path) -> None:
        self.handle.close()
        header, _ = safetensors_header(self.infos)
        with open(path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        self.data_path.unlink()


def _write_tensors(plan: QuantizePlan, out_dir: Path, on_tensor: Progress | None) -> tuple[QuantStats, list[str]]:
    """Stream SRC into shards in out_dir; returns the stats and the weights' dtype names."""
    reader, args = plan.reader, plan.reader.args
    stats = QuantStats(skipped=list(plan.skipped))
    shards: list[_AppendingShard] = []
    dtypes: list[str] = []
    for meta_name, tensor in reader.iter_tensors():
        hf_name = meta_to_hf_name(meta_name)
        assert hf_name is not None, meta_name
        heads = rotary_heads(meta_name, args.n_heads, args.kv_heads)
        if heads is not None:
            tensor = permute_for_hf(tensor, heads)  # the HF layout is what gets quantized
        quantized = meta_name in plan.to_quantize
        if quantized:
            entries = {
                f"{module_name(hf_name)}.{k}": v for k, v in quantize_tensor(tensor, plan.spec, plan.device).items()
            }
        else:
            entries = {hf_name: tensor}
            dtypes.append(DTYPE_NAMES.get(tensor.dtype, "float32"))
        size = sum(t.numel() * t.element_size() for t in entries.values())
        if not shards or (shards[-1].nbytes and shards[-1].nbytes + size > plan.max_shard_bytes):
            shards.append(_AppendingShard(out_dir / f".shard-{len(shards)}.data"))
        for name, value in entries.items():
            shards[-1].add(name, value)
        stats.add(tensor.numel(), tensor.numel() * tensor.element_size(), size, quantized)
        if on_tensor:
            on_tensor(meta_name, tensor.numel() * tensor.element_size())
    names = shard_file_names(len(shards))
    for shard, name in zip(shards, names):
        shard.finish(out_dir / name)
    if len(shards) > 1:
        import json

        index = {
            "metadata": {"total_size": sum(s.nbytes for s in shards)},
            "weight_map": {i.name: name for s, name in zip(shards, names) for i in s.infos},
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return stats, dtypes


def run_quantize(plan: QuantizePlan, on_tensor: Progress | None = None) -> QuantStats:
    """Write DST atomically (temporary directory beside it, renamed at the end)."""
    with atomic_directory(plan.dst) as tmp:
        stats, dtypes = _write_tensors(plan, tmp, on_tensor)
        main_dtype = max(set(dtypes), key=dtypes.count) if dtypes else "float32"
        write_hf_config(
            tmp, plan.reader.args, main_dtype, {"quantization_config": plan.spec.to_hf_config(plan.skip_modules)}
        )
        if plan.reader.tokenizer_path is not None:
            write_tokenizer_files(tmp, plan.reader.tokenizer_path, plan.reader.args)
    return stats


def read_eval_text(path: str | os.PathLike[str]) -> str:
    """The --eval file as UTF-8 text, with a one-line error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: --eval file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the --eval file as UTF-8 text ({exc})") from None


def eval_tokens(reader: CheckpointReader, text: str, max_tokens: int = 2048) -> torch.Tensor:
    """BOS + the text's tokens (at most max_tokens), checked against the model's vocabulary."""
    from llamactl.tokenizer import Tokenizer

    if reader.tokenizer_path is None:
        raise UsageError(f"{reader.path}: no tokenizer.model, so quality cannot be measured (use --no-eval)")
    tokenizer = Tokenizer(reader.tokenizer_path)
    ids = tokenizer.encode(text, bos=True)[:max_tokens]
    if len(ids) < 2:
        raise UsageError("the evaluation text is empty: it needs at least one token to predict")
    if max(ids) >= reader.args.vocab_size:
        raise UsageError(
            f"{reader.tokenizer_path}: token id {max(ids)} >= the model's vocab_size "
            f"{reader.args.vocab_size}; tokenizer and model do not match"
        )
    return torch.tensor(ids)


def evaluate_quality(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    tokens: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Quality:
    """Perplexity of both models, top-1 agreement and mean KL on `tokens` (see `eval_tokens`).

    The unquantized model is loaded, run and freed before the quantized one is loaded, so
    peak memory is one model, not two.
    """
    from llamactl.loading import build_model

    reader = open_checkpoint(src)
    placement = resolve(device, dtype)
    dev, dt = placement.device, placement.dtype
    window = min(reader.args.max_seq_len, 512)
    model = build_model(reader, dev, dt)
    ref = model_logits(model, tokens, window)
    del model
    qmodel = build_quantized_model(open_checkpoint(dst), dev, dt)
    out = model_logits(qmodel, tokens, window)
    return compare_logits(ref, out, tokens)
