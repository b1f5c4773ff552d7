"""Hugging Face layout: config.json + safetensors shards (+ index) + tokenizer files.

An adapter over the canonical layout: names go through `llamactl.layout`, wq / wk are
permuted to HF's rotary layout on the way out and back on the way in. Metadata comes from
config.json and the safetensors headers (or `pytorch_model*.bin` indexes) without torch. The
writer also serves quantized checkpoints (`checkpoint.bnb`): a `QuantizedTensor` is written
as its parts under the module's HF name, as transformers saves it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl import dtypes, jsonio, layout
from llamactl.checkpoint.base import (
    TOKENIZER_FILE,
    TOKENIZER_JSON,
    CheckpointReader,
    ReaderBase,
    check_against_args,
    main_dtype,
    output_chat_template,
    stream_tensors,
)
from llamactl.checkpoint.formats import CheckpointFormat, WriteOptions, WritePlan
from llamactl.checkpoint.pth import read_records
from llamactl.checkpoint.safetensors_io import SafetensorsWriter, read_header
from llamactl.checkpoint.sharding import plan_size_shards
from llamactl.checkpoint.tensor_io import Extent, Files, Scratch
from llamactl.config import ModelArgs, args_from_hf_config, hf_config_from_args, read_json
from llamactl.errors import CheckpointError, ConfigError, printable
from llamactl.layout import HF_IGNORED, TensorInfo
from llamactl.plugins import hookimpl
from llamactl.quantize import QuantizedTensor, QuantSpec, storage
from llamactl.quantize.spec import NATIVE_METHOD
from llamactl.rotary import hf_rows_view, unpermute_from_hf

if TYPE_CHECKING:
    import torch

    from llamactl.checkpoint.base import Entry

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def quantization_method(path: Path) -> str | None:
    """config.json's quantization_config.quant_method (None when absent or unreadable)."""
    try:
        config = jsonio.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        quant = config.get("quantization_config") if isinstance(config, dict) else None
        return str(quant.get("quant_method")) if isinstance(quant, dict) else None
    except (OSError, ValueError):
        return None


# Quantized HF-layout checkpoints other formats read: bitsandbytes (`checkpoint.bnb`) and
# llamactl's native q8 / q4 (`checkpoint.native`).
QUANTIZED_METHODS = ("bitsandbytes", NATIVE_METHOD)


def detect_hf(path: Path) -> bool:
    """config.json, unless it describes a quantized checkpoint another format reads."""
    return (path / CONFIG_FILE).is_file() and quantization_method(path) not in QUANTIZED_METHODS


def weight_map(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the index or the single weights file ({} for a single file)."""
    for index_name, single_name in ((INDEX_FILE, SINGLE_FILE), (BIN_INDEX_FILE, BIN_FILE)):
        index_path = path / index_name
        if index_path.is_file():
            index = read_json(index_path)
            mapping = index.get("weight_map")
            if not isinstance(mapping, dict) or not mapping:
                raise ConfigError(f"{index_path}: missing or empty 'weight_map'")
            files = {str(name): path / str(file) for name, file in mapping.items()}
            for file in sorted(set(files.values())):
                if file.parent != path or not file.is_file():
                    raise CheckpointError(f"{index_path}: lists {printable(file.name)}, which does not exist")
            return files
        if (path / single_name).is_file():
            return {}  # filled from the file itself
    raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or {BIN_FILE} beside config.json")


def file_extents(file: Path) -> dict[str, Extent]:
    """Stored name -> where its bytes are, for one weights file (its header or pickle index; no torch)."""
    if file.suffix == ".safetensors":
        entries, _ = read_header(file)
        return {name: Extent(file, e.start, e.end - e.start, e.dtype, e.shape) for name, e in entries.items()}
    return {name: record.extent for name, record in read_records(file).items()}


@dataclass
class HFReader(ReaderBase):
    """A transformers LlamaForCausalLM directory, seen in Meta's layout."""

    format: str = "hf"
    stored: dict[str, TensorInfo] = field(default_factory=dict)  # HF name -> info as stored
    extents: dict[str, Extent] = field(default_factory=dict)  # HF name -> where its bytes are
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> HFReader:
        config_path = path / CONFIG_FILE
        config = read_json(config_path)
        args = args_from_hf_config(config, config_path)
        reader = cls(path=path, args=args, files=[], config=config)
        reader.context_known = "max_position_embeddings" in config
        reader.quant = cls._quantization(config, config_path)
        reader._index_files()
        reader.infos = reader._tensor_infos()
        check_against_args(reader.infos, args, str(path), CONFIG_FILE)
        return reader

    @staticmethod
    def _quantization(config: dict[str, Any], where: Path) -> QuantSpec | None:
        """None: a plain checkpoint. Quantized ones are `checkpoint.bnb`'s or `checkpoint.native`'s
        (`checkpoint.hf_quantized`); a `quantization_config` neither reads is refused here."""
        if config.get("quantization_config") is not None:
            QuantSpec.from_hf_config(config["quantization_config"], str(where))
        return None

    def _tensor_infos(self) -> list[TensorInfo]:
        return self._canonical_infos()

    def _index_files(self) -> None:
        mapping = weight_map(self.path)
        self.files = (
            sorted(set(mapping.values()))
            or [p for p in (self.path / SINGLE_FILE, self.path / BIN_FILE) if p.is_file()][:1]
        )
        for file in self.files:
            for name, extent in file_extents(file).items():
                if mapping and mapping.get(name) != file:
                    raise CheckpointError(f"{file}: tensor {printable(name)} is not where the index says")
                self.stored[name] = TensorInfo(name, extent.shape, extent.dtype)
                self.extents[name] = extent
        missing = sorted(set(mapping) - set(self.stored))
        if missing:
            raise CheckpointError(
                f"{mapping[missing[0]]}: tensor {printable(missing[0])} listed in the index is missing"
            )
        self._check_total_size()

    def _check_total_size(self) -> None:
        """An index whose total_size disagrees with the tensors it maps lies about the checkpoint."""
        for name in (INDEX_FILE, BIN_INDEX_FILE):
            if (self.path / name).is_file():
                claimed = (read_json(self.path / name).get("metadata") or {}).get("total_size")
                held = sum(e.nbytes for e in self.extents.values())
                if claimed is not None and claimed != held:
                    raise CheckpointError(
                        f"{self.path / name}: total_size {printable(str(claimed))[:30]} but its files hold {held} bytes"
                    )

    def _canonical_infos(self) -> list[TensorInfo]:
        infos = []
        for name, info in self.stored.items():
            if HF_IGNORED.match(name):
                continue
            meta = layout.hf_to_meta(name)
            if meta is None:
                where = self.extents[name].file
                raise CheckpointError(f"{where}: unexpected tensor {printable(name)} for LlamaForCausalLM")
            infos.append(TensorInfo(meta, info.shape, info.dtype))
        names = {i.name for i in infos}
        if "output.weight" not in names and self.config.get("tie_word_embeddings"):
            embedding = next((i for i in infos if i.name == "tok_embeddings.weight"), None)
            if embedding is not None:
                infos.append(TensorInfo("output.weight", embedding.shape, embedding.dtype))
        return infos

    def iter_raw(self, scratch: Scratch | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, tensor) exactly as stored, one at a time, in file order (with `scratch`: in
        its one reused buffer, valid until the next)."""
        with Files() as files:
            for name in sorted(self.stored, key=lambda n: (str(self.extents[n].file), self.extents[n].offset)):
                yield name, files.read(self.extents[name], name, scratch)

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        return self._canonical(None)

    def iter_transient(self) -> Iterator[tuple[str, Entry]]:
        """As iter_tensors, but tensors read into one reused buffer, each valid until the next."""
        return self._canonical(Scratch())

    def _canonical(self, scratch: Scratch | None) -> Iterator[tuple[str, Entry]]:
        tie = "output.weight" not in {layout.hf_to_meta(n) for n in self.stored}
        for hf_name, tensor in self.iter_raw(scratch):
            meta = layout.hf_to_meta(hf_name)
            if meta is None:
                continue  # ignored tensors such as rotary_emb.inv_freq
            yield meta, from_hf_rows(meta, tensor, self.args)
            if tie and meta == "tok_embeddings.weight":
                yield "output.weight", tensor


def from_hf_rows(meta_name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """A stored HF tensor in Meta's q/k row order."""
    heads = layout.rotary_heads(meta_name, args)
    return unpermute_from_hf(tensor, heads) if heads is not None else tensor


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


def stored_infos(info: TensorInfo, quant: QuantSpec | None, dtype: str | None) -> list[TensorInfo]:
    """The entries one canonical tensor becomes on disk: its HF name, or a quantized module's parts."""
    hf_name = layout.meta_to_hf(info.name)
    assert hf_name is not None, info.name
    if info.scheme is not None:
        assert quant is not None, info.name
        return storage(quant).part_infos(quant, hf_name.removesuffix(".weight"), info.shape)
    return [TensorInfo(hf_name, info.shape, dtype or info.dtype)]


def plan_hf(
    infos: Sequence[TensorInfo], max_shard_bytes: int, dtype: str | None, quant: QuantSpec | None = None
) -> WritePlan:
    """(file name, stored entries) for each safetensors file; a tensor's parts share one file."""
    units = sorted((stored_infos(i, quant, dtype) for i in infos), key=lambda unit: _hf_sort_key(unit[0].name))
    heads = [TensorInfo(unit[0].name, (sum(i.nbytes for i in unit),), "uint8") for unit in units]
    groups = plan_size_shards(heads, max_shard_bytes)
    by_head = {unit[0].name: unit for unit in units}
    files = [[info for head in group for info in by_head[head.name]] for group in groups]
    return list(zip(shard_file_names(len(files)), files))


def write_hf(
    out_dir: Path,
    plan: WritePlan,
    reader: CheckpointReader,
    on_tensor: Callable[[str, int], None] | None = None,
    config_extra: dict[str, Any] | None = None,
) -> None:
    """Stream canonical entries into the planned safetensors files, then config and index."""
    writers = [SafetensorsWriter(out_dir / name, infos) for name, infos in plan]
    where = {info.name: (writer, info) for writer, (_, infos) in zip(writers, plan) for info in infos}
    scratch = Scratch()  # permuted or cast tensors go out through it in chunks
    try:
        for meta_name, entry in stream_tensors(reader):
            hf_name = layout.meta_to_hf(meta_name)
            assert hf_name is not None, meta_name
            written = 0
            for name, tensor, dtype, shape in _stored_parts(meta_name, hf_name, entry, reader.args, where):
                writer, _ = where[name]
                written += writer.add_tensor(name, dtype, shape, tensor, scratch)
            if on_tensor:
                on_tensor(meta_name, written)
        for writer in writers:
            writer.finish()
    finally:
        for writer in writers:
            writer.close()
    if len(plan) > 1:
        total = sum(writer.nbytes for writer in writers)
        index = {"metadata": {"total_size": total}, "weight_map": {i.name: name for name, infos in plan for i in infos}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    plain_names = {layout.meta_to_hf(i.name) for i in reader.tensor_infos() if i.scheme is None}
    plain = [info for _, infos in plan for info in infos if info.name in plain_names]
    extra = special_token_ids(reader) | (config_extra or {})
    write_hf_config(out_dir, reader.args, dtypes.lookup(main_dtype(plain)).hf, extra)


def special_token_ids(reader: CheckpointReader) -> dict[str, int]:
    """BOS/EOS ids of the checkpoint's tokenizer.json for config.json (a tokenizer.model is Llama's: 1 and 2)."""
    path = reader.tokenizer_path
    if path is None or path.suffix.lower() != ".json":
        return {}
    from llamactl.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    return {key: value for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)) if value >= 0}


def _stored_parts(
    meta_name: str, hf_name: str, entry: Entry, args: ModelArgs, where: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor, str, tuple[int, ...]]]:
    """(stored name, tensor, dtype to store, stored shape) for one canonical entry."""
    if isinstance(entry, QuantizedTensor):
        module = hf_name.removesuffix(".weight")
        for part, tensor in entry.parts.items():
            yield f"{module}.{part}", tensor, dtypes.name_of(tensor.dtype), tuple(tensor.shape)
        return
    heads = layout.rotary_heads(meta_name, args)
    _, info = where[hf_name]
    # The permutation as a view: the writer gathers its rows chunk by chunk, never copying it whole.
    yield hf_name, hf_rows_view(entry, heads) if heads is not None else entry, info.dtype, tuple(entry.shape)


def write_hf_config(out_dir: Path, args: ModelArgs, dtype_name: str, extra: dict[str, Any] | None = None) -> None:
    """config.json and generation_config.json (Meta's sampling defaults)."""
    config = hf_config_from_args(args, dtype_name) | (extra or {})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_length": args.max_seq_len,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_tokenizer_files(
    out_dir: Path, tokenizer_path: Path, args: ModelArgs, chat_template: str | None = None
) -> None:
    """The tokenizer as transformers loads it, with the chat template the checkpoint runs with.

    A SentencePiece tokenizer.model gets the two JSON files transformers' LlamaTokenizer reads;
    a tokenizer.json is copied with its tokenizer_config.json (the source's, where it has one).
    """
    if tokenizer_path.suffix.lower() == ".json":
        shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_JSON)
        source = tokenizer_path.parent / "tokenizer_config.json"
        config = read_json(source) if source.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.pop("chat_template", None)
    else:
        shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_FILE)
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
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def plan_format(reader: CheckpointReader, options: WriteOptions) -> WritePlan:
    return plan_hf(reader.tensor_infos(), options.max_shard_bytes, options.dtype, reader.quant)


def write_format(out_dir: Path, reader: CheckpointReader, plan: WritePlan, options: WriteOptions) -> None:
    write_hf(out_dir, plan, reader, options.on_tensor)
    if reader.tokenizer_path is not None:
        write_tokenizer_files(out_dir, reader.tokenizer_path, reader.args, output_chat_template(reader))


FORMAT = CheckpointFormat(
    "hf", detect_hf, HFReader.open, plan_format, write_format, "Hugging Face: config.json + safetensors shards + index"
)


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(FORMAT)
