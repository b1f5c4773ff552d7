"""Odd terminals and impatient users, on real child processes: Ctrl-C and Ctrl-D in quick
succession at the REPL, a benchmark interrupted half-way, usage errors read by a script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path) -> Path:
    args = tiny_args(max_seq_len=2048)
    return write_meta_checkpoint(
        tmp_path_factory.mktemp("tiny") / "m", args, random_meta_state(args), tokenizer=tiny_tokenizer
    )


def _spawn(*args: str, home: Path):  # -> pexpect.spawn
    import pexpect

    env = dict(os.environ, PYTHONPATH=str(ROOT), LLAMACTL_HOME=str(home), TERM="xterm", COLUMNS="200")
    return pexpect.spawn(args[0], list(args[1:]), env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))


@pytest.mark.slow
@pytest.mark.parametrize("gap_s", [0.0, 0.07])
def test_repl_message_ctrl_c_ctrl_d_in_quick_succession_exits_0(model: Path, tmp_path: Path, gap_s: float) -> None:
    """Whichever part of the turn the Ctrl-C lands in (reading, prefill, spinner, streaming), it
    cancels that turn only; the Ctrl-D then leaves with 0, never the 130 of an escaped interrupt."""
    import pexpect

    child = _spawn(sys.executable, "-m", "llamactl", "chat", str(model), "-t", "0", "-n", "3", home=tmp_path)
    child.delaybeforesend = None
    child.expect_exact(">>> ")
    child.send("abc\r")
    time.sleep(gap_s)
    child.sendintr()
    time.sleep(gap_s)
    child.sendeof()
    if child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=15) == 1:
        # The tty itself can eat that Ctrl-D: typed while it is in canonical mode (mid-answer) it
        # becomes an EOF mark that readline, once it switches to raw mode, reads as a NUL. What
        # matters is that the REPL is alive at its prompt, not dead with 130: leave it by /exit.
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    child.close()
    assert (child.exitstatus, child.signalstatus) == (0, None), child.before
    assert "Traceback" not in child.before and "llamactl: interrupted" not in child.before


@pytest.mark.slow
def test_bench_interrupted_prints_the_rows_it_has(model: Path, tmp_path: Path) -> None:
    """SIGINT once the second configuration runs: the first configuration's rows are printed."""
    out = tmp_path / "rows.jsonl"
    # Long decodes: the status line redraws a few times a second, and a short one can come and go unseen.
    bench = f"--ctx 2048,1536,1024 --gen-tokens 800 --prompt-tokens 16 --repeat 1 --warmup 0 -o jsonl > {out}"
    child = _spawn("sh", "-c", f"exec {sys.executable} -m llamactl bench {model} {bench}", home=tmp_path)
    child.expect_exact("tg800 @ d736")  # ctx 1536's decode, on the status line (stderr is the terminal)
    child.kill(signal.SIGINT)
    child.expect("llamactl: interrupted")
    child.expect(__import__("pexpect").EOF)
    child.close()
    assert child.exitstatus == 130
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["n_ctx"], r["test"]) for r in rows] == [(2048, "pp16"), (2048, "tg800 @ d1248")]
    assert all(r["avg_ts"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("convert", "x"), "llamactl: error: Missing argument 'DST'. (see 'llamactl convert --help')"),
        (("info", "--bogus"), "llamactl: error: No such option: --bogus (see 'llamactl info --help')"),
        (
            ("generate", "x", "-n", "many"),
            "llamactl: error: Invalid value for '--max-new-tokens' / '-n': Input should be a valid integer, "
            "unable to parse string as an integer (see 'llamactl generate --help')",
        ),
    ],
    ids=["missing-argument", "unknown-option", "bad-value"],
)
def test_usage_error_is_one_line_when_stderr_is_not_a_terminal(args: tuple[str, ...], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [message]


def test_usage_error_with_json_is_also_an_object_on_stdout() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llamactl", "info", "--json", "--bogus"], capture_output=True, text=True, timeout=60
    )
    message = "No such option: --bogus (see 'llamactl info --help')"
    assert done.returncode == 2 and done.stderr.splitlines() == [f"llamactl: error: {message}"]
    assert json.loads(done.stdout) == {"schema": 1, "error": {"message": message, "code": 2}}
