"""The reader protocol every checkpoint format implements, and validation they share.

A reader presents any checkpoint in the canonical layout: Meta's tensor names, Meta's q/k
row order, model-parallel shards merged. Opening one reads metadata only (and imports no
torch); `iter_tensors` streams the weights one at a time. A block projection stored
quantized arrives as a `QuantizedTensor`, everything else as a torch.Tensor.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llamactl import jsonio
from llamactl.config import BOUNDS, ModelArgs
from llamactl.errors import CheckpointError, printable
from llamactl.layout import TensorInfo, expected_shapes

if TYPE_CHECKING:
    import torch

    from llamactl.quantize import QuantizedTensor, QuantSpec

    Entry = torch.Tensor | QuantizedTensor  # what iter_tensors yields for one canonical name

TOKENIZER_FILE = "tokenizer.model"
# What llamactl records about a model that its own files cannot say (a Meta params.json has
# no context length): {"trained_context": N}. Hidden, so hashing and `list` sizes skip it, and
# Meta's own loader never sees it.
MODEL_META_FILE = ".llamactl-model.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_JSON)  # the order a checkpoint's tokenizer is looked for


class CheckpointReader(Protocol):
    """A checkpoint seen in the canonical layout (Meta names and q/k layout, merged shards).

    `quant` is the scheme of the tensors that `tensor_infos` marks with a `scheme`
    (None when nothing is quantized).
    """

    format: str
    path: Path
    args: ModelArgs
    files: list[Path]
    tokenizer_path: Path | None
    quant: QuantSpec | None

    def tensor_infos(self) -> list[TensorInfo]:
        """Every tensor's canonical name, full (logical) shape and dtype, without reading data."""
        ...

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        """Yield (meta_name, tensor or QuantizedTensor) one at a time; never holds the whole model."""
        ...


@dataclass
class ReaderBase:
    """Fields shared by the built-in readers."""

    path: Path
    args: ModelArgs
    files: list[Path]
    infos: list[TensorInfo] = field(default_factory=list)
    quant: QuantSpec | None = None
    # False when args.max_seq_len is only the 4096 default (no context in the files).
    context_known: bool = True

    @property
    def tokenizer_path(self) -> Path | None:
        """tokenizer.model (SentencePiece: Llama 1/2, exact with Meta), else tokenizer.json."""
        for name in TOKENIZER_FILES:
            candidate = self.path / name
            if candidate.is_file():
                check_not_lfs_pointer(candidate)
                return candidate
        return None

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's own jinja chat template (chat_template.jinja or tokenizer_config.json)."""
        return read_chat_template(self.path)

    def tensor_infos(self) -> list[TensorInfo]:
        return list(self.infos)


def trained_context(reader: CheckpointReader) -> int | None:
    """The context the model was trained at, where its files say it (None: unknown).

    llama2.c headers, HF `max_position_embeddings` and GGUF `context_length` carry it; a Meta
    params.json does not, unless `import --ctx` or a conversion recorded it in MODEL_META_FILE.
    Readers without `context_known` (plugins) are taken at their word: args.max_seq_len.
    """
    return reader.args.max_seq_len if getattr(reader, "context_known", True) else None


def read_model_meta(directory: Path) -> dict[str, Any]:
    """MODEL_META_FILE of a model directory ({} when absent); a damaged one is an error naming it."""
    file = directory / MODEL_META_FILE
    if not file.is_file():
        return {}
    try:
        data = jsonio.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    ctx = data.get("trained_context")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or not 2 <= ctx <= BOUNDS["max_seq_len"]):
        raise CheckpointError(f"{file}: trained_context should be a token count, found {printable(repr(ctx))[:40]}")
    return data


def write_model_meta(directory: Path, **fields: Any) -> None:
    """Merge `fields` into MODEL_META_FILE (written whole, then renamed into place)."""
    data = read_model_meta(directory) | fields
    tmp = directory / f"{MODEL_META_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MODEL_META_FILE)


def output_chat_template(reader: CheckpointReader) -> str | None:
    """The chat template a converted checkpoint carries: the source's own, else Llama 2's for a
    `*chat*` checkpoint (Meta's downloads carry none), so transformers and llama.cpp use the right one."""
    from llamactl.templates.llama2 import HF_TEMPLATE

    own = getattr(reader, "chat_template", None)
    if isinstance(own, str) and own:
        return own
    return HF_TEMPLATE if "chat" in reader.path.name.lower() else None


def read_chat_template(directory: Path) -> str | None:
    """A directory's chat template as transformers finds it; None when it has none (or is unreadable)."""
    from llamactl.errors import TokenizerError
    from llamactl.tokenizer.hf import read_tokenizer_config

    if not directory.is_dir():
        return None
    try:
        return read_tokenizer_config(directory).chat_template
    except (TokenizerError, OSError, UnicodeDecodeError):
        return None


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def check_not_lfs_pointer(file: Path) -> None:
    """A file that is only a Git LFS pointer (a clone without `git lfs pull`) is no tokenizer or weight."""
    with open(file, "rb") as f:
        head = f.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        raise CheckpointError(f"{file}: is a Git LFS pointer, not the file itself (run `git lfs pull` in that clone)")


def check_against_args(infos: Sequence[TensorInfo], args: ModelArgs, where: str, config_name: str) -> None:
    """Every expected tensor present with the shape the config implies; nothing unknown.

    The tensor count is checked first, so a config claiming 10**9 layers fails at once
    instead of building a billion expected names.
    """
    per_layer = 9
    if args.n_layers * per_layer + 3 > 3 * max(len(infos), 1):
        raise CheckpointError(
            f"{where}: {config_name} says {args.n_layers} layers but the checkpoint holds only {len(infos)} tensors"
        )
    expected = expected_shapes(args)
    seen = {info.name: info for info in infos}
    for name, shape in expected.items():
        if name not in seen:
            raise CheckpointError(f"{where}: tensor {name} is missing (expected by {config_name})")
        if seen[name].shape != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(seen[name].shape)} but {config_name} implies {list(shape)}"
            )
    extra = sorted(set(seen) - set(expected))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]} for a {args.n_layers}-layer Llama ({len(extra)} unexpected)"
        )
    for info in infos:
        if info.scheme is None and info.dtype not in ("fp32", "fp16", "bf16", "fp64"):
            raise CheckpointError(f"{where}: tensor {info.name} has dtype {info.dtype}, expected a float type")


def order_like(infos: Sequence[TensorInfo], args: ModelArgs) -> list[TensorInfo]:
    """Infos in the canonical Meta order (embeddings, layers, norm, output)."""
    order = {name: i for i, name in enumerate(expected_shapes(args))}
    return sorted(infos, key=lambda info: order.get(info.name, len(order)))


def main_dtype(infos: Iterable[TensorInfo]) -> str:
    """The dtype most unquantized tensors have (a checkpoint's 'dtype'); 'unknown' when none."""
    counts = Counter(info.dtype for info in infos if info.scheme is None)
    return counts.most_common(1)[0][0] if counts else "unknown"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor (bf16 included, which numpy cannot hold)."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ReaderView:
    """A reader presenting another one (`self.source`) with some change; the rest is the source's.

    Subclasses say what `quant` is: the view's own scheme, or the source's.
    """

    source: CheckpointReader

    @property
    def format(self) -> str:
        return self.source.format

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def args(self) -> ModelArgs:
        return self.source.args

    @property
    def files(self) -> list[Path]:
        return self.source.files

    @property
    def tokenizer_path(self) -> Path | None:
        return self.source.tokenizer_path

    @property
    def chat_template(self) -> str | None:
        return getattr(self.source, "chat_template", None)

    def tensor_infos(self) -> list[TensorInfo]:
        return self.source.tensor_infos()

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        return self.source.iter_tensors()


def stream_tensors(reader: CheckpointReader) -> Iterator[tuple[str, Entry]]:
    """`reader.iter_tensors()` for a consumer that is done with each tensor before taking the next.

    A reader whose class defines `iter_transient` beside its `iter_tensors` (same tensors, but
    each may share memory with the next) can then reuse its buffers instead of mapping fresh
    memory for every tensor; writers stream through this. A subclass, proxy or instance that
    changes `iter_tensors` without defining its own `iter_transient` gets `iter_tensors`, never
    its parent's transient pass.
    """

    def owner(attr: str) -> type | None:
        return next((k for k in type(reader).__mro__ if attr in vars(k)), None)

    transient = owner("iter_transient")
    replaced = "iter_tensors" in getattr(reader, "__dict__", {})  # set on the instance: that one counts
    if transient is not None and transient is owner("iter_tensors") and not replaced:
        return reader.iter_transient()  # type: ignore[attr-defined, no-any-return]
    return reader.iter_tensors()


@dataclass
class FiniteCheck(ReaderView):
    """Reports (through `warn`) every float tensor holding NaN or Inf as it streams past.

    One min/max pass per tensor: both reductions propagate NaN and an Inf is its own extreme,
    so the pair is finite exactly when every element is; the pass reads the data once, at
    memory speed, without converting it or allocating a mask the size of the tensor.
    """

    source: CheckpointReader
    warn: Callable[[str], None]

    @property
    def quant(self) -> QuantSpec | None:
        return self.source.quant

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        return self._checked(self.source.iter_tensors())

    def iter_transient(self) -> Iterator[tuple[str, Entry]]:
        return self._checked(stream_tensors(self.source))

    def _checked(self, entries: Iterator[tuple[str, Entry]]) -> Iterator[tuple[str, Entry]]:
        for name, entry in entries:
            if not is_finite(entry):
                self.warn(f"{self.source.path}: tensor {name} holds NaN or Inf values")
            yield name, entry


def is_finite(entry: Entry) -> bool:
    """False for a float tensor with a NaN or Inf anywhere (anything else counts as finite)."""
    import torch

    if not isinstance(entry, torch.Tensor) or not entry.is_floating_point() or entry.numel() == 0:
        return True
    low, high = torch.aminmax(entry)
    return bool(torch.isfinite(low) and torch.isfinite(high))
