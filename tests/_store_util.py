"""A loopback-only imitation of the Hugging Face Hub for pull tests, and store helpers.

It serves in-memory repositories in the Hub's layout: `/api/models/<repo>/revision/<rev>`
(model info), `/api/models/<repo>/tree/<rev>` (file listing with sizes, git blob ids and LFS
sha256) and `/<repo>/resolve/<rev>/<path>` (file bytes, with Range support). It can inject
faults per file: `corrupt` (flip a byte), `drop` (send half the body, then close the socket).
It binds 127.0.0.1 only, answers at most `max_requests` requests and shuts itself down after
`lifetime` seconds, so a failing test cannot leave it running.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def git_blob_sha1(data: bytes) -> str:
    """What `git hash-object` prints: the id of a blob, as the Hub lists non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str]
    commit: str
    token: str | None = None  # gated: requests need "Authorization: Bearer <token>"


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    auth: str | None


@dataclass
class FakeHub:
    max_requests: int = 400
    lifetime: float = 120.0
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    # Hostile behaviour: a listing to serve instead of the real one, a raw API body (not
    # JSON), or a redirect of every request to itself.
    tree_items: list[dict[str, Any]] | None = None
    api_body: bytes | None = None
    redirect_loop: bool = False

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], lfs: set[str] | None = None, token: str | None = None
    ) -> str:
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        repo = Repo(dict(files), set(lfs or ()), commit.hexdigest(), token)
        self.repos[repo_id] = repo
        return repo.commit

    def fault(self, path: str, kind: str, times: int = 1) -> None:
        """The next `times` GETs of `path` misbehave (`corrupt` or `drop`)."""
        self.faults.setdefault(path, []).extend([kind] * times)

    def gets(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and "/resolve/" in s.path and s.path.endswith("/" + path)]

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            owner = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(self.lifetime, self.server.shutdown)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/?]+))?(?:/[^?]*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        hub = self.owner
        path = self.path.split("?", 1)[0]
        hub.seen.append(Seen(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
        if len(hub.seen) > hub.max_requests:
            self._send(503, b"request budget exhausted")
            threading.Thread(target=hub.server.shutdown, daemon=True).start()
            return
        if hub.redirect_loop:
            self._send(302, b"", {"Location": self.path})
            return
        if hub.api_body is not None and path.startswith("/api/"):
            self._send(200, hub.api_body, {"Content-Type": "application/json"})
            return
        match = _API.match(path) or _RESOLVE.match(path)
        repo = hub.repos.get(match.group("repo")) if match else None
        if repo is None:
            self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            return
        if repo.token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                self._send(401, b'{"error": "Invalid credentials in Authorization header"}')
                return
            if auth != f"Bearer {repo.token}":
                self._send(403, b'{"error": "Access to this model is restricted."}', {"X-Error-Code": "GatedRepo"})
                return
        rev = match.group("rev") if "rev" in match.groupdict() else None
        if rev not in (None, "main", repo.commit):
            self._send(404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"})
            return
        if path.startswith("/api/"):
            self._api(match.group("repo"), repo, match.group("kind"))
        else:
            self._file(repo, match.group("path"), head)

    def _api(self, repo_id: str, repo: Repo, kind: str | None) -> None:
        if kind == "tree":
            items = []
            for name, data in sorted(repo.files.items()):
                item: dict[str, Any] = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                if name in repo.lfs:
                    item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
                    item["size"] = len(data)
                items.append(item)
            body: Any = items if self.owner.tree_items is None else self.owner.tree_items
        else:
            body = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.token else False,
                "siblings": [{"rfilename": name} for name in sorted(repo.files)],
            }
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _file(self, repo: Repo, name: str, head: bool) -> None:
        if name not in repo.files:
            self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            return
        data = repo.files[name]
        start = 0
        status = 200
        extra = {"X-Repo-Commit": repo.commit, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if ranged:
            start = int(ranged.group(1))
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        fault = self.owner.faults.get(name, [])
        kind = fault.pop(0) if fault and not head else None
        if kind == "corrupt" and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if kind == "drop":
            self.send_response(status)
            for key, value in {**extra, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, b"" if head else body, extra, length=len(body))

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, length: int | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)


def dir_files(path: Path) -> dict[str, bytes]:
    """Every file under `path` by relative path, as a repository's contents."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
