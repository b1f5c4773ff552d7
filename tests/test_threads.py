"""--threads: the count torch runs with (default: the physical cores); OpenMP's wait policy is set
before torch loads and never overrides the user's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from llamactl.threads import OPENMP_DEFAULTS, apply_openmp_defaults, default_threads, set_threads
from tests.cli._run import run_cli


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_the_physical_cores() -> None:
    assert default_threads() == (psutil.cpu_count(logical=False) or os.cpu_count())
    assert set_threads() == default_threads() == torch.get_num_threads()
    assert set_threads(1) == 1 == torch.get_num_threads()


def test_openmp_defaults_fill_only_what_the_user_left_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    apply_openmp_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == OPENMP_DEFAULTS["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    apply_openmp_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_entry_point_sets_the_wait_policy_before_torch_loads() -> None:
    code = (
        "import os, sys; from llamactl.cli import main; sys.argv = ['llamactl', '--version']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-2:] == ["PASSIVE", "False"]


def test_bench_reports_the_threads_it_ran_with() -> None:
    out = run_cli(
        "bench",
        "--device",
        "cpu",
        "--ctx",
        "64",
        "--preset",
        "7b",
        "--layers",
        "1",
        "--gen-tokens",
        "4",
        "--prompt-tokens",
        "4",
        "--repeat",
        "1",
        "--threads",
        "1",
        "--json",
    )
    assert out.exit_code == 0, out.stderr
    records = json.loads(out.stdout)
    assert {r["n_threads"] for r in records} == {1}
    assert {r["step"] for r in records if r["test"].startswith("tg")} == {"eager"}  # fp32: not compiled


def test_zero_threads_is_a_usage_error(stories_dir: Path) -> None:
    out = run_cli("generate", str(stories_dir), "hi", "--threads", "0")
    assert out.exit_code == 2 and "'--threads'" in out.stderr and "greater than or equal to 1" in out.stderr
