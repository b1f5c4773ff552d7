"""Hugging Face layout: config.json + safetensors shards (+ index) + tokenizer files.

An adapter over the canonical layout: names go through `keymap`, wq / wk are permuted to
HF's rotary layout on the way out and back on the way in.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llamactl.checkpoint.base import TOKENIZER_FILE, CheckpointReader, ReaderBase, check_against_args
from llamactl.checkpoint.formats import CheckpointFormat, WriteOptions, WritePlan
from llamactl.checkpoint.keymap import (
    HF_IGNORED,
    hf_to_meta_name,
    meta_to_hf_name,
    permute_for_hf,
    rotary_heads,
    unpermute_from_hf,
)
from llamactl.checkpoint.meta import load_pth, tensor_bytes
from llamactl.checkpoint.safetensors_io import SafetensorsFileWriter
from llamactl.checkpoint.sharding import TensorInfo, plan_size_shards
from llamactl.config import ModelArgs, args_from_hf_config, hf_config_from_args, read_json
from llamactl.errors import CheckpointError, ConfigError
from llamactl.plugins import hookimpl

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def detect_hf(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _weight_map(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the index or the single weights file."""
    for index_name, single_name in ((INDEX_FILE, SINGLE_FILE), (BIN_INDEX_FILE, BIN_FILE)):
        index_path = path / index_name
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConfigError(f"{index_path}: missing or empty 'weight_map'")
            files = {name: path / str(file) for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if file.parent != path or not file.is_file():
                    raise CheckpointError(f"{index_path}: lists {file.name}, which does not exist")
            return files
        if (path / single_name).is_file():
            return {}  # filled from the file itself
    raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or {BIN_FILE} beside config.json")


def _safetensors_infos(file: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(file, framework="pt") as handle:
            infos = {}
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = handle.get_slice(name)
                infos[name] = TensorInfo(name, tuple(piece.get_shape()), _torch_dtype(piece.get_dtype(), file, name))
            return infos
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: invalid safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc})") from None


_ST_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _torch_dtype(name: str, file: Path, tensor: str) -> torch.dtype:
    try:
        return _ST_TO_TORCH[name]
    except KeyError:
        raise CheckpointError(f"{file}: tensor {tensor} has unsupported dtype {name}") from None


@dataclass
class HFReader(ReaderBase):
    """A transformers LlamaForCausalLM directory, seen in Meta's layout."""

    format: str = "hf"
    hf_infos: dict[str, TensorInfo] | None = None
    locations: dict[str, Path] | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def open(cls, path: Path) -> HFReader:
        config_path = path / CONFIG_FILE
        config = read_json(config_path)
        args = args_from_hf_config(config, config_path)
        weight_map = _weight_map(path)
        files = (
            sorted(set(weight_map.values())) or [p for p in (path / SINGLE_FILE, path / BIN_FILE) if p.is_file()][:1]
        )
        hf_infos: dict[str, TensorInfo] = {}
        locations: dict[str, Path] = {}
        for file in files:
            found = _safetensors_infos(file) if file.suffix == ".safetensors" else _pth_infos(file)
            for name, info in found.items():
                if weight_map and weight_map.get(name) != file:
                    raise CheckpointError(f"{file}: tensor {name} is not where the index says")
                hf_infos[name], locations[name] = info, file
        missing = sorted(set(weight_map) - set(hf_infos))
        if missing:
            raise CheckpointError(f"{weight_map[missing[0]]}: tensor {missing[0]} listed in the index is missing")
        reader = cls(
            path=path,
            args=args,
            files=files,
            hf_infos=hf_infos,
            locations=locations,
            config=config,
            quantization=config.get("quantization_config"),
        )
        if reader.quantization is None:
            reader.infos = reader._canonical_infos(config_path)
        return reader

    def _canonical_infos(self, config_path: Path) -> list[TensorInfo]:
        assert self.hf_infos is not None
        infos = []
        for name, info in self.hf_infos.items():
            if HF_IGNORED.match(name):
                continue
            meta = hf_to_meta_name(name)
            if meta is None:
                raise CheckpointError(f"{self.locations[name]}: unexpected tensor {name} for LlamaForCausalLM")  # type: ignore[index]
            infos.append(TensorInfo(meta, info.shape, info.dtype))
        if "output.weight" not in {i.name for i in infos} and self.config and self.config.get("tie_word_embeddings"):
            embedding = next((i for i in infos if i.name == "tok_embeddings.weight"), None)
            if embedding is not None:
                infos.append(TensorInfo("output.weight", embedding.shape, embedding.dtype))
        check_against_args(infos, self.args, str(self.path), CONFIG_FILE)
        return infos

    def iter_raw(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, tensor) exactly as stored, one at a time, file by file."""
        assert self.locations is not None
        by_file: dict[Path, list[str]] = {}
        for name, file in self.locations.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if file.suffix != ".safetensors":
                tensors = load_pth(file)
                for name in names:
                    yield name, tensors[name]
                del tensors
                continue
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in names:
                        yield name, handle.get_tensor(name)
            except SafetensorError as exc:
                raise CheckpointError(f"{file}: invalid safetensors file ({exc})") from None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.quantization is not None:
            method = self.quantization.get("quant_method", "unknown")
            raise CheckpointError(f"{self.path}: quantized checkpoint ({method}); it cannot be converted, only loaded")
        tie = "output.weight" not in {hf_to_meta_name(n) for n in self.hf_infos or {}}
        for hf_name, tensor in self.iter_raw():
            meta = hf_to_meta_name(hf_name)
            if meta is None:
                continue  # ignored tensors such as rotary_emb.inv_freq
            heads = rotary_heads(meta, self.args.n_heads, self.args.kv_heads)
            if heads is not None:
                tensor = unpermute_from_hf(tensor, heads)
            yield meta, tensor
            if tie and meta == "tok_embeddings.weight":
                yield "output.weight", tensor


def _pth_infos(file: Path) -> dict[str, TensorInfo]:
    return {name: TensorInfo(name, tuple(t.shape), t.dtype) for name, t in load_pth(file).items()}


# ---------------------------------------------------------------- writing

_HF_ORDER = re.compile(r"^model\.layers\.(\d+)\.")


def _hf_sort_key(hf_name: str) -> tuple[int, int, str]:
    """embed_tokens, layer 0 .. N, norm, lm_head: the order transformers saves in."""
    match = _HF_ORDER.match(hf_name)
    if match:
        return (1, int(match.group(1)), hf_name)
    return (0 if "embed_tokens" in hf_name else 2 if hf_name == "model.norm.weight" else 3, 0, hf_name)


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def plan_hf(
    infos: Sequence[TensorInfo], max_shard_bytes: int, dtype: torch.dtype | None
) -> list[tuple[str, list[TensorInfo]]]:
    """(file name, HF-named tensors) for each safetensors file."""
    renamed = []
    for info in infos:
        hf_name = meta_to_hf_name(info.name)
        assert hf_name is not None, info.name
        renamed.append(TensorInfo(hf_name, info.shape, dtype or info.dtype))
    renamed.sort(key=lambda i: _hf_sort_key(i.name))
    groups = plan_size_shards(renamed, max_shard_bytes)
    return list(zip(shard_file_names(len(groups)), groups))


def write_hf(
    out_dir: Path,
    plan: Sequence[tuple[str, Sequence[TensorInfo]]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    args: ModelArgs,
    on_tensor: Callable[[str, int], None] | None = None,
) -> None:
    """Stream canonical tensors into the planned safetensors files, then config and index."""
    writers = [SafetensorsFileWriter(out_dir / name, infos) for name, infos in plan]
    where = {info.name: (writer, info) for writer, (_, infos) in zip(writers, plan) for info in infos}
    try:
        for meta_name, tensor in tensors:
            hf_name = meta_to_hf_name(meta_name)
            writer, info = where[hf_name]  # type: ignore[index]
            heads = rotary_heads(meta_name, args.n_heads, args.kv_heads)
            out = tensor.to(info.dtype)
            if heads is not None:
                out = permute_for_hf(out, heads)
            writer.write(info.name, tensor_bytes(out))
            if on_tensor:
                on_tensor(meta_name, info.nbytes)
    finally:
        for writer in writers:
            writer.close()
    unwritten = [name for writer in writers for name in writer.pending]
    if unwritten:
        raise ConfigError(f"source ended before tensor {unwritten[0]} was written")
    if len(plan) > 1:
        total = sum(info.nbytes for _, infos in plan for info in infos)
        index = {"metadata": {"total_size": total}, "weight_map": {i.name: name for name, infos in plan for i in infos}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    dtypes = [info.dtype for _, infos in plan for info in infos]
    main_dtype = max(set(dtypes), key=dtypes.count)
    write_hf_config(out_dir, args, DTYPE_NAMES.get(main_dtype, "float32"))


def write_hf_config(out_dir: Path, args: ModelArgs, dtype_name: str, extra: dict[str, Any] | None = None) -> None:
    """config.json and generation_config.json (Meta's sampling defaults)."""
    config = hf_config_from_args(args, dtype_name) | (extra or {})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_length": args.max_seq_len,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def plan_format(reader: CheckpointReader, options: WriteOptions) -> WritePlan:
    return plan_hf(reader.tensor_infos(), options.max_shard_bytes, options.dtype)


def write_format(out_dir: Path, reader: CheckpointReader, plan: WritePlan, options: WriteOptions) -> None:
    write_hf(out_dir, plan, reader.iter_tensors(), reader.args, options.on_tensor)
    if reader.tokenizer_path is not None:
        write_tokenizer_files(out_dir, reader.tokenizer_path, reader.args)


def write_tokenizer_files(out_dir: Path, tokenizer_model: Path, args: ModelArgs) -> None:
    """tokenizer.model plus the two JSON files transformers' LlamaTokenizer reads."""
    shutil.copyfile(tokenizer_model, out_dir / TOKENIZER_FILE)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = special | {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": args.max_seq_len,
        "pad_token": None,
        "sp_model_kwargs": {},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


FORMAT = CheckpointFormat(
    "hf", detect_hf, HFReader.open, plan_format, write_format, "Hugging Face: config.json + safetensors shards + index"
)


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(FORMAT)
