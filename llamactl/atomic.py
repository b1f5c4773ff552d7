"""Output directories (and single-file outputs) that appear complete or not at all.

Every command that writes a model directory (convert, quantize, plugins) builds it in a
staging directory beside the destination and renames it into place at the end, so a
failure, a full disk or Ctrl-C never leaves a half-written model behind. A one-file output
(a GGUF) is written the same way: a staging file beside it, renamed onto it at the end.

The final rename never replaces what it was not told to: without --force it refuses a DST
that appeared while the run was writing (another run, another user), atomically
(`renameat2(RENAME_NOREPLACE)`, else a `mkdir` / `link` claim); with --force it replaces
only the very DST that `check_destination` saw (same device and inode), nothing else.

A staging entry is named `.DST.PID.XXXXXXXX.partial` and its run holds an `flock` on it
while writing. A run killed outright (SIGKILL, power loss) cannot clean up; the next run
writing next to the same DST removes such an entry when its lock is free and its pid is
gone, and reports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from llamactl.errors import DestinationError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, stale entries are never judged dead
    fcntl = None  # type: ignore[assignment]

FileId = tuple[int, int]  # (st_dev, st_ino): which DST --force was allowed to replace
STAGING_SUFFIX = ".partial"
_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def file_id(path: Path) -> FileId | None:
    """The identity of whatever is at path (a symlink itself, not its target); None if nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def check_destination(src: Path, dst: Path, force: bool, file: bool = False) -> FileId | None:
    """DST may not be SRC, lie inside it or contain it; an existing DST needs force.

    `file`: DST is one file (it may replace a file, never a directory) instead of a directory.
    Returns the identity of the existing DST that force allows replacing (None: DST is new).
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
    return file_id(dst)


def atomic_directory(
    dst: Path, replaces: FileId | None = None, on_stale: Callable[[str], None] | None = None
) -> contextlib.AbstractContextManager[Path]:
    """Yield a fresh staging directory beside dst; on success it becomes dst.

    `replaces`: the existing dst (from check_destination) that may be replaced; any other
    dst found at the end is left alone and the run fails. `on_stale` hears about staging
    entries of dead runs that were removed.
    """
    return _staged(dst, True, replaces, on_stale)


def atomic_file(
    dst: Path, replaces: FileId | None = None, on_stale: Callable[[str], None] | None = None
) -> contextlib.AbstractContextManager[Path]:
    """Yield the path of a fresh staging file beside dst; on success it becomes dst (see atomic_directory)."""
    return _staged(dst, False, replaces, on_stale)


@contextlib.contextmanager
def _staged(
    dst: Path, directory: bool, replaces: FileId | None, on_stale: Callable[[str], None] | None
) -> Iterator[Path]:
    remove_stale(dst, on_stale)
    tmp: Path | None = None
    lock: int | None = None
    try:
        # Signals held: a Ctrl-C between creating and recording the entry would strand it. One
        # delivered as they are released still finds `tmp` set, inside this `try`.
        with _signals_held():
            tmp = Path(_mkstaging(dst.resolve().parent, dst.name, directory))
            lock = _lock(tmp)
        yield tmp
        os.chmod(tmp, 0o755 if directory else 0o644)
        _install(tmp, dst, replaces)
    except OSError as exc:
        _discard(tmp)
        raise _write_error(dst, exc) from None
    except BaseException:
        _discard(tmp)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _discard(tmp: Path | None) -> None:
    if tmp is None:
        return
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _mkstaging(parent: Path, name: str, directory: bool) -> str:
    """`.NAME.PID.XXXXXXXX.partial` beside DST (the pid lets a later run judge it stale)."""
    prefix = f".{name}.{os.getpid()}."
    try:
        if directory:
            return tempfile.mkdtemp(prefix=prefix, suffix=STAGING_SUFFIX, dir=parent)
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=STAGING_SUFFIX, dir=parent)
        os.close(fd)
        return path
    except OSError as exc:  # read-only file system, permission, no space for even an inode
        raise DestinationError(f"{parent}: cannot write here ({exc.strerror or exc}); nothing was written") from None


def _lock(path: Path) -> int:
    """An open descriptor holding an exclusive flock on path, released when the run ends (or dies)."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale(dst: Path, on_stale: Callable[[str], None] | None = None) -> list[Path]:
    """Remove staging entries for dst left by runs that died; return what was removed."""
    parent = dst.resolve().parent
    prefix = f".{dst.name}."
    removed: list[Path] = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix) and n.endswith(STAGING_SUFFIX)]
    except OSError:
        return removed
    for name in names:
        pid = name[len(prefix) :].split(".", 1)[0]
        path = parent / name
        if pid.isdigit() and _is_stale(path, int(pid)):
            kind = "directory" if path.is_dir() else "file"
            if kind == "directory":
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
            if on_stale is not None:
                on_stale(f"{path}: removed the staging {kind} of an interrupted run (pid {pid})")
    return removed


def _is_stale(path: Path, pid: int) -> bool:
    """Its run is gone: the pid is not alive here and nobody holds its lock."""
    if fcntl is None or _alive(pid):
        return False
    try:
        # O_NONBLOCK: a FIFO planted under a staging name must not hang us; NOFOLLOW: nor a link.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # locked: a live run (perhaps in another pid namespace) is writing it
        return False
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _install(tmp: Path, dst: Path, replaces: FileId | None) -> None:
    """Move tmp onto dst. Only the dst identified by `replaces` may be replaced; it is removed last."""
    if replaces is None or file_id(dst) is None:
        _no_replace(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
    rename_noreplace(dst, old)
    if file_id(old) != replaces:  # swapped for something else since the start: not ours to delete
        rename_noreplace(old, dst)
        raise DestinationError(f"{dst}: was replaced by another one while writing; left it alone, nothing written")
    try:
        _no_replace(tmp, dst)
    except BaseException:
        rename_noreplace(old, dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _no_replace(tmp: Path, dst: Path) -> None:
    try:
        rename_noreplace(tmp, dst)
    except FileExistsError:
        raise DestinationError(
            f"{dst}: appeared while writing (another run?); left it alone, nothing written"
        ) from None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename src to dst atomically, failing with FileExistsError if dst exists (file or directory)."""
    if _renameat2(src, dst):
        return
    # No renameat2 (old kernel, libc or file system): claim the name atomically first.
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # FileExistsError if taken; an empty directory we own otherwise
        try:
            os.rename(src, dst)  # replaces only our empty claim; ENOTEMPTY if someone filled it
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
            with contextlib.suppress(OSError):
                os.rmdir(dst)
            raise
    else:
        os.link(src, dst, follow_symlinks=False)  # FileExistsError if taken
        os.unlink(src)


_libc_renameat2: Callable[..., int] | bool | None = False  # False: not looked up yet


def _renameat2(src: Path, dst: Path) -> bool:
    """renameat2(RENAME_NOREPLACE); False when the platform or file system lacks it."""
    global _libc_renameat2
    if _libc_renameat2 is False:
        try:
            _libc_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (AttributeError, OSError):
            _libc_renameat2 = None
    if _libc_renameat2 is None:
        return False
    rc = _libc_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)  # type: ignore[operator]
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this file system does not support the flag
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _write_error(dst: Path, exc: OSError) -> DestinationError:
    if exc.errno == errno.ENOSPC:
        return DestinationError(f"{dst}: no space left on device while writing; nothing was written")
    if exc.errno == errno.EROFS:
        return DestinationError(f"{dst.parent}: read-only file system; nothing was written")
    if exc.errno == errno.EEXIST:
        return DestinationError(f"{dst}: appeared while writing (another run?); left it alone, nothing written")
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
