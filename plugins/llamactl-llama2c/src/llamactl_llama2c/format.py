"""llama2.c's legacy (version 0) checkpoint: a 7-int header, then every weight as raw fp32.

Layout, as llama2.c's `export.py legacy_export` writes it (and `run.c` reads it):
header `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len` (int32; a
negative vocab_size means the output head is stored separately, otherwise it is tied to the
embedding); then tok_embeddings; each per-layer tensor for all layers in turn (attention_norm,
wq, wk, wv, wo, ffn_norm, w1, w2, w3); norm; the RoPE cos and sin tables (seq_len x head_dim/2);
the output head when untied. Weights keep Meta's shapes and Meta's q/k layout (export.py
does not permute), so Meta names map 1:1 and no rotary permutation is needed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llamactl.checkpoint.base import ReaderBase, check_against_args, order_like
from llamactl.config import ModelArgs, ffn_recipe_for
from llamactl.errors import CheckpointError
from llamactl.layout import TensorInfo, expected_shapes

if TYPE_CHECKING:
    import torch

HEADER = struct.Struct("<7i")
MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer export versions (not supported)
_PER_LAYER = (
    "attention_norm",
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "ffn_norm",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
_LIMIT = 1 << 20  # no sane header field is larger; rejects random files quickly


@dataclass(frozen=True)
class Header:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # negative: untied output head stored at the end
    seq_len: int

    @property
    def shared_classifier(self) -> bool:
        return self.vocab_size > 0

    def plausible(self) -> bool:
        fields = (
            self.dim,
            self.hidden_dim,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            abs(self.vocab_size),
            self.seq_len,
        )
        return (
            all(0 < f < _LIMIT for f in fields)
            and self.dim % self.n_heads == 0
            and self.n_heads % self.n_kv_heads == 0
            and (self.dim // self.n_heads) % 2 == 0
        )


def read_header(file: Path) -> Header | None:
    """The header if `file` can be a v0 checkpoint (None for anything else)."""
    try:
        with file.open("rb") as f:
            raw = f.read(HEADER.size)
    except OSError:
        return None
    if len(raw) < HEADER.size:
        return None
    header = Header(*HEADER.unpack(raw))
    return header if header.plausible() else None


def layout(header: Header) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Meta name -> (float32 offset after the header, shape), in file order (RoPE tables included)."""
    d, hd, vocab = header.dim, header.dim // header.n_heads, abs(header.vocab_size)
    kv = header.n_kv_heads * hd
    shapes = {
        "attention_norm": (d,),
        "attention.wq": (d, d),
        "attention.wk": (kv, d),
        "attention.wv": (kv, d),
        "attention.wo": (d, d),
        "ffn_norm": (d,),
        "feed_forward.w1": (header.hidden_dim, d),
        "feed_forward.w2": (d, header.hidden_dim),
        "feed_forward.w3": (header.hidden_dim, d),
    }
    entries: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (vocab, d))]
    for kind in _PER_LAYER:
        entries += [(f"layers.{i}.{kind}.weight", shapes[kind]) for i in range(header.n_layers)]
    entries += [("norm.weight", (d,)), ("rope.cos", (header.seq_len, hd // 2)), ("rope.sin", (header.seq_len, hd // 2))]
    if not header.shared_classifier:
        entries.append(("output.weight", (vocab, d)))
    out, offset = {}, 0
    for name, shape in entries:
        out[name] = (offset, shape)
        offset += int(np.prod(shape))
    out["<end>"] = (offset, ())
    return out


def expected_bytes(header: Header) -> int:
    return HEADER.size + 4 * layout(header)["<end>"][0]


def checkpoint_file(path: Path) -> Path | None:
    """The one v0 checkpoint in a directory (a `.bin` whose size matches its header)."""
    if not path.is_dir():
        return None
    found = []
    for file in sorted(path.glob("*.bin")):
        header = read_header(file)
        if (header is not None and file.stat().st_size == expected_bytes(header)) or _is_newer_version(file):
            found.append(file)
    return found[0] if len(found) == 1 else None


def _is_newer_version(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == struct.pack("<I", MAGIC_V1)


def detect(path: Path) -> bool:
    return checkpoint_file(path) is not None


def args_from_header(header: Header, file: Path) -> ModelArgs:
    multiple_of, multiplier = ffn_recipe_for(header.dim, header.hidden_dim, file)
    return ModelArgs(
        dim=header.dim,
        n_layers=header.n_layers,
        n_heads=header.n_heads,
        n_kv_heads=header.n_kv_heads,
        vocab_size=abs(header.vocab_size),
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=header.seq_len,
    ).validate(str(file))


@dataclass
class Llama2cReader(ReaderBase):
    """A directory holding one llama2.c v0 `.bin`, seen in the canonical Meta layout."""

    format: str = "llama2c"
    header: Header | None = None

    @classmethod
    def open(cls, path: Path) -> Llama2cReader:
        file = checkpoint_file(path)
        if file is None:
            raise CheckpointError(f"{path}: no llama2.c checkpoint (.bin whose size matches its header) found")
        if _is_newer_version(file):
            raise CheckpointError(
                f"{file}: a llama2.c version 1/2 export; only the legacy (version 0) format "
                "is supported: re-export it with `export.py --version 0`"
            )
        header = read_header(file)
        assert header is not None
        args = args_from_header(header, file)
        infos = [TensorInfo(name, shape, "fp32") for name, shape in expected_shapes(args).items()]
        check_against_args(infos, args, str(file), "the llama2.c header")
        return cls(path=path, args=args, files=[file], infos=order_like(infos, args), header=header)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        assert self.header is not None
        places = layout(self.header)
        data = np.memmap(self.files[0], dtype="<f4", mode="r", offset=HEADER.size, shape=(places["<end>"][0],))
        for info in self.infos:
            source = info.name if info.name in places else "tok_embeddings.weight"  # tied output head
            offset, shape = places[source]
            n = int(np.prod(shape))
            yield info.name, torch.from_numpy(np.array(data[offset : offset + n])).reshape(shape)
        del data


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables exactly as llama2.c's model.py precompute_freqs_cis computes them."""
    import torch

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(seq_len, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.cos(freqs), torch.sin(freqs)


def export_v0(reader: object, out: Path) -> Path:
    """Write any checkpoint as a llama2.c v0 `.bin` (fp32), streaming: each tensor goes to its offset.

    The file is laid out for an untied head first; when the head turns out to equal the
    embedding (tied, as llama2.c trains), the tail is cut off and vocab_size stored positive.
    """
    import torch

    args: ModelArgs = reader.args  # type: ignore[attr-defined]
    untied = Header(
        args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.kv_heads, -args.vocab_size, args.max_seq_len
    )
    places = layout(untied)
    embedding: torch.Tensor | None = None
    shared = False
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:

            def put(name: str, tensor: torch.Tensor) -> None:
                offset, shape = places[name]
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(f"{name}: shape {list(tensor.shape)} where llama2.c expects {list(shape)}")
                f.seek(HEADER.size + 4 * offset)
                f.write(tensor.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())

            for name, tensor in reader.iter_tensors():  # type: ignore[attr-defined]
                if name == "tok_embeddings.weight":
                    embedding = tensor
                if name == "output.weight":
                    shared = embedding is not None and torch.equal(tensor.float(), embedding.float())
                put(name, tensor)
            cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
            put("rope.cos", cos)
            put("rope.sin", sin)
            header = Header(**{**untied.__dict__, "vocab_size": args.vocab_size}) if shared else untied
            f.truncate(expected_bytes(header))
            f.seek(0)
            f.write(HEADER.pack(*header.__dict__.values()))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
