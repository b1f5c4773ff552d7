"""`llamactl pull`: fetch a Hugging Face repository into the store, resumable and verified.

huggingface_hub does the talking to the Hub (endpoint, token from HF_TOKEN or the token file,
repository metadata, HTTP client, error classes). The bytes are fetched here rather than with
`hf_hub_download` because, since huggingface_hub 1.x, an interrupted download's partial file
is deleted: a 13 GB shard cut at 90 % would start again from zero. Instead each file streams
into `<store>/.partial-<name>/<path>.incomplete`, a rerun continues it with an HTTP Range
request, and every finished file is checked against the size and hash the Hub lists for it
(sha256 for LFS files, the git blob sha1 otherwise). A mismatching file is fetched once more
from scratch; the model appears under its name only when every file has verified.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from llamactl import jsonio
from llamactl.atomic import rename_noreplace
from llamactl.errors import (
    CheckpointError,
    DestinationError,
    LlamactlError,
    ModelNotFoundError,
    UsageError,
    printable,
)
from llamactl.home import models_home
from llamactl.store import SOURCE_FILE, validate_name

STATE_FILE = ".llamactl-pull.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# Weight formats we never need when the repository also has safetensors.
_REDUNDANT_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.ckpt", "*.onnx", "*.gguf")
_TIMEOUT = 60.0
_RETRY_WAIT = 0.5  # seconds, times the failure count


class HubError(LlamactlError):
    """The Hub refused or could not serve a request."""


class PullProgress(Protocol):
    """What `pull_model` reports while it works (the CLI draws a progress bar)."""

    def start(self, total: int, done: int, files: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def note(self, message: str) -> None: ...


class _Silent:
    def start(self, total: int, done: int, files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repository at the pulled commit, with what the Hub says it must hash to."""

    path: str
    size: int
    sha256: str | None = None  # LFS files
    git_sha1: str | None = None  # plain git blobs: sha1(b"blob <size>\0" + content)


@dataclass
class PullResult:
    name: str
    path: Path
    repo_id: str
    commit: str
    files: int
    size: int
    downloaded: int


# THE table of names llamactl knows without being told a repository (`llamactl chat 7b-chat`
# on an empty store points at the pull to run). Each is the name `pull` gives that repo.
KNOWN_MODELS: dict[str, str] = {
    "7b": "meta-llama/Llama-2-7b-hf",
    "7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "13b": "meta-llama/Llama-2-13b-hf",
    "13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "70b": "meta-llama/Llama-2-70b-hf",
    "70b-chat": "meta-llama/Llama-2-70b-chat-hf",
}


def missing_known_model(model: str) -> str | None:
    """The Hub repository of a known name that is neither in the store nor a path (else None)."""
    repo = KNOWN_MODELS.get(model)
    if repo is None or Path(model).expanduser().exists() or (models_home() / model).exists():
        return None
    return repo


def pull_hint(name: str, repo_id: str) -> str:
    """What to run to get a known model, in one clause (the repos are gated: a token is needed)."""
    pull = f"llamactl pull {repo_id}" + ("" if short_name(repo_id) == name else f" --name {name}")
    return (
        f"get it with `{pull}` (a gated repository: it needs a Hugging Face token with access "
        "granted, from HF_TOKEN or `hf auth login`)"
    )


def short_name(repo_id: str) -> str:
    """A store name for a repository: `meta-llama/Llama-2-7b-chat-hf` -> `7b-chat`."""
    base = repo_id.rsplit("/", 1)[-1].lower()
    stripped = re.sub(r"^llama-?2[-_]", "", base)
    stripped = re.sub(r"[-_]hf$", "", stripped)
    name = stripped or base
    name = re.sub(r"[^a-z0-9._+-]+", "-", name).strip("-.")
    return name or "model"


def select_files(files: Sequence[RemoteFile], include: Sequence[str] | None) -> list[RemoteFile]:
    """Files matching any `include` glob; by default all, minus other weight formats beside safetensors."""
    if include:
        return [f for f in files if any(fnmatch.fnmatch(f.path, pat) for pat in include)]
    if not any(f.path.endswith(".safetensors") for f in files):
        return list(files)
    return [f for f in files if not any(fnmatch.fnmatch(f.path, pat) for pat in _REDUNDANT_WEIGHTS)]


# ----------------------------------------------------------------------------- Hub access


def _endpoint() -> str | None:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, at import.
    return os.environ.get("HF_ENDPOINT") or None


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


@contextlib.contextmanager
def _hub_errors(what: str, repo_id: str, transport: bool = True) -> Iterator[None]:
    """Turn huggingface_hub / HTTP exceptions into one-line llamactl errors (`transport`: network ones too)."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "set HF_TOKEN or run `hf auth login`"
    try:
        yield
    except httpx2.TooManyRedirects:
        raise HubError(f"{what}: the Hub redirected in a loop") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # non-JSON or misshapen API answers
        raise HubError(f"{what}: the Hub sent a malformed answer ({printable(str(exc))[:120]})") from None
    except GatedRepoError:
        raise HubError(_auth_message(repo_id, "gated")) from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: revision not found in {repo_id}") from None
    except EntryNotFoundError:
        raise HubError(f"{what}: not found in {repo_id}") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id}: repository not found on the Hub (private and gated repositories answer the same "
            f"without a valid token: {login})"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(_auth_message(repo_id, str(status))) from None
        raise HubError(f"{what}: the Hub answered HTTP {status}") from None
    except httpx2.HTTPError as exc:
        if not transport:
            raise
        raise HubError(f"{what}: cannot reach the Hub ({type(exc).__name__}: {exc})") from None


def _auth_message(repo_id: str, status: str) -> str:
    token = "the token sent was refused" if _token() else "no token was found (HF_TOKEN or the hf token file)"
    code = "access is gated" if status == "gated" else f"HTTP {status}"
    return (
        f"{repo_id}: access denied ({code}; {token}): gated models such as meta-llama's need you to accept "
        "the licence on the model's page at huggingface.co, then a read token: set HF_TOKEN or run `hf auth login`"
    )


def list_remote(repo_id: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit sha, files) of the repository at `revision` (default branch when None)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=_endpoint())
    with _hub_errors(f"{repo_id}@{revision or 'main'}", repo_id):
        info = api.model_info(repo_id, revision=revision)
        if not info.sha:
            raise HubError(f"{repo_id}: the Hub did not say which commit {revision or 'main'} is")
        tree = list(api.list_repo_tree(repo_id, revision=info.sha, recursive=True))
        files = [
            RemoteFile(
                path=item.path,
                size=item.lfs.size if item.lfs else item.size,
                sha256=item.lfs.sha256 if item.lfs else None,
                git_sha1=None if item.lfs else item.blob_id,
            )
            for item in tree
            if isinstance(item, RepoFile)
        ]
    return info.sha, check_listing(repo_id, sorted(files, key=lambda f: f.path))


_UNSAFE_PATH = re.compile(r"[\\\x00-\x1f\x7f:]")


def check_listing(repo_id: str, files: list[RemoteFile]) -> list[RemoteFile]:
    """Refuse a listing that could write outside the model directory or contradicts itself.

    A Hub (or anything answering at HF_ENDPOINT) decides the paths we write to: every one must
    be a plain relative path that stays inside the staging directory, with a sane size.
    """
    paths = set()
    for f in files:
        shown = printable(str(f.path))[:200]
        parts = PurePosixPath(f.path).parts if isinstance(f.path, str) else ()
        if (
            not parts
            or PurePosixPath(f.path).is_absolute()
            or any(p in ("..", ".") for p in parts)
            or _UNSAFE_PATH.search(f.path)
            or parts[0] in (STATE_FILE, SOURCE_FILE)
        ):
            raise HubError(
                f"{repo_id}: the Hub lists a file {shown!r} that would be written outside the model; refused"
            )
        if not isinstance(f.size, int) or isinstance(f.size, bool) or f.size < 0:
            raise HubError(f"{repo_id}: the Hub lists {shown!r} with an impossible size {f.size!r}")
        if f.path in paths:
            raise HubError(f"{repo_id}: the Hub lists {shown!r} twice")
        paths.add(f.path)
    for path in paths:
        for parent in PurePosixPath(path).parents:
            if str(parent) in paths:
                raise HubError(
                    f"{repo_id}: the Hub lists both a file {printable(str(parent))!r} and {printable(path)!r}"
                )
    return files


# ----------------------------------------------------------------------------- one file


class _Hasher:
    """sha256 for LFS files, git's blob sha1 otherwise."""

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        if remote.sha256:
            self.h = hashlib.sha256()
        else:
            self.h = hashlib.sha1(usedforsecurity=False)
            self.h.update(f"blob {remote.size}\0".encode())

    @property
    def expected(self) -> str | None:
        return self.remote.sha256 or self.remote.git_sha1

    def update(self, data: bytes) -> None:
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _seed(part: Path, remote: RemoteFile) -> tuple[_Hasher, int]:
    """A hasher fed with what an earlier run already wrote, and that many bytes."""
    hasher = _Hasher(remote)
    if not part.exists():
        return hasher, 0
    if part.stat().st_size > remote.size:
        part.unlink()
        return hasher, 0
    done = 0
    with part.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            done += len(chunk)
    return hasher, done


def _fetch(url: str, part: Path, remote: RemoteFile, progress: PullProgress, retries: int, repo_id: str) -> str:
    """Download `url` into `part`, continuing what is there; return the content's hash."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    hasher, done = _seed(part, remote)
    failures = 0
    while done < remote.size or (remote.size == 0 and not part.exists()):
        headers = build_hf_headers(token=_token())
        if done:
            headers["Range"] = f"bytes={done}-"
        try:
            with (
                _hub_errors(remote.path, repo_id, transport=False),
                get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=_TIMEOUT) as response,
            ):
                hf_raise_for_status(response)
                if done and response.status_code != 206:  # the server ignored Range: start over
                    progress.advance(-done)
                    hasher, done = _Hasher(remote), 0
                    part.unlink(missing_ok=True)
                with part.open("ab") as out:
                    for chunk in response.iter_bytes():
                        if done + len(chunk) > remote.size:
                            raise CheckpointError(
                                f"{remote.path}: the server sent more than the {remote.size} bytes listed"
                            )
                        out.write(chunk)
                        hasher.update(chunk)
                        done += len(chunk)
                        progress.advance(len(chunk))
            if remote.size == 0:
                break
            if done < remote.size:
                raise httpx2.RemoteProtocolError("connection closed before the end of the file")
        except httpx2.TransportError as exc:
            failures += 1
            if failures > retries:
                raise HubError(
                    f"{remote.path}: download interrupted at {done} of {remote.size} bytes ({exc}); "
                    "run the same pull again to resume"
                ) from None
            progress.note(f"{remote.path}: connection lost at {done} of {remote.size} bytes; resuming")
            time.sleep(min(_RETRY_WAIT * failures, 5.0))
    return hasher.hexdigest()


def _fetch_verified(
    repo_id: str, commit: str, remote: RemoteFile, staging: Path, progress: PullProgress, retries: int
) -> int:
    """Fetch one file into `staging`, verified; returns bytes transferred. One re-fetch on a bad hash."""
    from huggingface_hub import hf_hub_url

    target = staging / remote.path
    if _verified(staging, remote):
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.resolve().is_relative_to(staging.resolve()):  # a symlink planted in staging
        raise HubError(f"{remote.path}: would be written outside {staging}; refused")
    part = target.with_name(target.name + ".incomplete")
    url = hf_hub_url(repo_id, remote.path, revision=commit, endpoint=_endpoint())
    transferred = 0
    for attempt in (1, 2):
        before = part.stat().st_size if part.exists() else 0
        digest = _fetch(url, part, remote, progress, retries, repo_id)
        transferred += remote.size - before
        expected = _Hasher(remote).expected
        if expected is None or digest == expected:
            os.replace(part, target)
            _mark_verified(staging, remote)
            return transferred
        kind = "sha256" if remote.sha256 else "git sha1"
        part.unlink()
        progress.advance(-remote.size)
        if attempt == 2:
            raise CheckpointError(
                f"{remote.path}: {kind} {digest} does not match the Hub's {expected} even after downloading it "
                "again; the file was removed"
            )
        progress.note(f"{remote.path}: {kind} mismatch (corrupt download); fetching it again")
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- staging state


def _state(staging: Path) -> dict[str, Any]:
    try:
        data = jsonio.loads((staging / STATE_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_state(staging: Path, state: dict[str, Any]) -> None:
    tmp = staging / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, staging / STATE_FILE)


def _verified(staging: Path, remote: RemoteFile) -> bool:
    """Finished and verified in an earlier run (and not touched since)."""
    record = _state(staging).get("verified", {}).get(remote.path)
    target = staging / remote.path
    if not record or not target.is_file():
        return False
    st = target.stat()
    return bool(record == [st.st_size, st.st_mtime_ns] and st.st_size == remote.size)


def _mark_verified(staging: Path, remote: RemoteFile) -> None:
    state = _state(staging)
    st = (staging / remote.path).stat()
    state.setdefault("verified", {})[remote.path] = [st.st_size, st.st_mtime_ns]
    _save_state(staging, state)


def _prepare_staging(staging: Path, repo_id: str, commit: str) -> None:
    """Reuse a previous attempt's staging folder only if it is for the same repository and commit."""
    state = _state(staging)
    if staging.exists() and (state.get("repo_id") != repo_id or state.get("commit") != commit):
        shutil.rmtree(staging)
        state = {}
    staging.mkdir(parents=True, exist_ok=True)
    if not state:
        _save_state(staging, {"repo_id": repo_id, "commit": commit, "verified": {}})


def _already_there(staging: Path, remote: RemoteFile) -> int:
    if _verified(staging, remote):
        return remote.size
    part = staging / (remote.path + ".incomplete")
    return min(part.stat().st_size, remote.size) if part.is_file() else 0


# ----------------------------------------------------------------------------- pull


def pull_model(
    repo_id: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    include: Sequence[str] | None = None,
    progress: PullProgress | None = None,
    retries: int = 3,
) -> PullResult:
    """Download `repo_id` into the store as `name` (default: `short_name(repo_id)`)."""
    if not _REPO_ID.match(repo_id):
        raise UsageError(f"{repo_id!r}: not a Hugging Face repository id (expected owner/name)")
    name = validate_name(name or short_name(repo_id))
    progress = progress or _Silent()
    home = models_home()
    dest = home / name
    if dest.exists() or dest.is_symlink():
        raise DestinationError(
            f"{dest}: a model named {name!r} is already in the store (pass --name, or `llamactl rm {name}` first)"
        )
    commit, remote = list_remote(repo_id, revision)
    wanted = select_files(remote, include)
    if not wanted:
        patterns = ", ".join(include or []) or "(default)"
        raise UsageError(f"{repo_id}: no files match --include {patterns} ({len(remote)} files in the repository)")
    staging = home / f".partial-{name}"
    _prepare_staging(staging, repo_id, commit)
    total = sum(f.size for f in wanted)
    progress.start(total, sum(_already_there(staging, f) for f in wanted), len(wanted))
    downloaded = sum(_fetch_verified(repo_id, commit, f, staging, progress, retries) for f in wanted)
    source = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit": commit,
        "endpoint": _endpoint() or "https://huggingface.co",
        "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": [f.path for f in wanted],
    }
    (staging / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    (staging / STATE_FILE).unlink()
    try:
        rename_noreplace(staging, dest)  # atomic: never over an entry someone made meanwhile
    except FileExistsError:
        raise DestinationError(f"{dest}: appeared while pulling; the download stays in {staging}") from None
    return PullResult(name, dest, repo_id, commit, len(wanted), total, downloaded)
