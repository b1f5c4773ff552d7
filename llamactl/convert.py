"""Convert a checkpoint between formats, shard layouts and quantization schemes, atomically.

`plan_convert` validates everything and lists what will be written without touching the
disk; `run_convert` writes into a temporary directory beside DST and renames it into place
only when complete, so a failure or Ctrl-C never leaves a half-written DST. Quantizing is
converting with a scheme: the source is read through a `QuantizedView` and written by a
format that stores that scheme (bitsandbytes: `bnb`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llamactl.atomic import FileId, atomic_directory, atomic_file, check_destination
from llamactl.checkpoint import (
    CheckpointFormat,
    CheckpointReader,
    WriteOptions,
    WritePlan,
    formats,
    get_format,
    open_checkpoint,
)
from llamactl.checkpoint.base import FiniteCheck, main_dtype
from llamactl.checkpoint.quantized import DequantizedView, QuantizedView
from llamactl.dtypes import FLOAT_NAMES, parse_float_dtype
from llamactl.errors import CheckpointError, UsageError
from llamactl.quantize import QuantSpec


@dataclass
class ConvertPlan:
    """Everything a conversion will do, computed before any byte is written."""

    reader: CheckpointReader
    target: CheckpointFormat
    dst: Path
    files: WritePlan
    options: WriteOptions = field(default_factory=WriteOptions)
    replaces: FileId | None = None  # the existing DST --force may replace, as checked here

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data the writer produces (Meta replicates norms into every shard)."""
        return sum(info.nbytes for _, infos in self.files for info in infos)

    @property
    def tensor_count(self) -> int:
        return len(self.reader.tensor_infos())

    @property
    def quantized(self) -> QuantizedView | None:
        """The quantizing view the writer reads through (None when not quantizing)."""
        return self.reader if isinstance(self.reader, QuantizedView) else None

    @property
    def source(self) -> CheckpointReader:
        """The checkpoint as stored (under a quantizing view, its original)."""
        return self.quantized.source if self.quantized is not None else self.reader


def format_for(quant: QuantSpec) -> CheckpointFormat:
    """The first registered format that stores `quant`'s method (bitsandbytes -> bnb)."""
    for fmt in formats().values():
        if quant.method in fmt.schemes and fmt.write is not None:
            return fmt
    raise UsageError(f"no registered checkpoint format stores {quant.method} ({quant.scheme}) weights")


def plan_convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str | None = None,
    *,
    dtype: str | None = None,
    shards: int | None = None,
    max_shard_bytes: int | None = None,
    force: bool = False,
    quant: QuantSpec | None = None,
    skip: Sequence[str] = (),
    device: str | None = None,
    gguf_type: str | None = None,
) -> ConvertPlan:
    """Open SRC, validate the request and return the plan (nothing is written).

    `to` defaults to the format that stores `quant` when quantizing; `skip` (glob patterns)
    leaves matching block projections unquantized; `gguf_type` (q8_0, q4_0) quantizes the
    block projections of a GGUF output. A format with a `file_suffix` writes DST as one file.
    """
    if to is None and quant is None:
        raise UsageError("give a target format (hf, meta, ...) or a quantization scheme")
    target = get_format(to) if to is not None else format_for(quant)  # type: ignore[arg-type]
    if target.plan is None or target.write is None:
        raise UsageError(f"format {target.name!r} cannot be written")
    if shards is not None and target.name != "meta":
        raise UsageError("shards apply to the meta format (model-parallel shards); use a max shard size for hf")
    if gguf_type is not None and target.name != "gguf":
        raise UsageError("a gguf quantization type applies to the gguf format only")
    dst_path = Path(dst).expanduser()
    if target.file_suffix is not None and not dst_path.name.lower().endswith(target.file_suffix):
        raise UsageError(f"{dst_path}: format {target.name!r} writes one file; name it *{target.file_suffix}")
    reader: CheckpointReader = open_checkpoint(src)
    if quant is not None:
        if quant.method not in target.schemes:
            raise UsageError(f"format {target.name!r} cannot store {quant.scheme} weights")
        reader = QuantizedView(reader, quant, skip, device)
    elif skip:
        raise UsageError("skip patterns apply when quantizing")
    elif reader.quant is not None and reader.quant.method not in target.schemes:
        # A quantized source into a format of plain weights: restore the weights (lossy once,
        # already paid when the source was quantized) at --dtype, else the source's own float type.
        plain = main_dtype(reader.tensor_infos())
        reader = DequantizedView(reader, parse_float_dtype(dtype) or (plain if plain in FLOAT_NAMES else "fp32"))
    _check_tokenizer(reader)
    replaces = check_destination(reader.path, dst_path, force, file=target.file_suffix is not None)
    options = WriteOptions(dtype=parse_float_dtype(dtype), shards=shards, gguf_type=gguf_type)
    if max_shard_bytes is not None:
        options.max_shard_bytes = max_shard_bytes
    files = target.plan(reader, options)
    if target.file_suffix is not None:  # the one file is DST itself
        files = [(dst_path.name, infos) for _, infos in files]
    return ConvertPlan(reader, target, dst_path, files, options, replaces)


def _check_tokenizer(reader: CheckpointReader) -> None:
    """The tokenizer carried over must fit the embedding, or every id would mean something else
    (generation refuses such a pair; refusing here keeps a broken model from being written)."""
    if reader.tokenizer_path is None:
        return
    from llamactl.tokenizer import load_tokenizer

    pieces = load_tokenizer(reader.tokenizer_path).vocab_size
    if pieces != reader.args.vocab_size:
        raise CheckpointError(
            f"{reader.tokenizer_path}: has {pieces} pieces but the embedding has {reader.args.vocab_size} rows; "
            "the tokenizer does not belong to these weights"
        )


def run_convert(
    plan: ConvertPlan,
    on_tensor: Callable[[str, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> Path:
    """Write the plan into a temporary directory (or file) beside DST, then move it into place.

    `on_warning` hears about tensors holding NaN or Inf (written anyway: they may be intended)
    and about staging entries of dead runs removed beside DST. DST is replaced only when it is
    the one the plan checked (--force); one that appeared meanwhile fails the run.
    """
    assert plan.target.write is not None
    plan.options.on_tensor = on_tensor
    # Writers need torch (and Meta's skeleton writer its fake tensors): import them before the
    # temporary directory exists. Those imports take seconds on a cold start, and a Ctrl-C
    # landing inside C-extension initialisation makes CPython re-raise SIGINT at exit (-2
    # instead of our 130) and can skip the cleanup below.
    import torch._subclasses.fake_tensor  # noqa: F401

    reader = FiniteCheck(plan.reader, on_warning) if on_warning is not None else plan.reader
    atomic = atomic_file if plan.target.file_suffix is not None else atomic_directory
    with atomic(plan.dst, plan.replaces, on_warning) as tmp:
        plan.target.write(tmp, reader, plan.files, plan.options)
    return plan.dst


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str | None = None, **kwargs: object) -> Path:
    """Library one-call form: plan and run (see plan_convert for the options)."""
    plan = plan_convert(src, dst, to, **kwargs)  # type: ignore[arg-type]
    return run_convert(plan)
