"""An input that shrinks after it was opened: a short read naming the input, never a SIGBUS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamactl.checkpoint import open_checkpoint
from llamactl.errors import CheckpointError
from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint
from tests.hostile._contract import TIME_LIMIT_S

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_truncated_after_open(tmp_path: Path, fmt: str) -> None:
    args = tiny_args()
    state = random_meta_state(args)
    if fmt == "meta":
        path = write_meta_checkpoint(tmp_path / "m", args, state)
        victim = path / "consolidated.00.pth"
    else:
        path = write_hf_checkpoint(tmp_path / "h", args, state)
        victim = path / "model.safetensors"
    reader = open_checkpoint(path)
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{victim.name}: ended after \d+ of the \d+ bytes of tensor"):
        for _ in reader.iter_tensors():
            pass
