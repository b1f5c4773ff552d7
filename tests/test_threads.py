"""--threads: the count torch runs with (default: the physical cores less those busy at start);
OpenMP's wait policy is set before torch loads and never overrides the user's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from llamactl.cpu.build import load
from llamactl.threads import BUSY_ENV, WAIT_POLICY, apply_openmp_defaults, default_threads, physical_cores, set_threads
from tests.cli._run import run_cli


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_the_physical_cores_less_the_busy_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    physical = psutil.cpu_count(logical=False) or os.cpu_count()
    assert physical_cores() == default_threads() == physical  # conftest: no core busy
    assert set_threads() == physical == torch.get_num_threads()
    assert set_threads(1) == 1 == torch.get_num_threads()
    monkeypatch.setenv(BUSY_ENV, str(physical))
    assert default_threads() == max(1, physical - physical) == 1  # never fewer than one


def test_openmp_defaults_leave_a_quiet_host_and_the_users_choice_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WAIT_POLICY, raising=False)
    apply_openmp_defaults()
    assert WAIT_POLICY not in os.environ  # libgomp's own: fastest
    monkeypatch.setenv(BUSY_ENV, "1")
    apply_openmp_defaults()
    assert os.environ[WAIT_POLICY] == "PASSIVE"
    monkeypatch.setenv(WAIT_POLICY, "ACTIVE")
    apply_openmp_defaults()
    assert os.environ[WAIT_POLICY] == "ACTIVE"


def _entry_point(args: list[str], env: dict[str, str]) -> list[str]:
    """OMP_WAIT_POLICY, LLAMACTL_BUSY_CORES and whether torch was loaded, after main() ran `args`."""
    code = (
        "import os, sys; from llamactl.cli import main; sys.argv = ['llamactl', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('LLAMACTL_BUSY_CORES'), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    return out.stdout.split()[-3:]


def test_a_core_busy_at_start_means_one_thread_fewer_and_passive_waits(tmp_path: Path) -> None:
    """A real process spinning on a core while llamactl starts (psutil samples the CPUs)."""
    env = {k: v for k, v in os.environ.items() if k not in (WAIT_POLICY, BUSY_ENV)}
    assert _entry_point(["--version"], env) == ["None", "None", "False"]  # no model: no look at the CPUs
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        policy, busy, _ = _entry_point(["generate", "--threads", "0", "x", "y"], env)  # a usage error after the check
    finally:
        hog.kill()
        hog.wait()
    assert int(busy) >= 1 and policy == "PASSIVE"


def test_bench_reports_the_wait_policy_and_busy_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUSY_ENV, "1")
    monkeypatch.setenv(WAIT_POLICY, "PASSIVE")
    out = run_cli(*BENCH_TINY, "--json")
    assert out.exit_code == 0, out.stderr
    record = json.loads(out.stdout)[0]
    assert record["omp_wait_policy"] == "PASSIVE" and record["busy_cores_at_start"] == 1
    assert record["n_threads"] == max(1, physical_cores() - 1)


BENCH_TINY = ("bench", "--device", "cpu", "--ctx", "64", "--preset", "7b", "--layers", "1")
BENCH_TINY += ("--gen-tokens", "4", "--prompt-tokens", "4", "--repeat", "1")


def test_bench_reports_the_threads_it_ran_with() -> None:
    out = run_cli(*BENCH_TINY, "--threads", "1", "--json")
    assert out.exit_code == 0, out.stderr
    records = json.loads(out.stdout)
    assert {r["n_threads"] for r in records} == {1}
    # fp32: not compiled; the native kernels' step where this machine can build them
    want = "fused" if load() is not None else "eager"
    assert {r["step"] for r in records if r["test"].startswith("tg")} == {want}


def test_zero_threads_is_a_usage_error(stories_dir: Path) -> None:
    out = run_cli("generate", str(stories_dir), "hi", "--threads", "0")
    assert out.exit_code == 2 and "'--threads'" in out.stderr and "greater than or equal to 1" in out.stderr
