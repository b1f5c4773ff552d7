"""llamactl.bench.probes: wall time, storage and peak memory, bandwidth, OOM detection, environment."""

from __future__ import annotations

import time

import pytest
import torch

from llamactl.bench import probes
from tests.bench._util import CPU


def test_time_ns_is_the_wall_time_of_the_call() -> None:
    ns = probes.time_ns(CPU, lambda: time.sleep(0.02))
    assert 20_000_000 <= ns < 2_000_000_000
    assert probes.time_ns(CPU, lambda: None) >= 1  # never 0: tokens/s divides by it


def test_storage_bytes_count_shared_storage_once() -> None:
    base = torch.zeros(100)  # 400 bytes
    assert probes.storage_bytes([base[:10], base[10:], base]) == 400
    assert probes.storage_bytes([base, torch.zeros(10, dtype=torch.bfloat16)]) == 420
    assert probes.storage_bytes([]) == 0


def test_peak_memory_on_the_cpu_sees_a_touched_allocation() -> None:
    memory = probes.PeakMemory(CPU)
    memory.reset()
    before = memory.allocated()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, written so every page is resident
    assert memory.read() >= before + (32 << 20)
    del block


def test_copy_bandwidth_is_positive() -> None:
    assert probes.measure_copy_bandwidth(CPU, nbytes=4 << 20) > 0


@pytest.mark.parametrize(
    ("exc", "oom"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_oom(exc: BaseException, oom: bool) -> None:
    assert probes.is_oom(exc) is oom


def test_oom_message_is_the_first_line_and_short() -> None:
    assert probes.oom_message(RuntimeError("CUDA out of memory.\nmore detail")) == "CUDA out of memory."
    assert len(probes.oom_message(RuntimeError("x" * 500))) == 200
    assert probes.oom_message(torch.OutOfMemoryError("")) == "out of memory"


def test_environment_of_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "peak_bandwidth_gbs", lambda device: 12.5)  # the real probe moves 0.5 GB
    env = probes.describe_environment(CPU, cpu_fallback=True)
    assert (env.backends, env.gpu_info, env.gpu_memory_bytes, env.cuda_version is None) == ("CPU", None, None, True)
    assert env.n_threads == torch.get_num_threads() and env.ram_bytes > 0 and env.cpu_info
    assert (env.peak_bandwidth_gbs, env.cpu_fallback) == (12.5, True)
