"""How many CPU threads a model runs with: the physical cores by default, as llama.cpp does.

Hyper-threads share a core's vector units, so a second thread per core adds no GEMV
throughput and doubles the threads that must meet at every barrier. `OPENMP_DEFAULTS` are
settings OpenMP reads once, when torch loads it: `apply_openmp_defaults()` must run before
the first `import torch` (the CLI's entry point calls it), and never overrides a value the
user set.
"""

from __future__ import annotations

import os

# OpenMP's worker threads sleep in the kernel at a barrier instead of spinning for ~0.1 s.
# When another process holds a core, a spinning worker burns the time slice the late thread
# needs to arrive; see benchmarks/decode_variants.py for the measurement behind this choice.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_openmp_defaults() -> None:
    """Set `OPENMP_DEFAULTS` in the environment where the user has not; a no-op once torch is loaded."""
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def default_threads() -> int:
    """Physical cores (psutil), else logical CPUs, never fewer than 1."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def set_threads(threads: int | None = None) -> int:
    """Run torch's intra-op work on `threads` threads (default: `default_threads()`); returns the count."""
    import torch

    count = threads if threads is not None else default_threads()
    if count < 1:
        from llamactl.errors import UsageError

        raise UsageError(f"threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count
