"""Measuring the machine: its description, peak memory bandwidth, wall time, memory, OOM.

Nothing here knows about models; the runner uses these to time and size what it runs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from llamactl import __version__
from llamactl.bench.rows import Environment
from llamactl.threads import WAIT_POLICY, start_load

# --------------------------------------------------------------------------- environment


def describe_environment(device: torch.device, cpu_fallback: bool = False) -> Environment:
    """Versions, devices, cores and RAM, and the device's peak bandwidth (measured once per process)."""
    import psutil

    gpu_info = gpu_mem = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_info, gpu_mem = props.name, props.total_memory
    return Environment(
        llamactl_version=__version__,
        build_commit=_git_commit(),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        backends="CUDA" if device.type == "cuda" else "CPU",
        gpu_info=gpu_info,
        gpu_memory_bytes=gpu_mem,
        cpu_info=_cpu_model(),
        cpu_cores=psutil.cpu_count(logical=False),
        cpu_threads=psutil.cpu_count(logical=True),
        n_threads=torch.get_num_threads(),
        ram_bytes=psutil.virtual_memory().total,
        peak_bandwidth_gbs=peak_bandwidth_gbs(device),
        cpu_fallback=cpu_fallback,
        omp_wait_policy=os.environ.get(WAIT_POLICY, "default"),
        busy_cores_at_start=start_load().busy,
        peak_bandwidth_source=(
            f"probe: best of {probe_runs(device)} runs each of a copy, a sum and a matrix-vector product "
            f"over {probe_bytes(device) >> 20} MiB"
        ),
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """Short commit of the checkout llamactl runs from, if it is one (no error otherwise)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --------------------------------------------------------------------------- bandwidth


@functools.cache
def peak_bandwidth_gbs(device: torch.device) -> float:
    """measure_copy_bandwidth once per device and process (it allocates and moves 0.5-2 GB)."""
    return round(measure_copy_bandwidth(device), 1)


def probe_runs(device: torch.device) -> int:
    """Timed runs of each bandwidth kernel; the fastest counts (noise only ever slows a run)."""
    return 10 if device.type == "cuda" else 5


def probe_bytes(device: torch.device) -> int:
    """The probe's buffer: far larger than any cache, so it measures memory, not cache."""
    return (1 << 30) if device.type == "cuda" else (256 << 20)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Peak memory bandwidth in GB/s: the best of a copy (bytes read + written), a sum and a
    matrix-vector product (bytes read) over the same buffer.

    Decode streams weights through matrix-vector products, so that is the ceiling it is held
    to; on a CPU a plain copy also pays write-allocate traffic and understates the peak.
    """
    if nbytes is None:
        nbytes = probe_bytes(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    matrix, vector = src.view(-1, 1024), torch.ones(1024, device=device)  # [n/4096, 1024] @ [1024]
    kernels = [(2 * nbytes, lambda: dst.copy_(src)), (nbytes, src.sum), (nbytes, lambda: torch.mv(matrix, vector))]
    best = 0.0
    for moved, kernel in kernels:
        kernel()  # warm-up: page in, pick kernels
        ns = min(time_ns(device, kernel) for _ in range(probe_runs(device)))
        best = max(best, moved / ns)  # bytes per ns == GB/s
    return best


# --------------------------------------------------------------------------- time and memory


def time_ns(device: torch.device, fn: Callable[[], Any]) -> int:
    """Wall time of fn in ns (at least 1); CUDA events with synchronisation on the GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return max(1, round(start.elapsed_time(end) * 1e6))
    begin = time.perf_counter_ns()
    fn()
    return max(1, time.perf_counter_ns() - begin)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind tensors (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class PeakMemory:
    """Peak memory of a stretch of code: torch.cuda statistics, or the process's peak RSS on CPU.

    On Linux the RSS high-water mark is reset through /proc/self/clear_refs; elsewhere the
    current RSS at `read()` is the best stand-in.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        import psutil

        return psutil.Process().memory_info().rss

    def allocated(self) -> int:
        """Bytes held right now: what tensors asked the CUDA allocator for, or RSS on CPU.

        `requested_bytes` rather than memory_allocated(): the latter counts whole allocator
        blocks, and a cached block too big to split (remainder <= 1 MiB) would be charged to
        the KV cache in full.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.memory_stats(self.device)["requested_bytes.all.current"])
        import psutil

        return psutil.Process().memory_info().rss


def free_memory(device: torch.device, collect: bool = True) -> None:
    """Give memory back between configurations (gc.collect costs ~0.1 s, so only when needed)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- out of memory


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory from CUDA or the CPU allocator."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def oom_message(exc: BaseException) -> str:
    """The first line of an OOM error, at most 200 characters, for a row's `error` field."""
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "out of memory"
