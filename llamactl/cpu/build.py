"""The native CPU kernels (decode_kernels.cpp, matvec_kernels.cpp): compiled once per machine, loaded by ctypes.

The sources are plain C++ (no torch headers), built with the system's C++ compiler for this CPU
(`-O3 -march=native`, a few seconds) into one library in `$LLAMACTL_HOME/cache/kernels/` — or
the directory `$LLAMACTL_KERNEL_CACHE` names — under a name that hashes the sources, the
compiler, the flags and the CPU, so a new llamactl, compiler or machine never loads a stale
build. No compiler, or a failed build: `load()` returns None and says why once; the callers
then run torch's operators alone.

OpenMP (`-fopenmp`, for the matvec and attention kernels) links libgomp.so.1 by name, which
resolves to the copy torch has loaded: one thread pool for torch and these kernels
(`shares_torch_threads` checks; a build without OpenMP, or on another runtime, runs one thread).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch  # loaded first: libgomp.so.1 then resolves to torch's copy

from llamactl.home import cache_dir

logger = logging.getLogger(__name__)
CACHE_ENV = "LLAMACTL_KERNEL_CACHE"
SOURCES = ("decode_kernels.cpp", "matvec_kernels.cpp")
# -fno-math-errno / -fno-trapping-math: nothing reads errno or the FP exception flags, and without
# them GCC calls libm (or stays scalar) for floorf in the exponentials of softmax and SiLU; neither
# changes a result (-ffast-math would: it reorders sums).
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]
_LOADED: dict[str, ctypes.CDLL | None] = {}
# The name suffix of a kernel built for each activation dtype (fp16 only where the compiler has it).
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def load() -> ctypes.CDLL | None:
    """The built library (compiled on first use, then from the cache), or None with one logged reason."""
    if "lib" not in _LOADED:
        try:
            _LOADED["lib"] = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError, _BuildError) as exc:
            logger.warning("native CPU kernels unavailable (%s); running torch operators only", exc)
            _LOADED["lib"] = None
    return _LOADED["lib"]


def function(name: str, argtypes: list[type]) -> Callable[..., None] | None:
    """The library's `name` with its argument types set (returning nothing), or None when the
    library did not build or this machine's build lacks it (a CPU feature, _Float16)."""
    lib = load()
    fn = getattr(lib, name, None) if lib is not None else None
    if fn is not None:
        fn.argtypes, fn.restype = argtypes, None
    return fn


class _BuildError(Exception):
    pass


def _compiler() -> str:
    chosen = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not chosen:
        raise _BuildError("no C++ compiler found: install g++ or clang++, or set CXX")
    return chosen


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        wanted = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(wanted))  # every core repeats them
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build() -> Path:
    package = resources.files("llamactl.cpu")
    sources = {name: package.joinpath(name).read_bytes() for name in SOURCES}
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise _BuildError(f"{compiler} does not run ({exc})") from exc
    parts = [*sources.values(), version.encode(), _cpu_id().encode(), repr([FLAGS, _VARIANTS]).encode()]
    key = hashlib.sha256(b"\0".join(parts))
    root = Path(os.environ.get(CACHE_ENV) or cache_dir("kernels"))
    built = root / f"cpu-{key.hexdigest()[:16]}.so"
    if built.is_file():
        return built
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        paths = []
        for name, text in sources.items():
            paths.append(Path(tmp) / name)
            paths[-1].write_bytes(text)
        out = Path(tmp) / built.name
        for extra in _VARIANTS:
            flags = [f for f in FLAGS if not (f == "-march=native" and "-mcpu=native" in extra)]
            done = subprocess.run(
                [compiler, *flags, *extra, *map(str, paths), "-o", str(out)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode == 0:
                break
        else:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise _BuildError(f"{compiler} failed on {', '.join(SOURCES)}: {tail}")
        os.replace(out, built)  # whole or not at all: another process may be loading the same name
    logger.info("built native CPU kernels: %s (%s)", built, " ".join(extra) or "no extra flags")
    return built


# Tried in order until one builds: OpenMP where the compiler has it (not Apple clang); fp16
# where it has _Float16 (gcc >= 12, clang on x86-64 / arm64; fp32 and bf16 always); -mcpu=native
# where -march=native is refused (Apple clang on arm64).
_VARIANTS = [
    [*omp, *f16, *cpu]
    for cpu in ([], ["-mcpu=native"])
    for omp in (["-fopenmp"], [])
    for f16 in (["-DLLAMACTL_F16"], [])
]


_SHARED: list[bool] = []


def threads() -> int:
    """Threads for a kernel call: torch's count when the library shares its OpenMP pool, else one."""
    if not _SHARED:
        _SHARED.append(shares_torch_threads())
    return torch.get_num_threads() if _SHARED[0] else 1


def shares_torch_threads() -> bool:
    """True when the loaded library's OpenMP runtime is torch's own: the thread count torch sets
    is the one the library's runtime reports (checked with two counts, then restored).

    A library built without OpenMP, or linked to a runtime of its own (torch built with Intel's
    OpenMP, say), would spin a second pool against torch's; callers then run it on one thread.
    """
    lib = load()
    probe = getattr(lib, "omp_get_max_threads", None) if lib is not None else None
    if probe is None:
        return False
    probe.argtypes, probe.restype = [], ctypes.c_int
    before = torch.get_num_threads()
    try:
        seen = []
        for count in (before + 1, before):
            torch.set_num_threads(count)
            seen.append(probe())
    finally:
        torch.set_num_threads(before)
    return seen == [before + 1, before]
