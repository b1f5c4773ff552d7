"""Listening and serving: the socket is bound first (a taken port fails before any weight is
read), then uvicorn serves the app on it until SIGINT or SIGTERM.

On the first signal everything queued or running is cancelled at once, so streams end within
one decode step and the process exits without waiting for long answers; uvicorn then closes
the connections, the app's lifespan stops the model threads, and the signal is raised again
for the caller (the CLI exits 130 or 143 as every command does). A second Ctrl-C forces it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

from llamactl.errors import LlamactlError

GRACE_S = 5  # how long in-flight responses may take to finish after a stop signal


class ListenError(LlamactlError):
    """The address cannot be listened on (taken, not this machine's, not permitted)."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one, see `sock.getsockname()`)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ListenError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(app: Any, sock: socket.socket, on_stop: Callable[[], object]) -> None:
    """Serve `app` on `sock` until a stop signal; `on_stop()` runs on the first one."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                on_stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # the app logs one line per request itself
        lifespan="on",
        timeout_graceful_shutdown=GRACE_S,
        timeout_keep_alive=5,
    )
    _Server(config).run(sockets=[sock])
