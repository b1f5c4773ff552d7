"""Tensor parallelism over torch.distributed: N ranks, each holding 1/N of every weight.

Sharding follows Meta's model.py, as `llamactl.layout` records it: column-parallel
projections (wq, wk, wv, w1, w3, output) keep 1/N of their output rows, row-parallel ones
(wo, w2) 1/N of their input columns and are followed by an all-reduce; each rank holds 1/N of
the heads and KV heads, hence 1/N of the KV cache. The embedding is Meta's ParallelEmbedding
(1/N of the embedding dim, then an all-gather) rather than replicated: that is how Meta's
MP=N shards store it, so a rank loads its own `consolidated.NN.pth` and nothing else, and
it keeps every rank at exactly 1/N (a replicated 70B embedding would be 1 GiB more per GPU).
Norms are replicated. Each rank fuses its own wq|wk|wv and w1|w3 slices after loading.

Who decides: rank 0 (the leader) runs the caller's code unchanged: sampling, the chat
session, the REPL. Every call that touches the sharded model (forward, setup_cache,
clear_cache) is first broadcast to the other ranks (followers), which replay it in a loop
(`follow`). So input is read on rank 0 only, only rank 0 prints, and the caches of every
rank always hold the same positions. SIGINT/SIGTERM on the leader are held until the step in
flight has finished on every rank, then raised: a cancelled turn leaves no rank halfway.

Launch: `start` spawns ranks 1..N-1 on this machine (rendezvous on 127.0.0.1, a free port);
under torchrun (RANK / WORLD_SIZE in the environment) `join` takes the ranks torchrun made.
A launched rank dies with its leader (PR_SET_PDEATHSIG) and a rank that dies ends the run
with one error line and exit 1 (`Launch.watch`). Backend: NCCL on CUDA (one GPU per rank,
cuda:LOCAL_RANK), gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llamactl.config import ModelArgs
from llamactl.engine.memory import weight_bytes
from llamactl.errors import LlamactlError, Terminated, UsageError
from llamactl.estimate import check_tp as check_divisible
from llamactl.layout import split_dim
from llamactl.model import Transformer

FAULT_ENV = "LLAMACTL_TP_FAULT"  # "RANK:POS": that follower raises at position POS (failure tests)
_TIMEOUT = timedelta(minutes=30)  # a collective waiting this long means a rank hung
_joined = False  # this process was a rank of a process group (see ended_a_group)
_FORWARD, _SETUP, _CLEAR, _EXIT, _STATS = 1, 2, 3, 4, 5
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class ParallelError(LlamactlError):
    """A tensor-parallel run failed: a rank died, or the ranks could not talk to each other."""


# ------------------------------------------------------------------ the process group


@dataclasses.dataclass
class CommStats:
    """Time spent in collectives on this rank (the all-reduce share of a decode step)."""

    seconds: float = 0.0
    calls: int = 0


@dataclasses.dataclass
class Launch:
    """Ranks 1..N-1 this process started, their stderr logs, and the watcher of their deaths."""

    workers: list[subprocess.Popen[bytes]]
    logs: Path  # a temporary directory: rank-R.log per worker
    threads: int  # the leader's torch threads before the ranks shared the cores (restored at the end)
    closing: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def watch(self) -> None:
        """Thread body: the first rank that exits on its own ends the run (one line, exit 1)."""
        while not self.closing:
            for rank, worker in enumerate(self.workers, start=1):
                if worker.poll() is not None and not self.closing:
                    self.die(rank)
            time.sleep(0.05)

    def why(self, rank: int) -> str:
        worker = self.workers[rank - 1]
        log = self.logs / f"rank-{rank}.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        said = [line for line in lines if line.startswith("tensor-parallel rank")]
        if said:
            return said[-1]
        code = worker.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
        return f"tensor-parallel rank {rank} {how}"

    def die(self, rank: int) -> None:
        """One error line naming the rank that failed, every other rank killed, exit 1."""
        if not self.lock.acquire(blocking=False):
            return
        self.closing = True
        message = self.why(rank)
        self.kill()
        sys.stdout.flush()
        print(f"llamactl: error: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    def kill(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(timeout=10)
        shutil.rmtree(self.logs, ignore_errors=True)

    def dead(self, within: float) -> int | None:
        """The first rank found exited within `within` seconds, else None."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for rank, worker in enumerate(self.workers, start=1):
                if worker.poll() is not None:
                    return rank
            time.sleep(0.05)
        return None


@dataclasses.dataclass
class Group:
    """This process's place in a tensor-parallel run."""

    rank: int
    world: int
    device: torch.device
    launch: Launch | None = None  # set on a leader that started its own ranks
    comm: CommStats = dataclasses.field(default_factory=CommStats)
    timing: bool = False  # synchronize around collectives so `comm` is exact (bench)
    closed: bool = False

    @property
    def leads(self) -> bool:
        return self.rank == 0

    # -- collectives, each translated into one clear error ------------------------------
    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Collectives in here: a broken peer becomes a ParallelError (or the watcher's line)."""
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            self.failed(exc)

    def failed(self, exc: BaseException) -> None:
        if self.launch is not None:
            rank = self.launch.dead(within=5.0)
            if rank is not None:
                self.launch.die(rank)  # does not return
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ParallelError(f"tensor-parallel rank {self.rank}: lost contact with the other ranks ({first})") from None

    def broadcast(self, tensor: torch.Tensor) -> None:
        with self.guard():
            dist.broadcast(tensor, src=0)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        t0 = self._tick()
        with self.guard():
            dist.all_reduce(tensor)
        self._tock(t0)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Pieces [..., n] of every rank joined on the last dim -> [..., N*n]."""
        t0 = self._tick()
        pieces = [torch.empty_like(tensor) for _ in range(self.world)]
        with self.guard():
            dist.all_gather(pieces, tensor.contiguous())
        self._tock(t0)
        return torch.cat(pieces, dim=-1)

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Small per-rank integers (memory figures) from every rank, rank order."""
        mine = torch.tensor(list(values), dtype=torch.long, device=self.device)
        pieces = [torch.empty_like(mine) for _ in range(self.world)]
        with self.guard():
            dist.all_gather(pieces, mine)
        return [p.tolist() for p in pieces]

    def barrier(self) -> None:
        self.gather_ints([0])  # a real collective: a dead peer fails it (gloo's barrier may not)

    def _tick(self) -> float:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _tock(self, t0: float) -> None:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.comm.seconds += time.perf_counter() - t0
        self.comm.calls += 1

    # -- commands from the leader ---------------------------------------------------------
    def send(self, *header: int) -> None:
        self.broadcast(torch.tensor([*header, *[0] * (6 - len(header))], dtype=torch.long, device=self.device))

    def receive(self) -> list[int]:
        header = torch.zeros(6, dtype=torch.long, device=self.device)
        self.broadcast(header)
        return header.tolist()

    def close(self, code: int = 0) -> None:
        """Leader: tell every rank to exit with `code`, then wait for the ranks it started."""
        if self.closed:
            return
        self.closed = True
        if self.launch is not None:
            self.launch.closing = True
        try:
            if self.leads and dist.is_initialized():
                with held_signals():
                    self.send(_EXIT, code)
        except (LlamactlError, KeyboardInterrupt):
            pass
        finally:
            with contextlib.suppress(Exception):
                if dist.is_initialized():
                    dist.destroy_process_group()
            if self.launch is not None:
                for worker in self.launch.workers:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        worker.wait(timeout=10)
                self.launch.kill()
                torch.set_num_threads(self.launch.threads)

    def abort(self) -> None:
        """Leader, on an error before the ranks are in step: kill what it started."""
        self.closed = True
        if self.launch is not None:
            self.launch.closing = True
            self.launch.kill()
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


def ended_a_group() -> bool:
    """Whether this process was a rank. Python's own teardown after a gloo group sometimes aborts
    in a C++ destructor ("terminate called without an active exception", SIGABRT: about 1
    torchrun run in 4 on a follower, 1 in 30 on rank 0), so such a process ends with os._exit
    once its work is done and its streams are flushed (the CLI's exit, loading's followers)."""
    return _joined


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: the kernel kills this rank when its leader dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun (or `start`) made this process a rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ParallelError(f"rank {local_rank} needs cuda:{local_rank}, but {torch.cuda.device_count()} GPU(s) exist")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _init(rank: int, world: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    global _joined
    _joined = True
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=_TIMEOUT, **kwargs)


def join(tp: int, device: torch.device) -> Group:
    """Become a rank of the run torchrun (or a leader's `start`) set up in the environment."""
    found = distributed_env()
    assert found is not None
    rank, world, local_rank = found
    if world != tp:
        raise UsageError(f"--tp {tp}, but this run has {world} ranks (torchrun --nproc-per-node); make them equal")
    rank_device = _rank_device(device, local_rank)
    _init(rank, world, rank_device)
    return Group(rank, world, rank_device)


def start(tp: int, device: torch.device, command: list[str], env: dict[str, str]) -> Group:
    """Leader: spawn ranks 1..tp-1 running `command` (with `env` added), then join them as rank 0."""
    port = str(_free_port())
    logs = Path(tempfile.mkdtemp(prefix="llamactl-tp-"))
    base = os.environ | env | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(tp)}
    threads = torch.get_num_threads()
    if device.type == "cpu":  # N ranks share the cores: each gets its part
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
        base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
        torch.set_num_threads(int(base["OMP_NUM_THREADS"]))
    workers = []
    for rank in range(1, tp):
        with open(logs / f"rank-{rank}.log", "wb") as log:
            workers.append(
                subprocess.Popen(
                    command,
                    env=base | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the leader only
                    preexec_fn=_die_with_parent,
                )
            )
    launch = Launch(workers, logs, threads)
    threading.Thread(target=launch.watch, name="llamactl-tp-watch", daemon=True).start()
    for key in ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"):
        if key in base:
            os.environ[key] = base[key]
    group = Group(0, tp, _rank_device(device, 0), launch)
    try:
        _init(0, tp, group.device)
    except BaseException:
        group.abort()
        raise
    return group


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise them (main thread only).

    A collective cut short on one rank would leave the others waiting in it forever; held,
    Ctrl-C lands between steps, where every rank is in the same place.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        caught.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if signal.SIGTERM in caught:
            raise Terminated()
        if caught:
            raise KeyboardInterrupt


# ------------------------------------------------------------------ the sharded model


def _shard_linear(model: nn.Module, path: str, world: int) -> None:
    linear = model.get_submodule(path)
    dim = split_dim(f"{path}.weight")
    out_f, in_f = linear.out_features, linear.in_features
    shape = (out_f // world, in_f) if dim == 0 else (out_f, in_f // world)
    model.set_submodule(path, nn.Linear(shape[1], shape[0], bias=False, device="meta"))


class ShardedTransformer(Transformer):
    """A Transformer holding one rank's shard; on the leader every call is mirrored to the ranks.

    `args` stays the whole model's shape (what reports show); each Attention holds its local
    heads (n_heads/N, n_kv_heads/N), so its KV cache is 1/N. Build it on the meta device, load
    the rank's tensors, then `connect()` to add the collectives.
    """

    def __init__(self, args: ModelArgs, group: Group) -> None:
        super().__init__(args)
        self.group = group
        n = group.world
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim // n, device="meta")
        _shard_linear(self, "output", n)
        for i, layer in enumerate(self.layers):
            for part in ("attention.wq", "attention.wk", "attention.wv", "attention.wo"):
                _shard_linear(self, f"layers.{i}.{part}", n)
            for part in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
                _shard_linear(self, f"layers.{i}.{part}", n)
            attention, ffn = layer.attention, layer.feed_forward
            attention.n_heads, attention.n_kv_heads = attention.n_heads // n, attention.n_kv_heads // n
            attention.part_sizes = [size // n for size in attention.part_sizes]
            ffn.part_sizes = [size // n for size in ffn.part_sizes]

    def connect(self) -> ShardedTransformer:
        """Add the collectives: all-gather after the embedding and head, all-reduce after wo, w2."""
        group = self.group

        def gather(_module: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
            return group.all_gather(out)

        def reduce(_module: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
            group.all_reduce(out)
            return out

        self.tok_embeddings.register_forward_hook(gather)
        self.output.register_forward_hook(gather)
        for layer in self.layers:
            layer.attention.wo.register_forward_hook(reduce)
            layer.feed_forward.w2.register_forward_hook(reduce)
        return self

    def forward(
        self, tokens: torch.Tensor, start: int | torch.Tensor = 0, kv_len: int | None = None, last_only: bool = False
    ) -> torch.Tensor:
        if not self.group.leads:
            return super().forward(tokens, start, kv_len, last_only)
        b, t = tokens.shape
        with held_signals():
            self.group.send(_FORWARD, b, t, int(start), -1 if kv_len is None else kv_len, int(last_only))
            self.group.broadcast(tokens.to(dtype=torch.long).contiguous())
            return super().forward(tokens, start, kv_len, last_only)

    def setup_cache(self, batch: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> int:
        if self.group.leads:
            with held_signals():
                self.group.send(_SETUP, batch, max_seq_len or -1, _DTYPES.index(dtype) if dtype else -1)
        return super().setup_cache(batch, max_seq_len, dtype)

    def clear_cache(self) -> None:
        if self.group.leads:
            with held_signals():
                self.group.send(_CLEAR)
        super().clear_cache()

    def rank_stats(self) -> list[RankStats]:
        """What every rank holds and has spent in collectives, rank order (a collective: call on all)."""
        if self.group.leads:
            with held_signals():
                self.group.send(_STATS)
        mine = [weight_bytes(self), self.cache_bytes, int(self.group.comm.seconds * 1e9), self.group.comm.calls]
        with held_signals() if self.group.leads else contextlib.nullcontext():
            rows = self.group.gather_ints(mine)
        return [RankStats(*row) for row in rows]


@dataclasses.dataclass(frozen=True)
class RankStats:
    """One rank's resident weights and KV cache (bytes) and its time in collectives so far."""

    weight_bytes: int
    kv_bytes: int
    comm_ns: int
    comm_calls: int


def _fault() -> tuple[int, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if ":" not in spec:
        return None
    rank, pos = spec.split(":", 1)
    return int(rank), int(pos)


@torch.inference_mode()
def follow(model: ShardedTransformer) -> int:
    """A follower's life: replay the leader's calls until it says exit; returns the exit code."""
    group = model.group
    fault = _fault()
    while True:
        cmd, a, b, c, d, e = group.receive()
        if cmd == _EXIT:
            return a
        if cmd == _FORWARD:
            tokens = torch.empty((a, b), dtype=torch.long, device=group.device)
            group.broadcast(tokens)
            if fault is not None and fault == (group.rank, c):
                raise RuntimeError(f"injected fault at position {c} ({FAULT_ENV})")
            model(tokens, c, None if d < 0 else d, bool(e))  # the head's gather needs the leader's shape
        elif cmd == _SETUP:
            model.setup_cache(a, None if b < 0 else b, _DTYPES[c] if c >= 0 else None)
        elif cmd == _CLEAR:
            model.clear_cache()
        elif cmd == _STATS:
            model.rank_stats()
        else:
            raise ParallelError(f"tensor-parallel rank {group.rank}: unknown command {cmd} from rank 0")


def worker_command() -> list[str]:
    """How a leader starts a rank: this interpreter running the loader's rank entry point."""
    return [sys.executable, "-c", "from llamactl.loading import serve_rank; serve_rank()"]


__all__ = [
    "FAULT_ENV",
    "CommStats",
    "Group",
    "ParallelError",
    "RankStats",
    "ShardedTransformer",
    "check_divisible",
    "distributed_env",
    "follow",
    "join",
    "start",
]
