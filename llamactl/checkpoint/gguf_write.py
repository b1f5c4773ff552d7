"""Writing GGUF: the plan (one ggml type per tensor) and the streaming writer.

GGUFWriter (gguf-py) writes the header, the KVs and the tensor infos from the plan alone; the
tensor data is then written here at the offsets those infos announce, as each tensor arrives,
so memory stays near one tensor (GGUFWriter itself would hold every tensor until the end).
q/k rows are written in Meta's order, which is GGUF's (see `checkpoint.gguf`). Norms are F32
as llama.cpp keeps them; `--gguf-type` quantizes the block projections with gguf.quants.
The vocabulary: a GGUF source's `tokenizer.*` KVs as they are (llama or gpt2), else the
SentencePiece `tokenizer.model` or a byte-level tokenizer.json as llama.cpp's converter types
them, plus a chat template.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl import dtypes, layout
from llamactl.checkpoint.base import CheckpointReader, order_like, output_chat_template, tensor_bytes
from llamactl.checkpoint.formats import WriteOptions, WritePlan
from llamactl.checkpoint.gguf_file import GGUFArray, GGUFFile
from llamactl.checkpoint.gguf_quants import BY_NAME, GGMLType
from llamactl.checkpoint.gguf_vocab import bpe_gguf_kvs, gguf_kvs, read_tokenizer_json, read_tokenizer_model
from llamactl.errors import CheckpointError, UsageError
from llamactl.layout import TensorInfo

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------- planning

GGUF_TYPES = ("q8_0", "q4_0")  # what --gguf-type quantizes with gguf.quants
_BY_DTYPE = {"fp32": BY_NAME["F32"], "fp16": BY_NAME["F16"], "bf16": BY_NAME["BF16"], "fp64": BY_NAME["F32"]}
_FILE_TYPE = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2}  # llama_ftype (gguf.LlamaFileType)


def parse_gguf_type(name: str | None) -> GGMLType | None:
    if name is None:
        return None
    if name.lower() not in GGUF_TYPES:
        raise UsageError(f"--gguf-type {name}: choose one of {', '.join(GGUF_TYPES)}")
    return BY_NAME[name.upper()]


def stored_type(info: TensorInfo, dtype: str | None, quant: GGMLType | None) -> GGMLType:
    """What one tensor is written as: norms F32 (as llama.cpp keeps them), block projections in
    `quant` when their rows are whole blocks (else, as convert_hf_to_gguf falls back, unquantized),
    everything else at `dtype` or its own."""
    if len(info.shape) == 1:
        return BY_NAME["F32"]
    if quant is not None and layout.is_quantizable(info.name) and info.shape[-1] % quant.block == 0:
        return quant
    return _BY_DTYPE[dtype or info.dtype]


def planned_info(info: TensorInfo, ggml: GGMLType) -> TensorInfo:
    name = layout.meta_to_gguf(info.name)
    assert name is not None, info.name
    if ggml.quantized:
        return TensorInfo(name, info.shape, "uint8", scheme=ggml.name, stored_bytes=ggml.nbytes(info.numel))
    return TensorInfo(name, info.shape, ggml.dtype or "fp32")


def plan_format(reader: CheckpointReader, options: WriteOptions) -> WritePlan:
    quant = parse_gguf_type(options.gguf_type)
    ordered = order_like(reader.tensor_infos(), reader.args)  # llama.cpp's order: embeddings, blocks, head
    infos = [planned_info(i, stored_type(i, options.dtype, quant)) for i in ordered]
    _tokenizer_kvs(reader)  # a tokenizer that cannot be written fails the plan, before any byte
    return [("model.gguf", infos)]


# ----------------------------------------------------------------------------- writing


def _tokenizer_kvs(reader: CheckpointReader) -> dict[str, tuple[object, str]]:
    """tokenizer.* KVs: a GGUF source's as they are (llama or gpt2), else from tokenizer.model."""
    source = getattr(reader, "file", None)
    if isinstance(source, GGUFFile):  # a GGUF source: its vocabulary as it is, llama or gpt2
        return {key: _kv_from(source, key) for key in source.fields if key.startswith("tokenizer.")}
    kvs: dict[str, tuple[object, str]] = {}
    if reader.tokenizer_path is not None and reader.tokenizer_path.suffix.lower() == ".json":
        kvs = bpe_gguf_kvs(read_tokenizer_json(reader.tokenizer_path, reader.args.vocab_size))
    elif reader.tokenizer_path is not None:
        kvs = gguf_kvs(read_tokenizer_model(reader.tokenizer_path, reader.args.vocab_size))
    template = output_chat_template(reader)
    if template is not None:
        kvs["tokenizer.chat_template"] = (template, "STRING")
    return kvs


_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL"}
_TYPE_NAMES |= {8: "STRING", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}


def _kv_from(file: GGUFFile, key: str) -> tuple[object, str]:
    value = file.fields[key]
    if isinstance(value, GGUFArray):
        return file.array(key), f"ARRAY:{_TYPE_NAMES[value.item_type]}"
    return value, _TYPE_NAMES[file.types[key]]


def metadata_kvs(reader: CheckpointReader, infos: list[TensorInfo]) -> dict[str, tuple[object, str]]:
    """Every KV after general.architecture, in the order convert_hf_to_gguf.py writes them."""
    args = reader.args
    main = Counter(i.scheme or _BY_DTYPE[i.dtype].name for i in infos if len(i.shape) > 1).most_common(1)[0][0]
    kvs: dict[str, tuple[object, str]] = {
        "general.type": ("model", "STRING"),
        "general.name": (reader.path.name.removesuffix(".gguf") or "llama", "STRING"),
        "llama.block_count": (args.n_layers, "UINT32"),
        "llama.context_length": (args.max_seq_len, "UINT32"),
        "llama.embedding_length": (args.dim, "UINT32"),
        "llama.feed_forward_length": (args.hidden_dim, "UINT32"),
        "llama.attention.head_count": (args.n_heads, "UINT32"),
        "llama.attention.head_count_kv": (args.kv_heads, "UINT32"),
        "llama.rope.freq_base": (args.rope_theta, "FLOAT32"),
        "llama.attention.layer_norm_rms_epsilon": (args.norm_eps, "FLOAT32"),
        "general.file_type": (_FILE_TYPE[main], "UINT32"),
        "llama.vocab_size": (args.vocab_size, "UINT32"),
        "llama.rope.dimension_count": (args.head_dim, "UINT32"),
    }
    return kvs | _tokenizer_kvs(reader) | {"general.quantization_version": (2, "UINT32")}


def _write_header(out: Path, kvs: dict[str, tuple[object, str]], infos: list[TensorInfo]) -> tuple[int, int]:
    """Header, KVs and tensor infos by GGUFWriter; returns (data section start, alignment)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    writer = GGUFWriter(None, "llama")
    for key, (value, kind) in kvs.items():
        main, _, sub = kind.partition(":")
        writer.add_key_value(key, value, GGUFValueType[main], GGUFValueType[sub] if sub else None)
    for info in infos:
        ggml = BY_NAME[info.scheme] if info.scheme else _BY_DTYPE[info.dtype]
        # A non-uint8 dtype makes GGUFWriter take the shape as logical (it reverses it to ggml dims).
        writer.add_tensor_info(info.name, info.shape, np.dtype(np.float32), info.nbytes, GGMLQuantizationType(ggml.id))
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    end = writer.fout[0].tell()
    alignment = writer.data_alignment
    writer.close()
    return end + (-end % alignment), alignment


def _encode(tensor: torch.Tensor, info: TensorInfo) -> memoryview:
    """The bytes GGUF stores for one canonical tensor (rows are contiguous: no transposition)."""
    if info.scheme is None:
        target = dtypes.to_torch(info.dtype)
        return tensor_bytes(tensor if tensor.dtype == target else tensor.to(target))
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    blocks = quants.quantize(tensor.float().numpy(), GGMLQuantizationType(BY_NAME[info.scheme].id))
    return memoryview(np.ascontiguousarray(blocks).reshape(-1))


def write_format(out: Path, reader: CheckpointReader, plan: WritePlan, options: WriteOptions) -> None:
    """Stream `reader` into the one GGUF file `out` described by `plan`."""
    [(_, infos)] = plan
    data_start, alignment = _write_header(out, metadata_kvs(reader, infos), infos)
    offsets, position = {}, data_start  # as GGUFWriter.write_ti_data_to_file numbered them
    for info in infos:
        offsets[info.name] = position
        position += info.nbytes + (-info.nbytes % alignment)
    pending = {info.name: info for info in infos}
    with open(out, "r+b") as handle:
        handle.truncate(position)  # padding between tensors reads as zeros
        for meta_name, entry in reader.iter_tensors():
            name = layout.meta_to_gguf(meta_name)
            info = pending.pop(name or "", None)
            if info is None:
                raise CheckpointError(f"{reader.path}: tensor {meta_name} arrived twice or was not planned")
            data = _encode(entry, info)  # type: ignore[arg-type]
            if len(data) != info.nbytes:
                raise AssertionError(f"{name}: {len(data)} bytes, {info.nbytes} planned")
            handle.seek(offsets[info.name])
            handle.write(data)
            if options.on_tensor:
                options.on_tensor(meta_name, len(data))
            del entry, data  # hold nothing while the source produces the next tensor
    if pending:
        raise CheckpointError(f"source ended before tensor {next(iter(pending))} was written")
