"""Output directories (and single-file outputs) that appear complete or not at all.

Every command that writes a model directory (convert, quantize, pull, plugins) builds it in
a temporary directory beside the destination and renames it into place at the end, so a
failure, a full disk or Ctrl-C never leaves a half-written model behind. A one-file output
(a GGUF) is written the same way: a temporary file beside it, renamed over it at the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from llamactl.errors import DestinationError


def check_destination(src: Path, dst: Path, force: bool, file: bool = False) -> None:
    """DST may not be SRC, lie inside it or contain it; an existing DST needs force.

    `file`: DST is one file (it may replace a file, never a directory) instead of a directory.
    """
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real or src_real in dst_real.parents:
        raise DestinationError(f"{dst}: destination is inside the source {src}; choose a directory outside it")
    if dst_real in src_real.parents:
        raise DestinationError(f"{dst}: destination contains the source {src}; replacing it would delete the source")
    if dst.exists() and not force:
        raise DestinationError(f"{dst}: already exists (use --force to replace it)")
    if file and dst.is_dir():
        raise DestinationError(f"{dst}: is a directory; this format writes one file")
    if not file and dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a directory")
    if not dst_real.parent.is_dir():
        raise DestinationError(f"{dst.parent}: parent directory does not exist")


@contextlib.contextmanager
def atomic_directory(dst: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside dst; on success it replaces dst."""
    with _signals_held():  # a Ctrl-C between mkdtemp and `try` would strand the directory
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.resolve().parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, dst)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(dst, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dst: Path) -> Iterator[Path]:
    """Yield the path of a fresh temporary file beside dst; on success it replaces dst."""
    with _signals_held():
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.resolve().parent)
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)  # atomic, also over an existing file (allowed by --force)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(dst, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_error(dst: Path, exc: OSError) -> DestinationError:
    if exc.errno == errno.ENOSPC:
        return DestinationError(f"{dst}: no space left on device while writing; nothing was written")
    return DestinationError(f"{exc.filename or dst}: {exc.strerror or exc}; nothing was written")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block is done (they are delivered right after)."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Rename tmp to dst; an existing dst (allowed by --force) is removed only after."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
