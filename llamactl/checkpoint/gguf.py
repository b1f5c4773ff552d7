"""GGUF (llama.cpp's single-file format) as a checkpoint format: reader, writer, registration.

An adapter over the canonical layout like `hf.py`. Names go through `llamactl.layout`'s GGUF
column (`blk.0.attn_q.weight` <-> `layers.0.attention.wq.weight`). Rows of wq / wk need no
permutation: convert_hf_to_gguf.py's `LlamaModel.permute` turns Hugging Face's half-split
rotary rows back into Meta's interleaved pairs (llama.cpp's LLAMA rope is the interleaved
"normal" one), so a GGUF holds q/k exactly in Meta's order; transformers' GGUF loader applies
the inverse (`_reverse_permute_weights`) to get HF's. GGUF dims are innermost first, so a
[out, in] weight is stored with dims [in, out] and its rows are contiguous.

Reading is lazy: `gguf_file.read_gguf` validates the header without touching tensor data;
`iter_tensors` memory-maps the file and turns one tensor at a time into the canonical
float layout (`tensor_entry`, the one place that decides per tensor between dequantizing and
keeping ggml's blocks for a native scheme). A file without `output.weight` ties the head to
the embeddings (llama.cpp's rule), and the reader yields the embedding for both.

Writing streams: GGUFWriter (gguf-py) writes the header, the KVs and the tensor infos from
the plan alone; the tensor data is then written here at the offsets those infos announce, as
each tensor arrives, so memory stays near one tensor (GGUFWriter itself would hold every
tensor until the end). DST is one file, built beside its destination and renamed into place
(`convert.run_convert`, `atomic.atomic_file`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl import dtypes, layout
from llamactl.checkpoint.base import (
    TOKENIZER_FILE,
    CheckpointReader,
    ReaderBase,
    check_against_args,
    order_like,
    tensor_bytes,
)
from llamactl.checkpoint.formats import CheckpointFormat, WriteOptions, WritePlan
from llamactl.checkpoint.gguf_file import GGUFArray, GGUFFile, GGUFTensor, read_gguf
from llamactl.checkpoint.gguf_quants import BY_NAME, GGMLType, dequantize
from llamactl.checkpoint.gguf_vocab import gguf_kvs, read_tokenizer_model, spm_model_bytes, vocab_from_gguf
from llamactl.config import ModelArgs, ffn_recipe_for
from llamactl.errors import CheckpointError, UsageError, printable
from llamactl.home import cache_dir
from llamactl.layout import TensorInfo
from llamactl.plugins import hookimpl

if TYPE_CHECKING:
    import torch

    from llamactl.checkpoint.base import Entry

SUFFIX = ".gguf"
ARCH = "llama"

# ggml types whose blocks a llamactl quantization scheme keeps as they are: ggml type name ->
# registered scheme. Empty until the native schemes land (their stored parts are exactly
# GGUF's Q8_0 / Q4_0 blocks); then {"Q8_0": "q8", "Q4_0": "q4"} runs those at native width.
NATIVE_SCHEMES: dict[str, str] = {}

# Hugging Face's meta-llama/Llama-2-*-chat-hf tokenizer_config.json `chat_template`, verbatim.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


# ----------------------------------------------------------------------------- finding the file


def detect_gguf(path: Path) -> bool:
    """A `.gguf` file, or a directory holding one and no params.json / config.json."""
    if path.is_file():
        return path.suffix.lower() == SUFFIX
    if not path.is_dir() or (path / "config.json").is_file() or (path / "params.json").is_file():
        return False
    return any(_gguf_files(path))


def _gguf_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())


def gguf_file_in(path: Path) -> Path:
    """The one .gguf of `path` (itself when it is a file)."""
    if path.is_file():
        return path
    found = _gguf_files(path)
    if len(found) != 1:
        names = ", ".join(printable(p.name) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise CheckpointError(f"{path}: holds {len(found)} .gguf files ({names}); give the path of the one to use")
    return found[0]


# ----------------------------------------------------------------------------- metadata


def _float32_value(value: float) -> float:
    """The shortest decimal that is the same float32 (1e-5, not 9.999999747378752e-06)."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return value


def _number(file: GGUFFile, key: str, kind: type, default: Any = ...) -> Any:
    value = file.get(key)
    if value is None:
        if default is ...:
            raise CheckpointError(f"{file.path}: GGUF metadata {key} is missing")
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if not ok or isinstance(value, bool):
        shown = "an array" if isinstance(value, GGUFArray) else printable(repr(value))[:40]
        raise CheckpointError(f"{file.path}: GGUF metadata {key} should be a number, found {shown}")
    return _float32_value(value) if file.types.get(key) == 6 else kind(value)


def args_from_gguf(file: GGUFFile, embedding_rows: int | None) -> ModelArgs:
    """ModelArgs from `llama.*` metadata (the keys transformers' GGUF loader maps too)."""
    where = file.path
    arch = file.get("general.architecture")
    if arch != ARCH:
        shown = printable(repr(arch))[:60] if arch is not None else "missing"
        raise CheckpointError(f"{where}: architecture {shown} is not supported (llamactl reads 'llama' GGUF files)")
    if _number(file, "llama.expert_count", int, 0) > 0:
        raise CheckpointError(f"{where}: a mixture-of-experts llama (llama.expert_count) is not supported")
    scaling = file.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(
            f"{where}: rope scaling {printable(str(scaling))[:40]!r} is not supported (Llama 1/2 only)"
        )
    for key in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length", "context_length"):
        if _number(file, f"llama.{key}", int, 1) < 1:  # before any division by it
            raise CheckpointError(f"{where}: GGUF metadata llama.{key} is {file.get(f'llama.{key}')}, expected >= 1")
    dim = _number(file, "llama.embedding_length", int)
    n_heads = _number(file, "llama.attention.head_count", int)
    tokens = file.get("tokenizer.ggml.tokens")
    vocab = _number(file, "llama.vocab_size", int, None) or (tokens.count if isinstance(tokens, GGUFArray) else None)
    ffn = _number(file, "llama.feed_forward_length", int)
    multiple_of, multiplier = ffn_recipe_for(dim, ffn, where)
    args = ModelArgs(
        dim=dim,
        n_layers=_number(file, "llama.block_count", int),
        n_heads=n_heads,
        n_kv_heads=_number(file, "llama.attention.head_count_kv", int, n_heads),
        vocab_size=vocab or embedding_rows or 0,
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=_number(file, "llama.attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=_number(file, "llama.rope.freq_base", float, 10000.0),
        max_seq_len=_number(file, "llama.context_length", int, 4096),
    ).validate(str(where))
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        value = _number(file, key, int, args.head_dim)
        if value != args.head_dim:
            raise CheckpointError(f"{where}: {key} is {value}, but dim / head_count is {args.head_dim}")
    return args


def canonical_tensors(file: GGUFFile) -> dict[str, GGUFTensor]:
    """Meta name -> GGUF tensor, refusing anything that is not a llama weight."""
    out = {}
    for tensor in file.tensors:
        meta = layout.gguf_to_meta(tensor.name)
        if meta is None:
            if tensor.name == "rope_freqs.weight":
                raise CheckpointError(f"{file.path}: rope_freqs (Llama 3.1 rope scaling) is not supported")
            raise CheckpointError(f"{file.path}: unexpected tensor {printable(tensor.name)[:120]!r} for a llama GGUF")
        out[meta] = tensor
    return out


# ----------------------------------------------------------------------------- reading


def native_scheme(meta_name: str, tensor: GGUFTensor) -> str | None:
    """THE per-tensor decision: the scheme that keeps this tensor's ggml blocks, or None to dequantize."""
    scheme = NATIVE_SCHEMES.get(tensor.ggml.name)
    return scheme if scheme is not None and layout.is_quantizable(meta_name) else None


def tensor_entry(meta_name: str, tensor: GGUFTensor, data: torch.Tensor) -> Entry:
    """One tensor's stored bytes (uint8, memory-mapped) as a canonical entry.

    Plain F32 / F16 / BF16 stay a view of the file; quantized types become float32 (exactly
    what ggml computes); q/k rows are already in Meta's order (see the module docstring).
    """
    scheme = native_scheme(meta_name, tensor)
    if scheme is not None:
        from llamactl.quantize import QuantizedTensor, get_scheme

        # The scheme's backend defines its parts; ggml's blocks as [rows, row_bytes].
        blocks = data.reshape(tensor.shape[0], -1) if len(tensor.shape) > 1 else data
        return QuantizedTensor(get_scheme(scheme), tensor.shape, {"weight": blocks})
    return dequantize(data, tensor.ggml, tensor.shape)


@dataclass
class GGUFReader(ReaderBase):
    """One llama GGUF file in the canonical layout."""

    format: str = "gguf"
    file: GGUFFile = field(default=None)  # type: ignore[assignment]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)  # Meta name -> stored tensor
    tied: bool = False  # no output.weight: the head is the embedding

    @classmethod
    def open(cls, path: Path) -> GGUFReader:
        gguf = gguf_file_in(path)
        file = read_gguf(gguf)
        if _number(file, "split.count", int, 1) > 1:
            raise CheckpointError(f"{gguf}: one part of a split GGUF; merge it first (llama-gguf-split --merge)")
        tensors = canonical_tensors(file)
        embedding = tensors.get("tok_embeddings.weight")
        args = args_from_gguf(file, embedding.shape[0] if embedding is not None else None)
        reader = cls(path=path, args=args, files=[gguf], file=file, tensors=tensors)
        reader.tied = "output.weight" not in tensors and embedding is not None
        reader.infos = [reader._info(name, t) for name, t in tensors.items()]
        if reader.tied:
            reader.infos.append(reader._info("output.weight", embedding))  # type: ignore[arg-type]
        check_against_args(reader.infos, args, str(gguf), "its GGUF metadata")
        reader.infos = order_like(reader.infos, args)
        return reader

    def _info(self, name: str, tensor: GGUFTensor) -> TensorInfo:
        scheme = native_scheme(name, tensor)
        if scheme is not None:
            return TensorInfo(name, tensor.shape, "uint8", scheme=scheme, stored_bytes=tensor.nbytes)
        return TensorInfo(name, tensor.shape, tensor.ggml.dtype or "fp32")

    @functools.cached_property
    def tokenizer_path(self) -> Path | None:  # type: ignore[override]
        """A SentencePiece file for the GGUF's own llama vocabulary; else a tokenizer.model beside it.

        A GGUF with a `gpt2` (BPE) vocabulary has none yet: the tokenizer package will read it.
        """
        vocab = vocab_from_gguf(self.file)
        if vocab is None:
            beside = self.path / TOKENIZER_FILE if self.path.is_dir() else None
            return beside if beside is not None and beside.is_file() else None
        return _cached_model_file(spm_model_bytes(vocab, str(self.files[0])))

    def storage(self) -> dict[str, Any]:
        """How the file stores its tensors: ggml type counts and bits per weight (for `info`)."""
        stored = self.file.tensors
        numel = sum(t.numel for t in stored)
        main = Counter(t.ggml.name for n, t in self.tensors.items() if layout.is_quantizable(n)).most_common(1)
        return {
            "container": f"GGUF v{self.file.version}",
            "main_type": main[0][0] if main else stored[0].ggml.name,
            "tensor_types": dict(Counter(t.ggml.name for t in stored).most_common()),
            "bits_per_weight": round(8 * sum(t.nbytes for t in stored) / max(numel, 1), 4),
            "tied_embeddings": self.tied,
            "vocabulary": self.file.get("tokenizer.ggml.model"),
            "chat_template": isinstance(self.file.get("tokenizer.chat_template"), str),
        }

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        data = _mapped_tensors(self.files[0])
        for name, tensor in sorted(self.tensors.items(), key=lambda item: item[1].start):
            entry = tensor_entry(name, tensor, data[tensor.start : tensor.start + tensor.nbytes])
            yield name, entry
            if self.tied and name == "tok_embeddings.weight":
                yield "output.weight", entry


def _mapped_tensors(path: Path) -> torch.Tensor:
    """The whole file as a uint8 tensor over a copy-on-write mapping (pages load on first touch)."""
    import mmap

    import torch

    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for torch, never written back
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _cached_model_file(model: bytes) -> Path:
    """`$LLAMACTL_HOME/cache/gguf-tokenizers/<sha256>.model` (a temp file where the home is read-only)."""
    digest = hashlib.sha256(model).hexdigest()[:32]
    target = cache_dir("gguf-tokenizers", f"{digest}.model")
    if target.is_file() and target.stat().st_size == len(model):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(model)
        os.replace(tmp, target)
        return target
    except OSError:
        with tempfile.NamedTemporaryFile(prefix="llamactl-gguf-", suffix=".model", delete=False) as handle:
            handle.write(model)
        return Path(handle.name)


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


def chat_template_of(reader: CheckpointReader) -> str | None:
    """The source's own template (tokenizer_config.json), else Llama 2's for a `*chat*` checkpoint."""
    config = reader.path / "tokenizer_config.json"
    if reader.path.is_dir() and config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            template = None
        if isinstance(template, str) and template:
            return template
    return LLAMA2_CHAT_TEMPLATE if "chat" in reader.path.name.lower() else None


def _tokenizer_kvs(reader: CheckpointReader) -> dict[str, tuple[object, str]]:
    """tokenizer.* KVs: a GGUF source's as they are (llama or gpt2), else from tokenizer.model."""
    if isinstance(reader, GGUFReader):
        return {key: _kv_from(reader.file, key) for key in reader.file.fields if key.startswith("tokenizer.")}
    kvs: dict[str, tuple[object, str]] = {}
    if reader.tokenizer_path is not None:
        kvs = gguf_kvs(read_tokenizer_model(reader.tokenizer_path, reader.args.vocab_size))
    template = chat_template_of(reader)
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
        "general.name": (reader.path.name.removesuffix(SUFFIX) or "llama", "STRING"),
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

    writer = GGUFWriter(None, ARCH)
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


FORMAT = CheckpointFormat(
    "gguf",
    detect_gguf,
    GGUFReader.open,
    plan_format,
    write_format,
    "GGUF: one llama.cpp file (reads F32/F16/BF16, Q4_0..Q8_0 and K-quants; writes F32/F16/BF16, Q8_0, Q4_0)",
    file_suffix=SUFFIX,
)


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(FORMAT)
