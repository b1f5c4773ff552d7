"""Hostile weight files through the real commands: forged safetensors headers (duplicate names,
not an object, deep nesting, terminal escapes in a name), a 4-bit quant_state naming a torch
function as its dtype. One line naming the file; nothing written; the input unchanged."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint
from tests.cli._run import run_cli
from tests.hostile._contract import TIME_LIMIT_S, assert_refused, snapshot

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)
ENTRY = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tiny_args()
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "h", args, random_meta_state(args))


def _forge(path: Path, header: bytes, data: bytes = b"\0" * 4) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


HEADERS = {
    "duplicate-key": (f'{{"a": {ENTRY}, "a": {ENTRY}}}'.encode(), "duplicate tensor name 'a'"),
    "not-an-object": (b'  ["not", "an", "object"]', "the header is not a JSON object"),
    "deep-nesting": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "escapes-in-a-name": (
        json.dumps({"\x1b]0;pwned\x07\x1b[2J": json.loads(ENTRY)}).encode(),
        "\\x1b]0;pwned\\x07\\x1b[2J",
    ),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_forged_safetensors_header(hf_dir: Path, tmp_path: Path, case: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    header, why = HEADERS[case]
    _forge(src / "model.safetensors", header)
    before = snapshot(tmp_path)
    for command in (("info", str(src)), ("convert", str(src), str(tmp_path / "out"), "--to", "meta")):
        assert_refused(run_cli(*command), "model.safetensors: ", why, root=tmp_path, before=before)


@pytest.fixture(scope="module")
def nf4_dir(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llamactl.convert import plan_convert, run_convert
    from llamactl.quantize import QuantSpec

    dst = tmp_path_factory.mktemp("nf4") / "q"
    run_convert(plan_convert(hf_dir, dst, quant=QuantSpec("nf4"), device="cpu"))
    return dst


@pytest.mark.parametrize(
    ("field", "value"), [("dtype", "load"), ("nested_dtype", "__import__"), ("quant_type", "nf5"), ("shape", [0, 64])]
)
def test_quant_state_that_names_a_torch_function(nf4_dir: Path, tmp_path: Path, field: str, value: object) -> None:
    """bitsandbytes resolves `dtype` with getattr(torch, ...): "load" would reach torch.load."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(nf4_dir, src)
    tensors = load_file(src / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("quant_state.bitsandbytes__nf4"))
    state = json.loads(bytes(tensors[key].tolist())) | {field: value}
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(tmp_path)
    for command in (("info", str(src)), ("convert", str(src), str(tmp_path / "out"), "--to", "hf")):
        outcome = run_cli(*command)
        assert_refused(outcome, "malformed 4-bit quant_state", f"{field} {value!r}"[:40], root=tmp_path, before=before)
