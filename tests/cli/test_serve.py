"""`llamactl serve` as a command: cheap --help, one-line errors, the open-host warning, the queue
bound, and real SIGINT / SIGTERM on a real server with a request in flight."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests._chat_util import STORIES, need
from tests.cli._run import assert_one_line_error, run_cli
from tests.server._server import Server, server_env

pytestmark = pytest.mark.timeout(120)

_PROBE = """
import sys
sys.argv = ["llamactl", *sys.argv[1:]]
from llamactl.cli import build_app
try:
    build_app()(prog_name="llamactl")
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "fastapi", "uvicorn", "starlette") if m in sys.modules)
print("IMPORTED", ",".join(heavy) or "-", file=sys.stderr)
"""


def serve_cmd(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamactl", "serve", *args],
        capture_output=True,
        text=True,
        env=server_env(tmp_path / "home"),
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]])
def test_help_imports_no_server_or_torch(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=False)
    assert out.stderr.strip().splitlines()[-1] == "IMPORTED -", out.stderr
    assert "serve" in out.stdout


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_port_in_use_is_one_line_before_loading(tmp_path: Path, taken_port: int) -> None:
    start = time.monotonic()
    done = serve_cmd(tmp_path, str(tmp_path / "no-such-model"), "--port", str(taken_port))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"llamactl: error: cannot listen on 127.0.0.1:{taken_port}: the port is in use\n"
    assert time.monotonic() - start < 30


def test_open_host_warns_without_api_key(tmp_path: Path, taken_port: int) -> None:
    """The warning comes first, before the port is even tried."""
    args = (str(tmp_path / "m"), "--host", "0.0.0.0", "--port", str(taken_port))
    lines = serve_cmd(tmp_path, *args).stderr.strip().splitlines()
    assert lines[0].startswith("llamactl: warning: --host 0.0.0.0: anyone who can reach") and "--api-key" in lines[0]
    assert lines[1:] == [f"llamactl: error: cannot listen on 0.0.0.0:{taken_port}: the port is in use"]
    keyed = serve_cmd(tmp_path, *args, "--api-key", "k")
    assert keyed.returncode == 1 and "warning" not in keyed.stderr


def test_empty_api_key_is_a_usage_error(tmp_path: Path) -> None:
    done = serve_cmd(tmp_path, str(tmp_path / "m"), "--port", "0", "--api-key", " ")
    assert done.returncode == 2 and done.stderr.startswith("llamactl: error: --api-key (or LLAMACTL_API_KEY) is empty")
    assert len(done.stderr.splitlines()) == 1


def _stream_lines(resp: httpx.Response):  # type: ignore[no-untyped-def]
    return (line for line in resp.iter_lines() if line)


@pytest.mark.slow
def test_queue_bound_then_sigterm_mid_stream(tmp_path: Path) -> None:
    """--queue 0: one request runs, the next is a 429; SIGTERM cancels the stream and exits 143."""
    srv = Server(need(STORIES), "--name", "s", "--queue", "0", home=tmp_path / "home")
    try:
        body = {"model": "s", "messages": [{"role": "user", "content": "A long story"}], "temperature": 0}
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=30) as r:
            lines = _stream_lines(r)
            assert next(lines).startswith("data: ") and next(lines).startswith("data: ")  # it is decoding
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="s", messages=body["messages"], max_tokens=2)
            assert caught.value.code == "queue_full" and caught.value.response.headers["retry-after"] == "1"
            start = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert time.monotonic() - start < 10
        assert "data: [DONE]" not in rest and "shutting down" in json.loads(rest[-1][6:])["error"]["message"]
        code = srv.proc.wait(30)
    finally:
        srv.stop()
    assert code == 143, srv.stderr()
    assert srv.lines[-2:] == [
        "llamactl: stopped serving; 1 request(s) in flight were cancelled",
        "llamactl: terminated",
    ]
    assert "Traceback" not in srv.stderr()


def test_missing_server_packages_are_one_line_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import llamactl.server

    monkeypatch.setattr(llamactl.server, "REQUIRED", ("fastapi", "no_such_package_for_serve"))
    out = run_cli("serve", "any-model", "--port", "0")
    assert_one_line_error(out, "llamactl serve needs no_such_package_for_serve: pip install 'llamactl[serve]'")


@pytest.mark.slow
def test_tp_2_serves_what_one_process_serves(tmp_path: Path) -> None:
    """--tp 2 (two gloo ranks, this server rank 0): the greedy answer equals `generate`'s, and
    SIGTERM ends both ranks."""
    model = need(STORIES)
    srv = Server(model, "--name", "s", "--tp", "2", home=tmp_path / "home")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        answer = client.completions.create(model="s", prompt="Once upon a time", max_tokens=24, temperature=0)
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(30)
    finally:
        srv.stop()
    assert code == 143, srv.stderr()
    plain = run_cli("generate", str(model), "Once upon a time", "-n", "24", "-t", "0")
    assert answer.choices[0].text == plain.stdout.removesuffix("\n")
    assert "Traceback" not in srv.stderr()
