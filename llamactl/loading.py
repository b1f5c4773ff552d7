"""Build a ready-to-run Transformer from a checkpoint, streaming weights onto the device.

Every entry a reader yields lands on the device once: plain tensors are cast and assigned
into a model built on the meta device (no second copy in RAM), and quantized block
projections become their backend's module in place of the nn.Linear. Quantize-on-load is the
same path through a `QuantizedView`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from llamactl import dtypes
from llamactl.checkpoint import CheckpointReader, open_checkpoint
from llamactl.checkpoint.base import trained_context
from llamactl.checkpoint.quantized import QuantizedView
from llamactl.config import ModelArgs
from llamactl.devices import resolve
from llamactl.engine import DecodeStep, EagerStep, choose_step
from llamactl.engine import tp as parallel
from llamactl.engine.memory import weight_bytes
from llamactl.errors import CheckpointError, LlamactlError
from llamactl.layout import is_quantizable, module_path, rotary_heads
from llamactl.model import Attention, FeedForward, Transformer
from llamactl.quantize import QuantizedTensor, QuantSpec, backend, fits, matches_skip
from llamactl.tokenizer import Tokenizer, open_tokenizer


@dataclass
class LoadedModel:
    """A model ready to run, where it came from, and the decode step chosen for it (`step`).

    Tensor parallel (`load_model(tp=N)`): `group` is rank 0's place in the run and
    `rank_weight_bytes` what each rank holds; `close()` (or leaving a `with` block) ends the
    other ranks. A plain model needs neither.
    """

    model: Transformer
    args: ModelArgs
    reader: CheckpointReader
    device: torch.device
    dtype: torch.dtype
    step: DecodeStep | None = None
    group: parallel.Group | None = None
    rank_weight_bytes: list[int] = field(default_factory=list)
    trained_context: int | None = None  # what the checkpoint says it was trained at (None: unknown)

    @property
    def tp(self) -> int:
        return self.group.world if self.group is not None else 1

    def close(self, code: int = 0) -> None:
        """End the other tensor-parallel ranks (they exit with `code`); nothing for a plain model."""
        if self.group is not None:
            self.group.close(code)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        from llamactl.errors import Terminated

        if kind is None:
            code = 0
        elif issubclass(kind, Terminated):
            code = 143
        elif issubclass(kind, KeyboardInterrupt):
            code = 130
        else:  # typer.Exit and LlamactlError carry their own; anything else is a failure
            code = getattr(exc, "exit_code", 1) if isinstance(getattr(exc, "exit_code", 1), int) else 1
        self.close(code)

    def watch_context(self, on_pass: Callable[[int, int], None]) -> None:
        """Call `on_pass(position, trained_context)` once, when a position at or past the trained
        context is first run (a prompt in prefill or a decoded token); nothing when it is unknown
        or the context in use does not exceed it.

        Positions past it run on rotations the model never saw: output degrades, silently.
        """
        limit = self.trained_context
        if limit is None or self.args.max_seq_len <= limit:
            return
        fired = False

        def check(end: int) -> None:
            nonlocal fired
            if not fired and end > limit:
                fired = True
                on_pass(end - 1, limit)

        def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            tokens, start = args[0], args[1] if len(args) > 1 else 0
            if isinstance(start, int):  # a graphed step passes a device tensor: checked below instead
                check(start + tokens.shape[1])

        self.model.register_forward_pre_hook(pre_hook)
        if self.step is not None and type(self.step) is not EagerStep:  # steps that may bypass forward()
            self.step = _WatchedStep(self.step, check)


class _WatchedStep:
    """A decode step that reports each position it runs (a replayed CUDA graph, or the fused CPU
    step's own walk through the layers, runs no forward hooks)."""

    def __init__(self, inner: DecodeStep, check: Callable[[int], None]) -> None:
        self.inner, self.model, self.check = inner, inner.model, check

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.check(pos + tokens.shape[1])
        return self.inner(tokens, pos)


def build_model(
    reader: CheckpointReader,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: int | None = None,
    group: parallel.Group | None = None,
) -> Transformer:
    """Construct on the meta device, then assign streamed tensors: no second copy in RAM.

    `dtype` is that of every unquantized tensor (embeddings, norms, head) and of activations.
    With a tensor-parallel `group`, `reader` yields this rank's shard (a RankView) and the
    model is that rank's ShardedTransformer.
    """
    args = dataclasses.replace(reader.args, max_seq_len=max_seq_len or reader.args.max_seq_len)
    with torch.device("meta"):
        model = Transformer(args) if group is None else parallel.ShardedTransformer(args, group)
    state: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    joiner = _Joiner(model, device)
    for name, entry in reader.iter_tensors():
        if isinstance(entry, QuantizedTensor):
            if not is_quantizable(name):
                raise CheckpointError(f"{reader.path}: quantized tensor {name} is not a block projection")
            joiner.add(name, entry)
            replaced.add(module_path(name))
        else:
            state[name] = entry.to(device=device, dtype=dtype)
    joiner.finish()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if module_path(m) not in replaced and not m.startswith(tuple(replaced))]
    if missing or unexpected:
        raise CheckpointError(f"{reader.path}: tensor {(missing or unexpected)[0]} is missing or unexpected")
    model.reset_rope(args.max_seq_len)
    return model.eval()


class _Joiner:
    """Installs quantized projections, joining those of one input (wq|wk|wv, w1|w3) into one
    kernel where the backend can: one call instead of three, and one cast of the activations
    (110M q8 decode 85 -> 49 kernel calls per token). A group's parts are held until the last
    arrives, so at most one layer's quantized bytes wait; a group that never completes (a skip
    list kept a part unquantized) is installed part by part at the end."""

    def __init__(self, model: Transformer, device: torch.device) -> None:
        self.model, self.device = model, device
        self.pending: dict[str, dict[str, QuantizedTensor]] = {}  # "layers.0.attention" -> {"wq": ...}

    def add(self, name: str, tensor: QuantizedTensor) -> None:
        parent_path, _, part = module_path(name).rpartition(".")
        parent = self.model.get_submodule(parent_path)
        if not isinstance(parent, (Attention, FeedForward)) or part not in parent.PARTS:
            self._one(module_path(name), tensor)
            return
        group = self.pending.setdefault(parent_path, {})
        group[part] = tensor
        if len(group) < len(parent.PARTS):
            return
        del self.pending[parent_path]
        tensors = [group[p] for p in parent.PARTS]
        joined = backend(tensor.spec).joined_linear(tensors, self.device)
        if joined is None:
            for p in parent.PARTS:
                self._one(f"{parent_path}.{p}", group[p])
        else:
            parent.install_fused(joined)

    def finish(self) -> None:
        for parent_path, group in self.pending.items():
            for part, tensor in group.items():
                self._one(f"{parent_path}.{part}", tensor)
        self.pending.clear()

    def _one(self, path: str, tensor: QuantizedTensor) -> None:
        self.model.set_submodule(path, backend(tensor.spec).linear(tensor, self.device))


def load_model(
    model: str | os.PathLike[str] | CheckpointReader,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    quant: QuantSpec | None = None,
    step: str = "auto",
    tp: int = 1,
) -> LoadedModel:
    """Open a checkpoint (name, path or an open reader) and load it for inference.

    `quant` quantizes the block projections on load, exactly as `llamactl quantize` would,
    without writing anything; weights are quantized from the checkpoint's own precision.
    `step` is the decode step chosen for the loaded model, once its weights are in place and
    fused (llamactl.engine.choose_step: "auto", "eager", "cuda-graph", "compiled").

    `tp=N > 1`: tensor parallel over N ranks (llamactl.engine.tp). Started from a plain
    process, this one becomes rank 0 and starts ranks 1..N-1 on this machine; under torchrun
    it joins torchrun's ranks, and on every rank but 0 this call serves rank 0 until it is
    done and then ends the process (os._exit, streams flushed), so the caller's code runs on
    rank 0 only.
    Close the result (`with load_model(...) as loaded:`) to end the other ranks.
    """
    reader = open_checkpoint(model) if isinstance(model, (str, os.PathLike)) else model  # opened once
    placement = resolve(device, dtype if dtype is not None else native_dtype(quant or reader.quant))
    if tp != 1:  # a plain load stays plain, under torchrun too (every rank its own whole model)
        return _load_parallel(reader, placement.device, placement.dtype, max_seq_len, quant, step, tp)
    source = QuantizedView(reader, quant, device=placement.device) if quant is not None else reader
    net = build_model(source, placement.device, placement.dtype, max_seq_len).fuse_projections()
    quantize_head(net, quant or reader.quant, placement.device)
    loaded = LoadedModel(net, net.args, reader, placement.device, placement.dtype, choose_step(net, step))
    loaded.trained_context = trained_context(reader)
    return loaded


_SPEC_ENV = "LLAMACTL_TP_SPEC"  # how a leader tells the ranks it starts what to load


def _load_parallel(
    reader: CheckpointReader,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: int | None,
    quant: QuantSpec | None,
    step: str,
    tp: int,
) -> LoadedModel:
    """Every rank loads its own shard; rank 0 returns, the others follow it and exit."""
    from llamactl.checkpoint.rank_view import RankView

    parallel.check_divisible(reader.args, tp)  # before any process is started
    RankView(reader, 0, tp)  # refuses a checkpoint stored quantized, before any process is started
    if parallel.distributed_env() is not None:
        group = parallel.join(tp, device)
    else:
        spec = {
            "path": str(reader.path),
            "device": device.type,
            "dtype": dtypes.name_of(dtype),
            "max_seq_len": max_seq_len,
            "quant": dataclasses.asdict(quant) if quant is not None else None,
        }
        group = parallel.start(tp, device, parallel.worker_command(), {_SPEC_ENV: json.dumps(spec)})
    try:
        view = RankView(reader, group.rank, tp)
        source = QuantizedView(view, quant, device=group.device, row_split=tp) if quant is not None else view
        net = build_model(source, group.device, dtype, max_seq_len, group).fuse_projections()
        assert isinstance(net, parallel.ShardedTransformer)
        quantize_head(net, quant, group.device)
        net.connect()
        held = [row[0] for row in group.gather_ints([weight_bytes(net)])]  # also: every rank loaded
        chosen = choose_step(net, step) if group.leads else None
    except BaseException:
        if group.leads:
            group.abort()
        raise
    if not group.leads:
        code = parallel.follow(net)
        group.closed = True
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
        # The rank ends as serve_rank's do, streams flushed, without Python's teardown
        # (parallel.ended_a_group says why).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    loaded = LoadedModel(net, net.args, reader, group.device, dtype, chosen, group, held)
    loaded.trained_context = trained_context(reader)
    return loaded


def serve_rank() -> None:
    """Entry point of a rank a leader started (`parallel.worker_command`): load, follow, exit.

    Its stderr goes to a log the leader reads: the one line it prints on a failure is what
    the leader reports.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the leader decides when a turn is cancelled
    rank = os.environ.get("RANK", "?")
    try:
        spec = json.loads(os.environ[_SPEC_ENV])
        from llamactl.quantize import QuantSpec

        quant = QuantSpec(**spec["quant"]) if spec["quant"] else None
        load_model(
            spec["path"],
            device=spec["device"],
            dtype=spec["dtype"],
            max_seq_len=spec["max_seq_len"],
            quant=quant,
            tp=int(os.environ["WORLD_SIZE"]),
        )
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"tensor-parallel rank {rank} failed: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def native_dtype(quant: QuantSpec | None) -> str | None:
    """The model dtype a native (q8 / q4) scheme implies when none is asked for: its compute dtype.

    On a CPU the default is fp32, which would leave embeddings, norms and the output head (a
    fifth of a small model's bytes) in fp32 around bf16 kernels; the quantized path never
    computes in fp32 unless asked.
    """
    return quant.compute_dtype if quant is not None and quant.method == "native" else None


HEAD_SCHEME = "q8"


def quantize_head(model: Transformer, spec: QuantSpec | None, device: torch.device | str) -> bool:
    """Run the output head on a q8 kernel when the block projections are native q8 / q4.

    A q4 decode step of a 110M-shaped model read as many bytes for the bf16 head (vocab x dim)
    as for all 84 block projections together; llama.cpp's quantizer keeps the head at 6-8 bits
    too (Q6_K for Q4_0 files, Q8_0 for Q8_0). Only the loaded model changes: a checkpoint
    stores the head as it was, and tied embeddings keep their float table for the lookup.
    A tensor-parallel rank's head (its vocab rows) is quantized before `connect()` hooks it;
    q8 blocks run along the input, so the shards compose to the whole head's blocks exactly.
    False (nothing done) for other schemes or a head q8 cannot store.

    A quantized head (this one, or a checkpoint's own) hands back its logits in fp32 where it
    has an `out_dtype` to set (NativeLinear): the model returns fp32 logits in any case.
    """
    done = _quantize_head(model, spec, device)
    if hasattr(model.output, "out_dtype"):
        model.output.out_dtype = torch.float32
    return done


def _quantize_head(model: Transformer, spec: QuantSpec | None, device: torch.device | str) -> bool:
    if spec is None or spec.method != "native" or type(model.output) is not torch.nn.Linear:
        return False
    head = dataclasses.replace(spec, scheme=HEAD_SCHEME)
    weight = model.output.weight.data
    if not fits(head, tuple(weight.shape)):
        return False
    impl = backend(head)
    dev = torch.device(device)
    impl.prepare(dev)
    model.output = impl.linear(impl.quantize(weight, head, None, dev), dev)
    return True


def quantize_model(
    model: Transformer, spec: QuantSpec, device: torch.device | str | None = None, skip: Sequence[str] = ()
) -> int:
    """Replace the block projections of a loaded Transformer by quantized modules, in place.

    For models that exist only in memory (bench's random weights); the bytes are those
    `llamactl quantize` would write for the same weights. Returns the number replaced.
    """
    model.unfuse_projections()  # fused weights would bypass the quantized layers
    dev = torch.device(device) if device is not None else model.tok_embeddings.weight.device
    impl = backend(spec)
    impl.prepare(dev)
    count = 0
    joiner = _Joiner(model, dev)
    for name, param in list(model.named_parameters()):
        if not is_quantizable(name) or matches_skip(name, skip) or not fits(spec, tuple(param.shape)):
            continue
        joiner.add(name, impl.quantize(param.data, spec, rotary_heads(name, model.args), dev))
        count += 1
    joiner.finish()
    if not matches_skip("output.weight", skip):
        quantize_head(model, spec, dev)
    return count


def load_for_generation(
    model: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    ctx: int | None = None,
    quant: QuantSpec | None = None,
    tp: int = 1,
    step: str = "auto",
) -> tuple[LoadedModel, Tokenizer]:
    """Model and matching tokenizer; the checkpoint is opened once and the tokenizer is
    checked before any weight is read. `step`: the decode step kind (see load_model)."""
    if ctx is not None and ctx < 2:
        raise LlamactlError(f"context of {ctx} tokens: it must hold at least 2 tokens")
    reader = open_checkpoint(model)
    tok = open_tokenizer(tokenizer, reader.tokenizer_path, reader.path, reader.args.vocab_size)
    return load_model(reader, device=device, dtype=dtype, max_seq_len=ctx, quant=quant, tp=tp, step=step), tok
