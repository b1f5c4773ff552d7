"""The real `llamactl serve` as a child process on 127.0.0.1, on a port the OS picks (--port 0).

The child prints its address on stderr once the model is loaded; every later stderr line
(the request log) is collected by a thread so tests can wait for one and the pipe never fills.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_ADDRESS = re.compile(r"at (http://127\.0\.0\.1:\d+)/v1")
START_TIMEOUT_S = 90


def server_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLAMACTL_HOME=str(home), LLAMACTL_LOAD_PLUGINS="")
    env["OMP_NUM_THREADS"] = "1"  # a tiny model decodes fastest on one thread; the box is shared
    env.pop("LLAMACTL_API_KEY", None)
    return env


class Server:
    """`llamactl serve MODEL --port 0 ARGS...`; `url` is http://127.0.0.1:PORT once it is ready."""

    def __init__(self, model: Path, *args: str, home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llamactl", "serve", str(model), "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=server_env(home),
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()
        found = self.wait_for(lambda line: _ADDRESS.search(line) is not None, START_TIMEOUT_S)
        if found is None:
            self.stop()
            raise RuntimeError(f"llamactl serve did not start:\n{self.stderr()}")
        match = _ADDRESS.search(found)
        assert match is not None
        self.url = match.group(1)

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float = 30, start: int = 0) -> str | None:
        """The first stderr line from index `start` on that `match`es, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        seen = start
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and seen == len(self.lines)):
                    return None
                self._changed.wait(min(left, 0.2))

    def log_record(self, rid: str, timeout: float = 30) -> dict[str, Any]:
        """The --json request-log record of response id `rid`."""
        line = self.wait_for(lambda s: s.startswith("{") and f'"id": "{rid}"' in s, timeout)
        assert line is not None, f"no log line for {rid}:\n{self.stderr()}"
        return json.loads(line)

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)
