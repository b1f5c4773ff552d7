"""`llamactl convert` on good and bad input, through the real command."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch

from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint
from tests.cli._run import assert_one_line_error, run_cli, tree_digest


@pytest.fixture
def meta_src(tmp_path: Path) -> Path:
    args = tiny_args()
    return write_meta_checkpoint(tmp_path / "src", args, random_meta_state(args), mp=2)


@pytest.fixture
def hf_src(tmp_path: Path) -> Path:
    args = tiny_args()
    return write_hf_checkpoint(tmp_path / "src-hf", args, random_meta_state(args))


def _bad_convert(src: Path, dst: Path, *fragments: str, to: str = "hf") -> None:
    before = tree_digest(src)
    outcome = run_cli("convert", str(src), str(dst), "--to", to)
    assert_one_line_error(outcome, *fragments)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]  # no temp dir left
    assert tree_digest(src) == before


def test_convert_prints_result_and_writes_hf(meta_src: Path, tmp_path: Path) -> None:
    outcome = run_cli("convert", str(meta_src), str(tmp_path / "out"), "--to", "hf", "--json")
    assert outcome.exit_code == 0, outcome.stderr
    result = json.loads(outcome.stdout)
    assert result["format"] == "hf" and result["src_format"] == "meta"
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_dry_run_prints_plan_and_writes_nothing(meta_src: Path, tmp_path: Path) -> None:
    outcome = run_cli("convert", str(meta_src), str(tmp_path / "out"), "--to", "meta", "--shards", "1", "--dry-run")
    assert outcome.exit_code == 0, outcome.stderr
    assert "consolidated.00.pth" in outcome.stdout and "layers.1.attention.wk.weight  [32, 64]" in outcome.stdout
    assert not (tmp_path / "out").exists()


def test_existing_dst_needs_force(meta_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("convert", str(meta_src), str(dst), "--to", "hf"), "already exists", "--force")
    assert (dst / "keep.txt").read_text() == "mine"
    assert run_cli("convert", str(meta_src), str(dst), "--to", "hf", "--force").exit_code == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()


def test_dst_inside_or_equal_src_is_refused(meta_src: Path) -> None:
    _bad_convert(meta_src, meta_src / "sub", "inside the source")
    before = tree_digest(meta_src)
    assert_one_line_error(
        run_cli("convert", str(meta_src), str(meta_src), "--to", "hf", "--force"), "inside the source"
    )
    assert_one_line_error(
        run_cli("convert", str(meta_src), str(meta_src.parent), "--to", "hf", "--force"), "contains the source"
    )
    assert tree_digest(meta_src) == before


def test_missing_params_json(meta_src: Path, tmp_path: Path) -> None:
    (meta_src / "params.json").unlink()
    _bad_convert(meta_src, tmp_path / "out", "params.json", "not found")


def test_malformed_params_json(meta_src: Path, tmp_path: Path) -> None:
    (meta_src / "params.json").write_text('{"dim": 64,')
    _bad_convert(meta_src, tmp_path / "out", "params.json", "malformed JSON")


def test_malformed_config_json(hf_src: Path, tmp_path: Path) -> None:
    (hf_src / "config.json").write_text("[1, 2]")
    _bad_convert(hf_src, tmp_path / "out", "config.json", "expected a JSON object")


def test_missing_shard_contradicts_params(meta_src: Path, tmp_path: Path) -> None:
    (meta_src / "consolidated.01.pth").unlink()
    _bad_convert(meta_src, tmp_path / "out", "has shape", "params.json implies")


def test_tensor_shape_contradicts_params(meta_src: Path, tmp_path: Path) -> None:
    params = json.loads((meta_src / "params.json").read_text())
    (meta_src / "params.json").write_text(json.dumps(params | {"n_layers": 3}))
    _bad_convert(meta_src, tmp_path / "out", "layers.2", "missing")


def test_truncated_pth(meta_src: Path, tmp_path: Path) -> None:
    shard = meta_src / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _bad_convert(meta_src, tmp_path / "out", "consolidated.01.pth", "truncated")


def test_truncated_safetensors(hf_src: Path, tmp_path: Path) -> None:
    file = hf_src / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    _bad_convert(hf_src, tmp_path / "out", "model.safetensors", "invalid safetensors")


def test_safetensors_header_lying_about_offsets(hf_src: Path, tmp_path: Path) -> None:
    file = hf_src / "model.safetensors"
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 8, end + 8]  # overlaps its neighbour, runs past the end
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    _bad_convert(hf_src, tmp_path / "out", "model.safetensors", "invalid safetensors")


class _RunsCode:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_not_run(meta_src: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker  # type: ignore[attr-defined]
    state = torch.load(meta_src / "consolidated.01.pth", weights_only=True)
    torch.save({**state, "payload": evil}, meta_src / "consolidated.01.pth")
    assert b"system" in (meta_src / "consolidated.01.pth").read_bytes() or sys.platform != "linux"
    _bad_convert(meta_src, tmp_path / "out", "consolidated.01.pth", "refused to load")
    assert not marker.exists()


def test_pickle_protocol_rejects_plain_pickle_too(meta_src: Path, tmp_path: Path) -> None:
    (meta_src / "consolidated.01.pth").write_bytes(pickle.dumps({"a": 1}))
    _bad_convert(meta_src, tmp_path / "out", "consolidated.01.pth")


def test_not_a_llama(hf_src: Path, tmp_path: Path) -> None:
    config = json.loads((hf_src / "config.json").read_text())
    (hf_src / "config.json").write_text(
        json.dumps(config | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    _bad_convert(hf_src, tmp_path / "out", "not a Llama")


def test_not_a_model_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad_convert(empty, tmp_path / "out", "not a model directory")


def test_full_disk_leaves_nothing(meta_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.checkpoint import safetensors_io

    calls = {"n": 0}
    original = safetensors_io.SafetensorsWriter.add_tensor

    def write_until_full(self, name, dtype, shape, tensor, scratch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return original(self, name, dtype, shape, tensor, scratch)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "add_tensor", write_until_full)
    _bad_convert(meta_src, tmp_path / "out", "no space left on device")
    assert calls["n"] > 3


def test_shard_count_that_does_not_divide_heads_is_a_usage_error(meta_src: Path, tmp_path: Path) -> None:
    outcome = run_cli("convert", str(meta_src), str(tmp_path / "out"), "--to", "meta", "--shards", "3")
    assert_one_line_error(outcome, "n_heads 4 is not divisible by 3", code=2)
    assert not (tmp_path / "out").exists()


def test_real_process_error_and_interrupt(tmp_path: Path) -> None:
    """The installed entry point: one stderr line and exit 1; SIGINT mid-write gives 130 and no DST."""
    import signal
    import subprocess
    import time

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "llamactl", "convert", str(tmp_path / "nope"), str(tmp_path / "o"), "--to", "hf"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"llamactl: error: {tmp_path / 'nope'}: no such directory"]

    args = tiny_args(dim=512, n_layers=24, n_heads=8, n_kv_heads=2, vocab_size=4000, multiple_of=256)
    src = write_meta_checkpoint(tmp_path / "big", args, random_meta_state(args), mp=2)
    dst = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-m", "llamactl", "convert", str(src), str(dst), "--to", "meta", "--shards", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # wait until writing has started
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    if child.returncode == 0:
        pytest.skip("conversion finished before the interrupt arrived")
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert not dst.exists() and not list(tmp_path.glob(".out.*")), err
