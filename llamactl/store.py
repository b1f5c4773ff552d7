"""The model store: checkpoints under `$LLAMACTL_HOME/models/<name>/`, managed by name.

A store entry is a directory (or a symlink to one, made by `import --link`). `import` copies by
default (reflinks or hard links where the filesystem allows, so it costs no second copy of the
bytes) and leaves the source as it was; `--move` moves it in. A GGUF file is imported as a
directory holding that one file (copied, moved, or a symlink to it with `--link`), so every
entry is a directory and `rm` of a linked GGUF removes only the link. Nothing else is kept
about a model except what its files say, plus small side files: the sha256 cache
(`$LLAMACTL_HOME/cache/sha256.json`, keyed by real path, size and mtime so a hash is computed
once), `.llamactl-source.json` naming a pulled model's repository, and `.llamactl-model.json`
with what the files cannot say (a Meta model's trained context, from `import --ctx`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamactl import jsonio
from llamactl.atomic import rename_noreplace
from llamactl.checkpoint import list_model_names, open_checkpoint, resolve_model
from llamactl.errors import DestinationError, LlamactlError, ModelNotFoundError, UsageError
from llamactl.home import disk_bytes, hash_cache_file, model_files, models_home
from llamactl.info import model_info
from llamactl.sources import installed_sources

SOURCE_FILE = ".llamactl-source.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_HASH_CHUNK = 1 << 20

# progress(bytes_done_delta) while hashing; the CLI draws a bar from it.
HashProgress = Callable[[int], None]


def validate_name(name: str) -> str:
    """A store name is one path component: letters, digits, `._+-`, not starting with a dot."""
    if not _NAME.match(name) or len(name) > 200:
        raise UsageError(
            f"{name!r}: not a valid model name (use letters, digits and . _ + -, starting with a letter or digit)"
        )
    return name


def store_path(name: str) -> Path:
    """The store directory of an existing model `name` (not a path: `rm` must never leave the store)."""
    path = models_home() / validate_name(name)
    if not (path.exists() or path.is_symlink()):
        names = list_model_names()
        known = f"models: {', '.join(names)}" if names else f"no models in {models_home()} yet"
        raise ModelNotFoundError(f"{name}: no such model in the store ({known})")
    return path


@dataclass
class ModelEntry:
    """One line of `llamactl list`."""

    name: str
    path: str
    format: str | None = None
    params: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    size: int = 0
    linked_to: str | None = None
    error: str | None = None
    source: str | None = None  # a model an installed package ships (llamactl.sources), not the store

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_entry(name: str, path: Path) -> ModelEntry:
    """Summarise one store directory; an unreadable model gets `error` rather than breaking `list`."""
    entry = ModelEntry(name=name, path=str(path), linked_to=linked_to(path))
    try:
        entry.size = disk_bytes(model_files(path))
        report = model_info(open_checkpoint(path))
        entry.format, entry.params, entry.dtype = report.format, report.parameters, report.dtype
        entry.quantization = report.quantization["scheme"] if report.quantization else None
    except (LlamactlError, OSError) as exc:
        entry.error = str(exc)
    return entry


def linked_to(path: Path) -> str | None:
    """Where a linked import points: the directory symlink, or the one symlinked .gguf inside."""
    if path.is_symlink():
        return os.readlink(path)
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_symlink() and entries[0].suffix.lower() == ".gguf":
            return os.readlink(entries[0])
    return None


def list_models() -> list[ModelEntry]:
    """Every model in the store, by name, then those installed packages provide under other names."""
    root = models_home()
    names = list_model_names()
    entries = [describe_entry(name, root / name) for name in names]
    for source, path in installed_sources():
        if source.name not in names:
            entry = describe_entry(source.name, path)
            entry.source = source.description
            entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- hashes


def _read_hash_cache() -> dict[str, Any]:
    try:
        data = jsonio.loads(hash_cache_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a lost or damaged cache only costs a re-hash


def _write_hash_cache(cache: dict[str, Any]) -> None:
    target = hash_cache_file()
    with contextlib.suppress(OSError):  # the cache is an optimisation; a read-only home still works
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, target)


def sha256_file(path: Path, progress: HashProgress | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def file_hashes(files: list[Path], progress: HashProgress | None = None) -> dict[Path, str]:
    """sha256 of each file, computed once: cached under its real path, size and mtime."""
    cache = _read_hash_cache()
    out: dict[Path, str] = {}
    dirty = False
    for file in files:
        st = file.stat()
        key = str(file.resolve())
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            out[file] = str(hit["sha256"])
            if progress:
                progress(st.st_size)
            continue
        out[file] = sha256_file(file, progress)
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": out[file]}
        dirty = True
    if dirty:
        _write_hash_cache(cache)
    return out


def _forget_hashes(root: Path) -> None:
    cache = _read_hash_cache()
    prefix = str(root) + os.sep
    kept = {k: v for k, v in cache.items() if not k.startswith(prefix)}
    if len(kept) != len(cache):
        _write_hash_cache(kept)


# ----------------------------------------------------------------------------- show


def show_model(model: str, progress: HashProgress | None = None) -> dict[str, Any]:
    """Everything `info` says about a model (name or path), plus config, chat template and hashed files."""
    path = resolve_model(model)
    reader = open_checkpoint(path)
    report = model_info(reader)
    files = model_files(path)
    hashes = file_hashes(files, progress)
    root = path.resolve()
    source = None
    with contextlib.suppress(OSError, ValueError):
        source = jsonio.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))
    return {
        "name": path.name if Path(model).expanduser().exists() else model,  # a source's name, not its file's
        "path": str(path),
        "linked_to": linked_to(path),
        "info": report.to_dict(),
        "quantization": reader.quant.describe() if reader.quant is not None else None,
        "config": reader.args.to_params(),
        "chat_template": report.chat_template,
        "chat_template_source": report.chat_template_source,
        "source": source,
        "size": disk_bytes(files),
        "files": [{"path": _relative(f, root), "size": f.stat().st_size, "sha256": hashes[f]} for f in files],
    }


def _relative(file: Path, root: Path) -> str:
    return file.name if file == root else str(file.relative_to(root))


def hash_work(model: str) -> int:
    """Bytes `show_model` may have to hash (the CLI sizes its progress bar with it)."""
    return sum(f.stat().st_size for f in model_files(resolve_model(model)))


# ----------------------------------------------------------------------------- rm / import


def remove_model(name: str) -> Path:
    """Delete a model from the store; a linked import loses only its link, never its files."""
    path = store_path(name)
    real = path.resolve()
    if path.is_symlink() or not path.is_dir():
        path.unlink()  # a link (to a directory or a file) or a plain file entry
    else:
        # Rename first so the name disappears at once, even if deleting many GB is interrupted.
        doomed = path.with_name(f".rm-{name}-{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    _forget_hashes(real)
    return path


def derived_entry(source: str, suffix: str) -> Path:
    """Where `quantize SRC` with no DST writes: the store entry `<SRC's name>-<suffix>` (7b-chat-q4).

    SRC may be a store name or a path (its directory or file stem names it). The store is
    created if needed; the entry itself is written atomically by the converter.
    """
    path = Path(source).expanduser()
    base = path.resolve().stem if path.is_file() else path.resolve().name if path.exists() else source
    name = validate_name(f"{base}-{suffix}")
    models_home().mkdir(parents=True, exist_ok=True)
    return models_home() / name


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


IMPORT_MODES = ("copy", "move", "link")


@dataclass
class ImportResult:
    """What `import_model` did: `mode` as asked; `how` the copy was made (reflink, hardlink, copy)."""

    name: str
    path: Path
    source: Path
    mode: str
    how: str
    trained_context: int | None

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def import_model(source: str | os.PathLike[str], name: str, mode: str = "copy", ctx: int | None = None) -> ImportResult:
    """Put a checkpoint directory or a .gguf file into the store as `name`.

    `mode` "copy" (the default) leaves the source as it was: each file is reflinked or
    hard-linked where the filesystem allows (cheap, no second copy of the bytes), else copied;
    "move" moves it in; "link" symlinks it. The entry appears under its name only when
    complete. `ctx` records the trained context of a Meta checkpoint (its params.json has none).
    """
    from llamactl.checkpoint.base import trained_context

    if mode not in IMPORT_MODES:
        raise UsageError(f"import mode {mode!r}: choose one of {', '.join(IMPORT_MODES)}")
    validate_name(name)
    src = Path(source).expanduser()
    if not src.exists():
        raise ModelNotFoundError(f"{src}: no such directory")
    if not src.is_dir() and src.suffix.lower() != ".gguf":
        raise ModelNotFoundError(f"{src}: is a file; import the directory that holds the checkpoint (or a .gguf file)")
    reader = open_checkpoint(src)  # refuse anything that is not a readable checkpoint before touching it
    known = trained_context(reader)
    if ctx is not None:
        _check_ctx(src, reader.format, known, ctx, mode)
    home = models_home()
    dest = home / name
    if dest.exists() or dest.is_symlink():
        raise DestinationError(f"{dest}: a model named {name!r} is already in the store (`llamactl rm {name}` first)")
    real_src, real_home = src.resolve(), home.resolve()
    in_store = _inside(src.absolute(), home.absolute()) or _inside(real_src, real_home)
    if in_store or _inside(real_home, real_src):
        raise DestinationError(f"{src}: is inside the store (or contains it); nothing to import")
    home.mkdir(parents=True, exist_ok=True)
    record = {"trained_context": ctx} if ctx is not None and known is None else {}
    if mode == "link" and src.is_dir():
        dest.symlink_to(real_src, target_is_directory=True)
        how = "symlink"
    else:
        how = _build_entry(real_src, dest, mode, record)
    return ImportResult(name, dest, real_src, mode, how, ctx if ctx is not None else known)


def _check_ctx(src: Path, fmt: str, known: int | None, ctx: int, mode: str) -> None:
    from llamactl.config import BOUNDS

    if not 2 <= ctx <= BOUNDS["max_seq_len"]:
        raise UsageError(f"--ctx {ctx}: a trained context is between 2 and {BOUNDS['max_seq_len']} tokens")
    if known is not None and known != ctx:
        raise UsageError(f"--ctx {ctx}: {src} says its trained context is {known}; --ctx is for Meta checkpoints")
    if known is None and mode == "link" and src.is_dir():
        raise UsageError(f"--ctx with --link would write into {src}; import a copy (the default) to record it")


def _build_entry(src: Path, dest: Path, mode: str, record: dict[str, Any]) -> str:
    """Fill a hidden directory beside dest, then rename it in: a cut import leaves no entry."""
    from llamactl.checkpoint.base import write_model_meta

    tmp = dest.with_name(f".import-{dest.name}-{os.getpid()}")
    renamed = False  # the source itself now sits inside tmp (a move on one filesystem)
    try:
        if src.is_file():  # a .gguf: the entry is a directory holding it
            tmp.mkdir()
            inside = tmp / src.name
            if mode == "link":
                inside.symlink_to(src)
                how = "symlink"
            elif mode == "move":
                how = _move(src, inside, shutil.copy2)
                renamed = how == "rename"
            else:
                how = _cheap_copy(src, inside)
        elif mode == "move":
            how = _move(src, tmp, shutil.copytree)
            renamed = how == "rename"
        else:
            # Symlinks are followed: a Hugging Face cache snapshot links into ../../blobs.
            hows: set[str] = set()
            shutil.copytree(src, tmp, copy_function=lambda a, b: hows.add(_cheap_copy(Path(a), Path(b))))
            how = "+".join(sorted(hows)) or "copy"
        if record:
            write_model_meta(tmp, **record)
        try:
            rename_noreplace(tmp, dest)  # atomic: never over an entry someone made meanwhile
        except FileExistsError:
            raise DestinationError(f"{dest}: appeared while importing; left it alone") from None
    except BaseException:
        if renamed:
            with contextlib.suppress(OSError):  # put the moved source back where it was
                os.rename(tmp / src.name if src.suffix.lower() == ".gguf" else tmp, src)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if mode == "move" and how == "copy":  # moved across filesystems: the source goes once the entry is in
        shutil.rmtree(src) if src.is_dir() else src.unlink()
    return how


def _cheap_copy(src: Path, dst: Path) -> str:
    """Copy one file the cheapest way the filesystem allows: reflink, hard link, bytes."""
    if _reflink(src, dst):
        return "reflink"
    try:
        os.link(src, dst)  # shares the bytes (and inode) with the source, which stays as it was
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _reflink(src: Path, dst: Path) -> bool:
    """A copy-on-write clone (btrfs, XFS with reflink, bcachefs): the FICLONE ioctl on Linux."""
    try:
        import fcntl

        ficlone = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), ficlone, s.fileno())
        shutil.copystat(src, dst)
        return True
    except (OSError, ImportError):
        with contextlib.suppress(OSError):
            dst.unlink()
        return False


def _move(src: Path, dst: Path, copy: Callable[[Path, Path], object]) -> str:
    """Rename src to dst; across filesystems copy it instead (the caller deletes src afterwards)."""
    try:
        os.rename(src, dst)
        return "rename"
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise DestinationError(f"{src}: cannot move it into {models_home()}: {exc.strerror}") from None
    copy(src, dst)
    return "copy"
