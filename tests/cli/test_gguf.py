"""GGUF through the real commands: every MODEL argument takes a .gguf; hostile files get one line."""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from llamactl.home import models_home
from tests._ckpt import random_meta_state, tiny_args
from tests._gguf import write_reference_gguf
from tests.cli._run import assert_one_line_error, run_cli


@pytest.fixture
def gguf_file(tmp_path: Path, tiny_tokenizer: Path) -> Path:
    """A tiny GGUF written the llama.cpp way, with a SentencePiece vocabulary."""
    args = tiny_args()
    return write_reference_gguf(tmp_path / "src" / "tiny.gguf", args, random_meta_state(args), tokenizer=tiny_tokenizer)


@pytest.fixture
def stories_gguf(tmp_path: Path, stories_dir: Path) -> Path:
    out = tmp_path / "stories.gguf"
    assert run_cli("convert", str(stories_dir), str(out), "--to", "gguf").exit_code == 0
    return out


# ----------------------------------------------------------------------------- hostile files


def _tensor_info_at(raw: bytes, name: str) -> int:
    """Byte offset of the n_dims field that follows tensor `name` in the tensor-info section."""
    encoded = name.encode()
    return raw.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def _set_tensor(
    raw: bytes, name: str, *, dim0: int | None = None, ggml_type: int | None = None, offset: int | None = None
) -> bytes:
    at = _tensor_info_at(raw, name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    out = bytearray(raw)
    if dim0 is not None:  # the outer dim (rows): GGUF dims are innermost first
        struct.pack_into("<Q", out, at + 4 + 8 * (n_dims - 1), dim0)
    if ggml_type is not None:
        struct.pack_into("<I", out, at + 4 + 8 * n_dims, ggml_type)
    if offset is not None:
        struct.pack_into("<Q", out, at + 8 + 8 * n_dims, offset)
    return bytes(out)


def _after_key(raw: bytes, key: str) -> int:
    encoded = key.encode()
    return raw.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def _architecture(raw: bytes, arch: bytes) -> bytes:
    at = _after_key(raw, "general.architecture") + 4 + 8  # value type, string length
    return raw[:at] + arch + raw[at + len(arch) :]


def _uint32(raw: bytes, key: str, value: int) -> bytes:
    at = _after_key(raw, key) + 4  # value type UINT32
    return raw[:at] + struct.pack("<I", value) + raw[at + 4 :]


def _array_count(raw: bytes, key: str, count: int) -> bytes:
    at = _after_key(raw, key) + 4 + 4  # value type ARRAY, item type
    return raw[:at] + struct.pack("<Q", count) + raw[at + 8 :]


Corruption = Callable[[bytes], bytes]
HOSTILE: dict[str, tuple[Corruption, str]] = {
    "empty": (lambda raw: b"", "truncated: 0 bytes"),
    "truncated-data": (lambda raw: raw[: len(raw) // 2], "truncated, or its offsets lie"),
    "truncated-header": (lambda raw: raw[:300], "truncated: the file ends inside"),
    "bad-magic": (lambda raw: b"GGML" + raw[4:], "not a GGUF file"),
    "bad-version": (lambda raw: raw[:4] + struct.pack("<I", 99) + raw[8:], "unsupported GGUF version 99"),
    "big-endian": (lambda raw: raw[:4] + struct.pack(">I", 3) + raw[8:], "big-endian"),
    "offset-overlaps": (lambda raw: _set_tensor(raw, "blk.0.attn_q.weight", offset=0), "overlaps tensor"),
    "offset-past-end": (lambda raw: _set_tensor(raw, "output.weight", offset=1 << 30), "truncated, or its offsets lie"),
    "offset-misaligned": (lambda raw: _set_tensor(raw, "output.weight", offset=4), "not a multiple of the alignment"),
    "size-past-end": (lambda raw: _set_tensor(raw, "output.weight", dim0=1 << 40), "truncated, or its offsets lie"),
    "size-lies": (lambda raw: _set_tensor(raw, "token_embd.weight", dim0=160), "has shape [160, 64]"),
    "unknown-type": (lambda raw: _set_tensor(raw, "blk.1.ffn_up.weight", ggml_type=99), "ggml type 99 (unknown)"),
    "unsupported-type": (lambda raw: _set_tensor(raw, "blk.1.ffn_up.weight", ggml_type=16), "ggml type IQ2_XXS"),
    "not-llama": (lambda raw: _architecture(raw, b"gemma"), "architecture 'gemma' is not supported"),
    "zero-heads": (lambda raw: _uint32(raw, "llama.attention.head_count", 0), "head_count is 0, expected >= 1"),
    "layers-lie": (lambda raw: _uint32(raw, "llama.block_count", 1 << 30), "n_layers 1073741824 > 4096"),
    "array-length-lies": (
        lambda raw: _array_count(raw, "tokenizer.ggml.tokens", 1 << 50),
        "claims 1125899906842624 entries",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_gguf_is_one_line_and_writes_nothing(case: str, gguf_file: Path, tmp_path: Path) -> None:
    corrupt, fragment = HOSTILE[case]
    bad = gguf_file.with_name("bad.gguf")
    bad.write_bytes(corrupt(gguf_file.read_bytes()))
    before = bad.read_bytes()
    assert_one_line_error(run_cli("info", str(bad)), str(bad), fragment)
    for to, dst in (("hf", tmp_path / "out"), ("gguf", tmp_path / "out.gguf")):
        assert_one_line_error(run_cli("convert", str(bad), str(dst), "--to", to), str(bad), fragment)
        assert not dst.exists()
    assert_one_line_error(run_cli("import", str(bad), "bad"), str(bad), fragment)
    assert not (models_home() / "bad").exists()
    assert sorted(p.name for p in bad.parent.iterdir()) == ["bad.gguf", "tiny.gguf"] and bad.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_two_gguf_files_in_a_directory_need_a_choice(gguf_file: Path) -> None:
    (gguf_file.parent / "copy.gguf").write_bytes(gguf_file.read_bytes())
    assert_one_line_error(run_cli("info", str(gguf_file.parent)), "holds 2 .gguf files", "copy.gguf, tiny.gguf")


# ----------------------------------------------------------------------------- commands


def test_info_reports_ggml_types_and_bits(tmp_path: Path, stories_dir: Path) -> None:
    out = tmp_path / "q8.gguf"
    assert run_cli("convert", str(stories_dir), str(out), "--to", "gguf", "--gguf-type", "q8_0").exit_code == 0
    report = json.loads(run_cli("info", str(out), "--json").stdout)
    assert report["format"] == "gguf" and report["dtype"] == "Q8_0" and report["files"] == 1
    assert report["storage"]["tensor_types"] == {"Q8_0": 30, "F32": 18}  # ffn_down (172 wide) stays F32
    assert 8 < report["storage"]["bits_per_weight"] < 32
    human = run_cli("info", str(out)).stdout
    assert "GGUF v3: Q8_0 ×30, F32 ×18" in human


def test_convert_to_gguf_contract(tmp_path: Path, stories_dir: Path) -> None:
    dst = tmp_path / "s.gguf"
    plan = run_cli("convert", str(stories_dir), str(dst), "--to", "gguf", "--gguf-type", "q4_0", "--dry-run")
    assert plan.exit_code == 0 and "blk.0.attn_q.weight  [64, 64]  Q4_0" in plan.stdout and not dst.exists()
    done = run_cli("convert", str(stories_dir), str(dst), "--to", "gguf", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout)["files"][0]["name"] == "s.gguf" and dst.is_file()
    assert_one_line_error(run_cli("convert", str(stories_dir), str(dst), "--to", "gguf"), "already exists", "--force")
    assert run_cli("convert", str(stories_dir), str(dst), "--to", "gguf", "--force", "--dtype", "fp16").exit_code == 0
    assert json.loads(run_cli("info", str(dst), "--json").stdout)["storage"]["tensor_types"]["F16"] == 37
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    assert_one_line_error(
        run_cli("convert", str(stories_dir), str(folder), "--to", "gguf", "--force"), "is a directory"
    )
    assert_one_line_error(run_cli("convert", str(stories_dir), str(tmp_path / "x"), "--to", "gguf"), "*.gguf", code=2)
    assert_one_line_error(
        run_cli("convert", str(stories_dir), str(tmp_path / "h"), "--to", "hf", "--gguf-type", "q8_0"),
        "applies to the gguf format only",
        code=2,
    )
    assert_one_line_error(
        run_cli("convert", str(stories_dir), str(tmp_path / "y.gguf"), "--to", "gguf", "--gguf-type", "q2_k"),
        "q8_0, q4_0",
        code=2,
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "llamactl-home") == ["folder.gguf", "s.gguf"]


def test_full_disk_leaves_no_partial_gguf(tmp_path: Path, stories_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.checkpoint import gguf_write

    calls = {"n": 0}

    def until_full(original):  # type: ignore[no-untyped-def]
        def write(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls["n"] += 1  # the fourth tensor written (plain or encoded) finds the disk full
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(*args, **kwargs)

        return write

    monkeypatch.setattr(gguf_write, "_encode", until_full(gguf_write._encode))
    monkeypatch.setattr(gguf_write, "write_tensor", until_full(gguf_write.write_tensor))
    dst = tmp_path / "s.gguf"
    assert_one_line_error(run_cli("convert", str(stories_dir), str(dst), "--to", "gguf"), "no space left on device")
    assert os.listdir(tmp_path) == []


def test_gguf_to_hf_and_meta(tmp_path: Path, gguf_file: Path) -> None:
    for to in ("hf", "meta"):
        out = run_cli("convert", str(gguf_file), str(tmp_path / to), "--to", to, "--json")
        assert out.exit_code == 0, out.stderr
        assert json.loads(out.stdout)["src_format"] == "gguf" and (tmp_path / to / "tokenizer.model").is_file()
    assert (
        json.loads(run_cli("info", str(tmp_path / "hf"), "--json").stdout)["parameters"]
        == json.loads(run_cli("info", str(gguf_file), "--json").stdout)["parameters"]
    )


def test_store_import_move_and_link(tmp_path: Path, gguf_file: Path) -> None:
    moved = gguf_file.with_name("moved.gguf")
    moved.write_bytes(gguf_file.read_bytes())
    assert run_cli("import", str(moved), "moved", "--move").exit_code == 0
    assert not moved.exists() and (models_home() / "moved" / "moved.gguf").is_file()
    assert run_cli("import", "--link", str(gguf_file), "linked").exit_code == 0
    entries = {e["name"]: e for e in json.loads(run_cli("list", "--json").stdout)}
    assert entries["moved"]["format"] == entries["linked"]["format"] == "gguf"
    assert entries["linked"]["linked_to"] == str(gguf_file.resolve()) and entries["moved"]["linked_to"] is None
    shown = json.loads(run_cli("show", "linked", "--json").stdout)
    assert shown["info"]["storage"]["tensor_types"] == {"F32": 21} and shown["files"][0]["path"] == "tiny.gguf"
    assert "storage" in run_cli("show", "moved").stdout
    direct = json.loads(run_cli("show", str(gguf_file), "--json").stdout)
    assert direct["files"][0]["sha256"] == shown["files"][0]["sha256"]
    assert run_cli("rm", "linked", "--yes").exit_code == 0
    assert gguf_file.is_file() and not (models_home() / "linked").exists()
    before = gguf_file.read_bytes()
    copied = json.loads(run_cli("import", str(gguf_file), "copied", "--json").stdout)
    assert copied["mode"] == "copy" and gguf_file.read_bytes() == before
    assert (models_home() / "copied" / gguf_file.name).read_bytes() == before
    assert_one_line_error(run_cli("import", str(tmp_path / "nope.gguf"), "x"), "nope.gguf")
    (tmp_path / "notes.txt").write_text("hi")
    assert_one_line_error(run_cli("import", str(tmp_path / "notes.txt"), "x"), "is a file", code=1)


def test_generate_tokenize_chat_bench_run_on_a_gguf(stories_gguf: Path, stories_dir: Path) -> None:
    ids = run_cli("tokenize", "-m", str(stories_gguf), "Once upon a time")
    assert ids.exit_code == 0 and ids.stdout.split() == ["1", "403", "407", "261", "378"]
    args = ("Once upon a time", "-t", "0", "-n", "40", "--device", "cpu")
    ours = run_cli("generate", str(stories_gguf), *args)
    assert ours.exit_code == 0, ours.stderr
    assert ours.stdout == run_cli("generate", str(stories_dir), *args).stdout and "Lily" in ours.stdout
    chat = run_cli("chat", str(stories_gguf), "-p", "Hi", "-t", "0", "-n", "5", "--device", "cpu")
    assert chat.exit_code == 0, chat.stderr
    bench = run_cli(
        "bench", str(stories_gguf), "--ctx", "32", "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1",
        "--warmup", "0", "--device", "cpu", "--json",
    )  # fmt: skip
    assert bench.exit_code == 0, bench.stderr
    rows = json.loads(bench.stdout)
    assert rows and all(row["model_filename"] == str(stories_gguf) and row["n_layer"] == 5 for row in rows)
