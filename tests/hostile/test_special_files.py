"""Special files where regular ones belong: a FIFO named like a shard, a link to /dev/zero."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint
from tests._plugins_util import make_plugin, plugin_site
from tests.cli._run import run_cli
from tests.hostile._contract import TIME_LIMIT_S, assert_refused, snapshot

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)
__all__ = ["plugin_site"]


def test_fifo_named_like_a_shard(tmp_path: Path) -> None:
    args = tiny_args()
    src = write_meta_checkpoint(tmp_path / "src", args, random_meta_state(args))
    os.mkfifo(src / "consolidated.01.pth")  # opening it for reading would block forever
    before = snapshot(tmp_path / "src")
    outcome = run_cli("convert", str(src), str(tmp_path / "out"), "--to", "hf")
    assert_refused(outcome, "consolidated.01.pth", "not a regular file", root=tmp_path / "src", before=before)
    assert not (tmp_path / "out").exists()


def test_show_skips_a_link_to_dev_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    args = tiny_args()
    write_meta_checkpoint(tmp_path / "home" / "models" / "tiny", args, random_meta_state(args))
    (tmp_path / "home" / "models" / "tiny" / "notes.bin").symlink_to("/dev/zero")
    outcome = run_cli("show", "tiny", "--json")
    assert outcome.exit_code == 0, outcome.stderr
    assert "notes.bin" not in outcome.stdout


def test_plugin_format_whose_detect_raises_does_not_break_convert(tmp_path: Path, plugin_site: Path) -> None:
    make_plugin(
        plugin_site,
        "baddetect",
        """
from llamactl.plugins import hookimpl

@hookimpl
def register_formats(register):
    from llamactl.checkpoint.formats import CheckpointFormat

    def detect(path):
        raise RuntimeError("detect exploded")

    register(CheckpointFormat("bad", detect, lambda path: None))
""",
    )
    args = tiny_args()
    src = write_meta_checkpoint(tmp_path / "src", args, random_meta_state(args))
    outcome = run_cli("convert", str(src), str(tmp_path / "out"), "--to", "hf")
    assert outcome.exit_code == 0, outcome.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    assert "plugin 'baddetect': format 'bad' raised (RuntimeError: detect exploded); ignored" in outcome.stderr
