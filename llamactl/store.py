"""The model store: checkpoints under `$LLAMACTL_HOME/models/<name>/`, managed by name.

A store entry is a directory (or a symlink to one, made by `import --link`). A GGUF file is
imported as a directory holding that one file (moved in, or a symlink to it with `--link`),
so every entry is a directory and `rm` of a linked GGUF removes only the link. Nothing else
is kept about a model except what its files say, plus two small side files: the sha256
cache (`$LLAMACTL_HOME/cache/sha256.json`, keyed by real path, size and mtime so a hash is
computed once) and, for pulled models, `.llamactl-source.json` naming the repository.
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
from llamactl.checkpoint import list_model_names, open_checkpoint, resolve_model
from llamactl.errors import DestinationError, LlamactlError, ModelNotFoundError, UsageError
from llamactl.home import hash_cache_file, models_home
from llamactl.info import model_info

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_files(path: Path) -> list[Path]:
    """Every regular file of a model directory (following a linked import), hidden ones excluded."""
    root = path.resolve()
    if root.is_file():  # a .gguf given by path
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # Regular files only: a FIFO or a link to /dev/zero would block hashing forever.
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and (Path(dirpath) / f).is_file()]
    return out


def describe_entry(name: str, path: Path) -> ModelEntry:
    """Summarise one store directory; an unreadable model gets `error` rather than breaking `list`."""
    entry = ModelEntry(name=name, path=str(path), linked_to=linked_to(path))
    try:
        entry.size = sum(f.stat().st_size for f in model_files(path))
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
    """Every model in the store, by name."""
    root = models_home()
    return [describe_entry(name, root / name) for name in list_model_names()]


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
    from llamactl.templates import DEFAULT_TEMPLATE

    path = resolve_model(model)
    reader = open_checkpoint(path)
    files = model_files(path)
    hashes = file_hashes(files, progress)
    root = path.resolve()
    source = None
    with contextlib.suppress(OSError, ValueError):
        source = jsonio.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))
    return {
        "name": path.name,
        "path": str(path),
        "linked_to": linked_to(path),
        "info": model_info(reader).to_dict(),
        "quantization": reader.quant.describe() if reader.quant is not None else None,
        "config": reader.args.to_params(),
        "chat_template": DEFAULT_TEMPLATE,
        "source": source,
        "size": sum(f.stat().st_size for f in files),
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


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def import_model(source: str | os.PathLike[str], name: str, link: bool = False) -> Path:
    """Move (or symlink, with `link`) a checkpoint directory or a .gguf file into the store as `name`."""
    validate_name(name)
    src = Path(source).expanduser()
    if not src.exists():
        raise ModelNotFoundError(f"{src}: no such directory")
    if not src.is_dir() and src.suffix.lower() != ".gguf":
        raise UsageError(f"{src}: is a file; import the directory that holds the checkpoint (or a .gguf file)")
    open_checkpoint(src)  # refuse anything that is not a readable checkpoint before touching it
    home = models_home()
    dest = home / name
    if dest.exists() or dest.is_symlink():
        raise DestinationError(f"{dest}: a model named {name!r} is already in the store (`llamactl rm {name}` first)")
    real_src, real_home = src.resolve(), home.resolve()
    in_store = _inside(src.absolute(), home.absolute()) or _inside(real_src, real_home)
    if in_store or _inside(real_home, real_src):
        raise DestinationError(f"{src}: is inside the store (or contains it); nothing to import")
    home.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        return _import_file(real_src, dest, link)
    if link:
        dest.symlink_to(real_src, target_is_directory=True)
        return dest
    try:
        os.rename(real_src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise DestinationError(f"{src}: cannot move it into {home}: {exc.strerror}") from None
        # Another filesystem: copy beside the store, swap it in, then delete the source.
        tmp = home / f".import-{name}-{os.getpid()}"
        try:
            shutil.copytree(real_src, tmp, symlinks=True)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(real_src)
    return dest


def _import_file(src: Path, dest: Path, link: bool) -> Path:
    """A .gguf becomes `dest/<its name>`: built in a hidden directory beside dest, renamed in at the end."""
    tmp = dest.with_name(f".import-{dest.name}-{os.getpid()}")
    tmp.mkdir()
    inside = tmp / src.name
    try:
        if link:
            inside.symlink_to(src)
        else:
            _move_file(src, inside)
        os.rename(tmp, dest)
    except BaseException:
        if not link and inside.exists() and not src.exists():
            os.rename(inside, src)  # the file was moved in: put it back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _move_file(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise DestinationError(f"{src}: cannot move it into {dst.parent.parent}: {exc.strerror}") from None
        shutil.copy2(src, dst)  # another filesystem: copy, then delete the source
        src.unlink()
