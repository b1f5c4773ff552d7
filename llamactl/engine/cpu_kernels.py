"""The native one-token decode kernels (decode_kernels.cpp): compiled once per machine, loaded by ctypes.

The source is plain C++ (no torch headers), built with the system's C++ compiler for this CPU
(`-O3 -march=native`, about a second) into `$LLAMACTL_HOME/cache/kernels/` — or the directory
`$LLAMACTL_KERNEL_CACHE` names — under a name that hashes the source, the compiler and the CPU,
so a new llamactl, compiler or machine never loads a stale build. No compiler, or a failed
build: `load()` returns None and says why once; decoding then runs torch's operators alone.
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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from llamactl.home import cache_dir

logger = logging.getLogger(__name__)
CACHE_ENV = "LLAMACTL_KERNEL_CACHE"
SOURCE = "decode_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
MAX_HEAD_DIM = 512  # attend's accumulator (decode_kernels.cpp)

_V, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "rms_norm": [_V, _V, _V, _V, _V, _I, _F],
    "rope_store": [_V, _V, _V, _V, _L, _I, _I, _I, _L],
    "attend": [_V, _V, _V, _L, _I, _I, _I, _L, _V, _V],
    "silu_mul": [_V, _V, _L],
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
DTYPES = tuple(_SUFFIX)  # activation dtypes the kernels are built for (fp16 where the compiler has it)


@dataclass(frozen=True)
class Kernels:
    """The four kernels for one activation dtype (signatures: decode_kernels.cpp)."""

    rms_norm: Callable[..., None]
    rope_store: Callable[..., None]
    attend: Callable[..., None]
    silu_mul: Callable[..., None]


def kernels(dtype: torch.dtype) -> Kernels | None:
    """The kernels for activations of `dtype`, or None (unbuilt, or no build of that dtype here)."""
    lib = load()
    suffix = _SUFFIX.get(dtype)
    if lib is None or suffix is None or not hasattr(lib, f"rms_norm_{suffix}"):
        return None
    found = {}
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, f"{name}_{suffix}")
        fn.argtypes, fn.restype = argtypes, None
        found[name] = fn
    return Kernels(**found)


_LOADED: dict[str, ctypes.CDLL | None] = {}


def load() -> ctypes.CDLL | None:
    """The built library (compiled on first use, then from the cache), or None with one logged reason."""
    if "lib" not in _LOADED:
        try:
            _LOADED["lib"] = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError, _BuildError) as exc:
            logger.warning("native decode kernels unavailable (%s); decoding with torch operators only", exc)
            _LOADED["lib"] = None
    return _LOADED["lib"]


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
    source = resources.files("llamactl.engine").joinpath(SOURCE).read_bytes()
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise _BuildError(f"{compiler} does not run ({exc})") from exc
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_id().encode(), " ".join(FLAGS).encode()]))
    root = Path(os.environ.get(CACHE_ENV) or cache_dir("kernels"))
    built = root / f"decode-{key.hexdigest()[:16]}.so"
    if built.is_file():
        return built
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        src = Path(tmp) / SOURCE
        src.write_bytes(source)
        out = Path(tmp) / built.name
        # fp16 where the compiler has _Float16 (gcc >= 12, clang on x86-64 / arm64; fp32 and bf16 always);
        # -mcpu=native where -march=native is refused (Apple clang on arm64)
        for extra in (["-DLLAMACTL_F16"], [], ["-DLLAMACTL_F16", "-mcpu=native"], ["-mcpu=native"]):
            flags = [f for f in FLAGS if not (f == "-march=native" and "-mcpu=native" in extra)]
            done = subprocess.run(
                [compiler, *flags, *extra, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300
            )
            if done.returncode == 0:
                break
        else:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise _BuildError(f"{compiler} failed on {SOURCE}: {tail}")
        os.replace(out, built)  # whole or not at all: another process may be loading the same name
    logger.info("built native decode kernels: %s", built)
    return built
