"""How many CPU threads a model runs with, and how OpenMP's workers wait: chosen once, at start.

Default: the physical cores, as llama.cpp does (hyper-threads share a core's vector units, so a
second thread per core adds no GEMV throughput and doubles the threads meeting at every
barrier), less the cores other processes keep busy when llamactl starts. OpenMP reads its wait
policy once, when torch loads it, so `apply_openmp_defaults()` runs before the first
`import torch` (the CLI's entry point calls it) and never overrides a value the user set.

Why the load check (110M-shape Llama, bf16 decode, 2 cores; benchmarks/decode_variants.py,
medians of 3 interleaved rounds): on a quiet host libgomp's own policy (a worker spins
briefly at a barrier, then sleeps) decodes 81 tok/s against 56 with OMP_WAIT_POLICY=PASSIVE
(q4: 7.4 against 14.1 ms a token). With another process spinning on one core, the same two
spinning threads fall to 23 tok/s, while PASSIVE keeps 46 and one thread 47. So: quiet, keep
libgomp's default; a core busy at start, one thread fewer and PASSIVE (which also protects a
user's explicit --threads). A load that arrives later is not seen: set OMP_WAIT_POLICY=PASSIVE
or --threads for a long-lived server on a shared machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

WAIT_POLICY = "OMP_WAIT_POLICY"
BUSY_WAIT_POLICY = "PASSIVE"  # when other processes hold cores at start
BUSY_SAMPLE_S = 0.05  # how long the start-up load check watches the CPUs
BUSY_ENV = "LLAMACTL_BUSY_CORES"  # the check's result (a count), for child processes and tests


@dataclass(frozen=True)
class CpuLoad:
    """What the start-up check saw: physical cores, and how many of them other processes kept busy."""

    physical: int
    busy: int

    @property
    def free(self) -> int:
        return max(1, self.physical - self.busy)


def physical_cores() -> int:
    """Physical cores (psutil), else logical CPUs, never fewer than 1."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def sample_load(interval: float = BUSY_SAMPLE_S) -> CpuLoad:
    """Cores' worth of CPU time other processes use now (we sleep while it is measured)."""
    import psutil

    physical = physical_cores()
    logical = psutil.cpu_count() or physical
    used = sum(psutil.cpu_percent(interval=interval, percpu=True)) / 100  # logical CPUs' worth
    return CpuLoad(physical, min(physical, round(used * physical / logical)))


def _recorded_busy() -> int:
    value = os.environ.get(BUSY_ENV, "")
    return int(value) if value.isdigit() else 0


def start_load() -> CpuLoad:
    """The load `apply_openmp_defaults(check_load=True)` recorded, else none (all cores free)."""
    physical = physical_cores()
    return CpuLoad(physical, min(physical, _recorded_busy()))


def apply_openmp_defaults(check_load: bool = False) -> None:
    """Before torch loads: with `check_load`, look at the CPUs for `BUSY_SAMPLE_S` and record it;
    when other processes hold cores, OpenMP's workers wait passively (unless the user chose).
    Without `check_load` nothing is imported (psutil neither): `--help` and `list` stay fast."""
    if check_load and BUSY_ENV not in os.environ:
        os.environ[BUSY_ENV] = str(sample_load().busy)
    if _recorded_busy():
        os.environ.setdefault(WAIT_POLICY, BUSY_WAIT_POLICY)


def default_threads() -> int:
    """The physical cores less those other processes kept busy at start; never fewer than 1."""
    return start_load().free


def set_threads(threads: int | None = None) -> int:
    """Run torch's intra-op work on `threads` threads (default: `default_threads()`); returns the count."""
    import torch

    count = threads if threads is not None else default_threads()
    if count < 1:
        from llamactl.errors import UsageError

        raise UsageError(f"threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count
