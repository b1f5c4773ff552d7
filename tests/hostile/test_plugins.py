"""Broken plugins cannot break the core: one that blocks at import, raises KeyboardInterrupt or
SystemExit there. Each is one warning; every built-in command still runs, in bounded time."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests._plugins_util import make_plugin, plugin_site
from tests.cli._run import run_cli
from tests.cli.test_plugins import _run_subprocess
from tests.hostile._contract import TIME_LIMIT_S

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)
__all__ = ["plugin_site"]

SOURCES = {
    "blocks": ("import time\ntime.sleep(3600)\n", "did not finish importing within 1 s (LLAMACTL_PLUGIN_TIMEOUT)"),
    "ctrl-c": ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
    "exits": ("import sys\nsys.exit(7)\n", "sys.exit(7)"),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_plugin_broken_at_import(
    plugin_site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    source, why = SOURCES[case]
    make_plugin(plugin_site, f"evil-{case}", source)  # a module name of its own: a blocked import holds its lock
    monkeypatch.setenv("LLAMACTL_PLUGIN_TIMEOUT", "1")
    start = time.monotonic()
    outcome = run_cli("list", "--json")  # in-process: the warning goes to the real stderr at app build
    assert time.monotonic() - start < 10
    assert outcome.exit_code == 0 and json.loads(outcome.stdout) == [], outcome.stderr
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llamactl: warning: plugin 'evil-{case}'") and why in lines[0], (
        lines
    )
    assert "Traceback" not in outcome.stderr


def test_help_survives_a_plugin_that_blocks_forever(plugin_site: Path) -> None:
    make_plugin(plugin_site, "sleeper", SOURCES["blocks"][0])
    start = time.monotonic()
    done = _run_subprocess(plugin_site, "--help", LLAMACTL_PLUGIN_TIMEOUT="1")
    assert time.monotonic() - start < TIME_LIMIT_S
    assert done.returncode == 0 and "convert" in done.stdout
    assert done.stderr.strip().splitlines() == [
        "llamactl: warning: plugin 'sleeper' did not finish importing within 1 s (LLAMACTL_PLUGIN_TIMEOUT); ignoring it"
    ]


def test_torch_older_than_the_floor_is_refused() -> None:
    """pip can be bypassed: a torch that would run a crafted pickle's code is one line, not a risk."""
    from llamactl.dtypes import _check_torch
    from llamactl.errors import MissingDependencyError

    for ok in ("2.10.0", "2.13.0+cpu", "3.0.0a0"):
        _check_torch(ok)
    for old in ("2.9.1+cu121", "1.13.1", "2"):
        with pytest.raises(
            MissingDependencyError, match=rf"torch {re.escape(old)} is too old: llamactl needs torch >= 2\.10"
        ):
            _check_torch(old)
