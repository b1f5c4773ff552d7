"""Meta's layout: params.json + consolidated.NN.pth model-parallel shards.

Opening reads each shard's index without torch and checks every record (`checkpoint.pth`);
reading copies one tensor's pieces at a time from their checked extents and merges them, so
peak memory stays near one tensor, not the model.
Writing first saves a skeleton of each shard (`torch.serialization.skip_data`: the zip with
every record in place but no bytes), then streams each tensor's bytes into its record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl import dtypes
from llamactl.checkpoint.base import (
    TOKENIZER_FILE,
    TOKENIZER_JSON,
    CheckpointReader,
    ReaderBase,
    check_against_args,
    read_model_meta,
    tensor_bytes,
    trained_context,
    write_model_meta,
)
from llamactl.checkpoint.formats import CheckpointFormat, WriteOptions, WritePlan
from llamactl.checkpoint.pth import Record, read_records
from llamactl.checkpoint.sharding import check_splittable, merge_shards, shard_shape, split_tensor
from llamactl.checkpoint.tensor_io import Files
from llamactl.config import ModelArgs, args_from_params, read_json
from llamactl.errors import CheckpointError
from llamactl.layout import META_IGNORED, TensorInfo, split_dim
from llamactl.plugins import hookimpl

if TYPE_CHECKING:
    import torch

PARAMS_FILE = "params.json"
_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


def detect_meta(path: Path) -> bool:
    """params.json or consolidated.NN.pth, and no config.json (a directory with both is read as HF)."""
    if (path / "config.json").is_file():
        return False
    return (path / PARAMS_FILE).is_file() or any(_SHARD.match(p.name) for p in path.glob("consolidated.*.pth"))


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth ... in order; refuses gaps in the numbering."""
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _SHARD.match(p.name)))
    for _, file in found:
        if not file.is_file():  # a FIFO or a link to a device would block or never end
            raise CheckpointError(f"{file}: not a regular file")
    if not found:
        raise CheckpointError(f"{path}: no consolidated.NN.pth shards found beside params.json")
    for expected, (index, file) in enumerate(found):
        if index != expected:
            raise CheckpointError(f"{file}: shard numbering has a gap (expected consolidated.{expected:02d}.pth)")
    return [p for _, p in found]


@dataclass
class MetaReader(ReaderBase):
    """A Meta checkpoint directory; MP shards are merged on the fly."""

    format: str = "meta"
    records: list[dict[str, Record]] = field(default_factory=list)  # per shard: name -> where its bytes are

    @classmethod
    def open(cls, path: Path) -> MetaReader:
        params_path = path / PARAMS_FILE
        params = read_json(params_path)
        args = args_from_params(params, params_path)
        # Meta's params.json never says the trained context; llamactl records it beside it.
        recorded = read_model_meta(path).get("trained_context")
        if recorded is not None and "max_seq_len" not in params:
            args = dataclasses.replace(args, max_seq_len=recorded)
        known = recorded is not None or "max_seq_len" in params
        files = shard_files(path)
        records = [read_records(f, META_IGNORED) for f in files]
        infos = _merged_infos(files, [{n: r.info for n, r in shard.items()} for shard in records])
        if args.vocab_size <= 0:
            embedding = next((i for i in infos if i.name == "tok_embeddings.weight"), None)
            if embedding is None:
                raise CheckpointError(f"{files[0]}: tensor tok_embeddings.weight is missing")
            args = args.with_vocab_size(embedding.shape[0])
        check_against_args(infos, args, f"{path} ({len(files)} shard{'s' * (len(files) > 1)})", PARAMS_FILE)
        return cls(path=path, args=args, files=files, infos=infos, records=records, context_known=known)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        with Files() as files:
            for info in self.infos:
                yield (
                    info.name,
                    merge_shards(info.name, [files.read(s[info.name].extent, info.name) for s in self.records]),
                )


def _merged_infos(files: Sequence[Path], shards: Sequence[dict[str, TensorInfo]]) -> list[TensorInfo]:
    """Full shapes from the shard pieces, checking that the shards agree with each other."""
    infos = []
    for name, first in shards[0].items():
        dim = split_dim(name)
        shape = list(first.shape)
        for file, shard in zip(files[1:], shards[1:]):
            piece = shard.get(name)
            if piece is None:
                raise CheckpointError(f"{file}: tensor {name} is missing (present in {files[0].name})")
            if piece.dtype != first.dtype or len(piece.shape) != len(first.shape):
                raise CheckpointError(f"{file}: tensor {name} disagrees with {files[0].name} in dtype or rank")
            for d, (a, b) in enumerate(zip(piece.shape, first.shape)):
                if d != dim and a != b:
                    raise CheckpointError(
                        f"{file}: tensor {name} has shape {list(piece.shape)}, {files[0].name} has {list(first.shape)}"
                    )
            if dim is not None:
                shape[dim] += piece.shape[dim]
        infos.append(TensorInfo(name, tuple(shape), first.dtype))
    for file, shard in zip(files[1:], shards[1:]):
        extra = set(shard) - set(shards[0])
        if extra:
            raise CheckpointError(f"{file}: tensor {sorted(extra)[0]} is not in {files[0].name}")
    return infos


def _layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Names grouped by transformer layer; embeddings, norm and output each stand alone."""
    groups: dict[str, list[str]] = {}
    for name in names:
        key = ".".join(name.split(".")[:2]) if name.startswith("layers.") else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# ---------------------------------------------------------------- writing


def meta_params(args: ModelArgs) -> dict[str, object]:
    """params.json as Meta's own loader accepts it.

    Meta's `Llama.build` passes max_seq_len itself and its ModelArgs has no rope_theta, so
    both are left out unless rope_theta differs from the default (Code Llama's files).
    """
    params = args.to_params()
    params.pop("max_seq_len", None)
    if params.get("rope_theta") == 10000.0:
        params.pop("rope_theta")
    return params


def plan_meta(infos: Sequence[TensorInfo], shards: int, dtype: str | None) -> list[tuple[str, list[TensorInfo]]]:
    """(file name, tensors with shard shapes) for each consolidated.NN.pth."""
    pieces = [TensorInfo(i.name, shard_shape(i.name, i.shape, shards), dtype or i.dtype) for i in infos]
    return [(f"consolidated.{m:02d}.pth", pieces) for m in range(shards)]


def _record_offsets(file: Path, count: int) -> list[int]:
    """Byte offsets of data/0 .. data/{count-1} in a torch zip checkpoint."""
    offsets: dict[int, int] = {}
    with zipfile.ZipFile(file) as archive, open(file, "rb") as raw:
        for entry in archive.infolist():
            match = re.search(r"/data/(\d+)$", entry.filename)
            if not match:
                continue
            raw.seek(entry.header_offset)
            header = raw.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offsets[int(match.group(1))] = entry.header_offset + 30 + name_len + extra_len
    if sorted(offsets) != list(range(count)):
        raise AssertionError(f"{file}: skeleton has records {sorted(offsets)}, expected 0..{count - 1}")
    return [offsets[i] for i in range(count)]


def _write_skeleton(file: Path, infos: Sequence[TensorInfo]) -> dict[str, int]:
    """Save the shard with every storage in place but no bytes; return each tensor's offset."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        skeleton = {i.name: torch.empty(i.shape, dtype=dtypes.to_torch(i.dtype)) for i in infos}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, file)
    # torch.save numbers storages in pickling order, which is the dict's order.
    offsets = _record_offsets(file, len(infos))
    return {info.name: offset for info, offset in zip(infos, offsets)}


def write_meta(
    out_dir: Path,
    plan: Sequence[tuple[str, Sequence[TensorInfo]]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    on_tensor: Callable[[str, int], None] | None = None,
) -> None:
    """Stream tensors into the planned consolidated.NN.pth files in out_dir."""
    shards = len(plan)
    files = [out_dir / name for name, _ in plan]
    offsets = [_write_skeleton(f, infos) for f, (_, infos) in zip(files, plan)]
    wanted = {i.name: i for i in plan[0][1]}
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(f, "r+b")) for f in files]
        for name, tensor in tensors:
            info = wanted.pop(name)
            written = 0
            out = tensor.to(dtypes.to_torch(info.dtype))
            for handle, offs, piece in zip(handles, offsets, split_tensor(name, out, shards)):
                assert tuple(piece.shape) == info.shape, (name, piece.shape, info.shape)
                handle.seek(offs[name])
                written += handle.write(tensor_bytes(piece))
            if on_tensor:
                on_tensor(name, written)  # replicated tensors count once per shard, as in the plan
    if wanted:
        raise CheckpointError(f"source ended before tensor {next(iter(wanted))} was written")


def plan_format(reader: CheckpointReader, options: WriteOptions) -> WritePlan:
    """Meta output: keep the source's model-parallel count unless --shards says otherwise."""
    shards = options.shards or (len(reader.files) if reader.format == "meta" else 1)
    infos = reader.tensor_infos()
    check_splittable(reader.args, infos, shards)
    return plan_meta(infos, shards, options.dtype)


def write_format(out_dir: Path, reader: CheckpointReader, plan: WritePlan, options: WriteOptions) -> None:
    write_meta(out_dir, plan, reader.iter_tensors(), options.on_tensor)
    (out_dir / PARAMS_FILE).write_text(json.dumps(meta_params(reader.args), indent=2) + "\n")
    context = trained_context(reader)
    if context is not None:  # params.json cannot hold it (Meta's loader would refuse the key)
        write_model_meta(out_dir, trained_context=context)
    tokenizer = reader.tokenizer_path
    if tokenizer is not None and tokenizer.suffix.lower() == ".json":  # tokenizers' file and its config
        shutil.copyfile(tokenizer, out_dir / TOKENIZER_JSON)
        if (tokenizer.parent / "tokenizer_config.json").is_file():
            shutil.copyfile(tokenizer.parent / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    elif tokenizer is not None:
        shutil.copyfile(tokenizer, out_dir / TOKENIZER_FILE)


FORMAT = CheckpointFormat(
    "meta",
    detect_meta,
    MetaReader.open,
    plan_format,
    write_format,
    "Meta: params.json + consolidated.NN.pth model-parallel shards",
)


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(FORMAT)
