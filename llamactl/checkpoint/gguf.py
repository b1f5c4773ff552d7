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

Writing (`gguf_write`) streams one file, built beside its destination and renamed into place
(`convert.run_convert`, `atomic.atomic_file`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl import layout
from llamactl.checkpoint.base import (
    TOKENIZER_FILE,
    ReaderBase,
    check_against_args,
    order_like,
)
from llamactl.checkpoint.formats import CheckpointFormat
from llamactl.checkpoint.gguf_file import GGUFArray, GGUFFile, GGUFTensor, read_gguf
from llamactl.checkpoint.gguf_quants import dequantize
from llamactl.checkpoint.gguf_vocab import bpe_vocab_from_gguf, spm_model_bytes, vocab_from_gguf
from llamactl.checkpoint.gguf_write import plan_format, write_format
from llamactl.checkpoint.tensor_io import Extent, Files
from llamactl.config import ModelArgs, ffn_recipe_for
from llamactl.errors import CheckpointError, printable
from llamactl.home import cache_dir
from llamactl.layout import TensorInfo
from llamactl.plugins import hookimpl

if TYPE_CHECKING:
    import torch

    from llamactl.checkpoint.base import Entry

SUFFIX = ".gguf"
ARCH = "llama"

# ggml types whose blocks a llamactl quantization scheme keeps as they are (ggml type name ->
# registered scheme): the native q8 / q4 parts are exactly GGUF's Q8_0 / Q4_0 blocks, so such
# a file runs at its own width instead of being dequantized. A file mixing several of them
# in its block projections is dequantized (a reader has one quantization spec).
NATIVE_SCHEMES: dict[str, str] = {"Q8_0": "q8", "Q4_0": "q4"}

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


def native_scheme(meta_name: str, tensor: GGUFTensor, native: dict[str, str] = NATIVE_SCHEMES) -> str | None:
    """THE per-tensor decision: the scheme that keeps this tensor's ggml blocks, or None to dequantize."""
    scheme = native.get(tensor.ggml.name)
    return scheme if scheme is not None and layout.is_quantizable(meta_name) else None


def tensor_entry(
    meta_name: str, tensor: GGUFTensor, data: torch.Tensor, native: dict[str, str] = NATIVE_SCHEMES
) -> Entry:
    """One tensor's stored bytes (uint8, memory-mapped) as a canonical entry.

    Plain F32 / F16 / BF16 stay a view of the file; quantized types become float32 (exactly
    what ggml computes); q/k rows are already in Meta's order (see the module docstring).
    """
    scheme = native_scheme(meta_name, tensor, native)
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
    native: dict[str, str] = field(default_factory=lambda: dict(NATIVE_SCHEMES))  # what this file keeps quantized

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
        reader.context_known = _number(file, "llama.context_length", int, None) is not None
        reader.tied = "output.weight" not in tensors and embedding is not None
        schemes = {s for name, t in tensors.items() if (s := native_scheme(name, t)) is not None}
        if len(schemes) > 1:
            reader.native = {}
        elif schemes:
            from llamactl.quantize import get_scheme

            reader.quant = get_scheme(schemes.pop())
        reader.infos = [reader._info(name, t) for name, t in tensors.items()]
        if reader.tied:
            reader.infos.append(reader._info("output.weight", embedding))  # type: ignore[arg-type]
        check_against_args(reader.infos, args, str(gguf), "its GGUF metadata")
        reader.infos = order_like(reader.infos, args)
        return reader

    def _info(self, name: str, tensor: GGUFTensor) -> TensorInfo:
        scheme = native_scheme(name, tensor, self.native)
        if scheme is not None:
            return TensorInfo(name, tensor.shape, "uint8", scheme=scheme, stored_bytes=tensor.nbytes)
        return TensorInfo(name, tensor.shape, tensor.ggml.dtype or "fp32")

    @functools.cached_property
    def tokenizer_path(self) -> Path | None:  # type: ignore[override]
        """The GGUF's own vocabulary as a file the tokenizer package reads; else a tokenizer.model beside it.

        A `llama` vocabulary becomes a SentencePiece model (sentencepiece is that vocabulary's
        own implementation, so nothing is approximated); a `gpt2` one a tokenizer.json directory
        (`tokenizer.bpe`). Both are cached by content under `$LLAMACTL_HOME/cache`.
        """
        vocab = vocab_from_gguf(self.file)
        if vocab is not None:
            return _cached_model_file(spm_model_bytes(vocab, str(self.files[0])))
        if self.file.get("tokenizer.ggml.model") == "gpt2":
            return _cached_bpe_tokenizer(self.file, self.chat_template)
        beside = self.path / TOKENIZER_FILE if self.path.is_dir() else None
        return beside if beside is not None and beside.is_file() else None

    @property
    def chat_template(self) -> str | None:  # type: ignore[override]
        template = self.file.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template else None

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
        # Each tensor's bytes are read by extent (checkpoint.tensor_io), not mapped: a file
        # truncated while it is read is then an error naming it, not a SIGBUS.
        with Files() as files:
            for name, tensor in sorted(self.tensors.items(), key=lambda item: item[1].start):
                extent = Extent(self.files[0], tensor.start, tensor.nbytes, "uint8", (tensor.nbytes,))
                entry = tensor_entry(name, tensor, files.read(extent, name), self.native)
                yield name, entry
                if self.tied and name == "tok_embeddings.weight":
                    yield "output.weight", entry


def _cached_bpe_tokenizer(file: GGUFFile, chat_template: str | None) -> Path:
    """`$LLAMACTL_HOME/cache/gguf-tokenizers/<key>/tokenizer.json` for a `gpt2` vocabulary.

    Keyed by the file's identity (path, size, mtime): decoding 50k tokens and merges and
    building the BPE costs a second, so a file already seen is not read again.
    """
    from llamactl.tokenizer.bpe import byte_level_bpe
    from llamactl.tokenizer.hf import JSON_FILE, TokenizerConfig, save_tokenizer_dir

    stat = file.path.stat()
    key = hashlib.sha256(f"{file.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    target = cache_dir("gguf-tokenizers", key)
    if (target / JSON_FILE).is_file():
        return target / JSON_FILE
    vocab = bpe_vocab_from_gguf(file)
    assert vocab is not None
    backend = byte_level_bpe(vocab.tokens, vocab.merges, vocab.types, vocab.pre, str(file.path))

    def token(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None else None

    eot = file.get("tokenizer.ggml.eot_token_id")  # an end-of-turn token llama.cpp stops at too
    stops = tuple(i for i in (vocab.eos_id, eot) if isinstance(i, int) and not isinstance(i, bool))
    config = TokenizerConfig(
        token(vocab.bos_id),
        token(vocab.eos_id),
        token(vocab.unk_id),
        token(vocab.pad_id),
        vocab.add_bos,
        vocab.add_eos,
        chat_template,
        stops if eot is not None else (),
    )
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_tokenizer_dir(tmp, backend, config)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / JSON_FILE).is_file():  # not another process's copy: a read-only home
            target = Path(tempfile.mkdtemp(prefix="llamactl-gguf-"))
            save_tokenizer_dir(target, backend, config)
    return target / JSON_FILE


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
