"""Output a person and a script can trust: no wrapping when piped, one number for one fact.

The commands run as real child processes with stdout a pipe (no COLUMNS), as a script sees them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def llamactl(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(PYTHONPATH=str(ROOT), LLAMACTL_HOME=str(home), LLAMACTL_LOAD_PLUGINS="", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def pairs(text: str) -> dict[str, str]:
    """`key   value` lines as a dict (keys are one word or a few words, then two spaces)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("  ")
        out[key.strip()] = value.strip()
    return out


def assert_unwrapped(text: str) -> None:
    for line in text.splitlines():
        assert line == line.rstrip(), f"trailing spaces: {line!r}"


@pytest.fixture
def long_copy(tmp_path: Path, stories_dir: Path) -> Path:
    """stories260K under a 150-character directory name: every path line is longer than 80 columns."""
    import shutil

    dst = tmp_path / ("stories-" + "x" * 142)
    shutil.copytree(stories_dir, dst)
    return dst


def test_info_is_never_wrapped_when_piped(long_copy: Path, tmp_path: Path) -> None:
    out = llamactl("info", str(long_copy), home=tmp_path / "home").stdout
    assert_unwrapped(out)
    fields = pairs(out)
    assert fields["path"] == str(long_copy)  # one line, whole
    assert fields["tokenizer"] == str(long_copy / "tokenizer.model")
    assert "\x1b" not in out


def test_quantize_report_is_never_wrapped_when_piped(long_copy: Path, tmp_path: Path) -> None:
    dst = tmp_path / ("q8-" + "y" * 120)
    out = llamactl("quantize", str(long_copy), str(dst), "--bits", "8", "--no-eval", home=tmp_path / "home").stdout
    assert_unwrapped(out)
    fields = pairs(out)
    assert fields["wrote"] == str(dst)
    assert re.fullmatch(
        r"\d\.\d{3} quantized tensors \(scales included\), \d+\.\d{3} whole model", fields["bits per weight"]
    )
    # info on the result: the quantization line is whole too
    info = pairs(llamactl("info", str(dst), home=tmp_path / "home").stdout)
    assert re.fullmatch(r".+, [\d.]+ bits per quantized weight", info["quantization"])


def test_info_show_and_list_agree_on_parameters_and_size(stories_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    llamactl("import", "--link", str(stories_dir), "s260", home=home)
    info, show = pairs(llamactl("info", "s260", home=home).stdout), pairs(llamactl("show", "s260", home=home).stdout)
    listed = llamactl("list", home=home).stdout.splitlines()
    row = dict(
        zip(["NAME", "FORMAT", "PARAMS", "DTYPE", "SIZE"], [c for c in listed[1].split("  ") if c], strict=False)
    )
    assert info["parameters"] == show["parameters"] == "292,800 (293K)"
    assert row["PARAMS"].strip() == "293K"
    size = row["SIZE"].strip()
    assert info["on disk"].startswith(f"{size} in 5 file(s)") and show["size"] == f"{size} in 5 file(s)"
    # and the JSON of all three is one number
    info_j = json.loads(llamactl("info", "s260", "--json", home=home).stdout)
    show_j = json.loads(llamactl("show", "s260", "--json", home=home).stdout)
    list_j = json.loads(llamactl("list", "--json", home=home).stdout)
    assert info_j["bytes_on_disk"] == show_j["size"] == list_j[0]["size"]
    assert info_j["parameters"] == show_j["info"]["parameters"] == list_j[0]["params"] == 292_800
    assert info_j["weight_bytes_on_disk"] == (stories_dir / "consolidated.00.pth").stat().st_size
