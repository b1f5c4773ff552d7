"""Hostile text: dialogs nested 100k deep or holding 5000-digit integers, invalid UTF-8 on stdin
or in an argument, lone surrogates, a seed no generator takes. One line each, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint
from tests.cli._run import run_cli
from tests.hostile._contract import TIME_LIMIT_S, assert_refused, snapshot

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path) -> Path:
    args = tiny_args()
    return write_meta_checkpoint(
        tmp_path_factory.mktemp("tiny") / "m", args, random_meta_state(args), tokenizer=tiny_tokenizer
    )


DIALOGS = {
    "deep": ("[" * 100_000 + "]" * 100_000, "malformed JSON: nested too deeply"),
    "deep-content": ('[{"role": "user", "content": ' + "[" * 5000 + "]" * 5000 + "}]", "nested too deeply"),
    "huge-int": ('[{"role": "user", "content": ' + "1" * 5000 + "}]", "malformed JSON: Exceeds the limit"),
    "lone-surrogate": ('[{"role": "user", "content": "hi \\ud800"}]', "not valid UTF-8 text (lone surrogate U+D800"),
    "not-utf8": (b'[{"role": "user", "content": "\xff"}]', "cannot read"),
}


@pytest.mark.parametrize("case", list(DIALOGS))
def test_tokenize_hostile_dialog(model: Path, tmp_path: Path, case: str) -> None:
    text, why = DIALOGS[case]
    dialog = tmp_path / "dialog.json"
    dialog.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(tmp_path)
    outcome = run_cli("tokenize", "-m", str(model), "--chat", str(dialog))
    fragment = "text:" if case == "lone-surrogate" else str(dialog)
    assert_refused(outcome, fragment, why, root=tmp_path, before=before)


@pytest.mark.parametrize(
    "command",
    [("tokenize", "-m", "{m}"), ("generate", "{m}", "-n", "2"), ("chat", "{m}", "-n", "2")],
    ids=["tokenize", "generate", "chat"],
)
def test_invalid_utf8_on_stdin(model: Path, command: tuple[str, ...]) -> None:
    args = [a.format(m=model) for a in command]
    outcome = run_cli(*args, input=b"caf\xc3 \xff\xfe\n")
    assert_refused(outcome, "stdin: not valid UTF-8 text (byte 0xc3 at character 3)")


def test_invalid_utf8_in_an_argument(model: Path) -> None:
    text = b"a\xffb".decode("utf-8", "surrogateescape")  # what Python makes of such an argv
    assert_refused(run_cli("tokenize", "-m", str(model), text), "text: not valid UTF-8 text (byte 0xff")


@pytest.mark.parametrize("seed", [str(10**25), str(-(10**25))])
def test_seed_no_generator_takes(model: Path, seed: str) -> None:
    for command in (("generate", str(model), "hi", "-n", "2"), ("chat", str(model), "--prompt", "hi", "-n", "2")):
        assert_refused(run_cli(*command, "--seed", seed), "seed must fit in 64 bits", "digits)")


def test_json_error_object_on_stdout(model: Path, tmp_path: Path) -> None:
    outcome = run_cli("info", str(tmp_path / "missing"), "--json")
    assert outcome.exit_code == 1
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llamactl: error: {tmp_path / 'missing'}: no such directory")
    message = lines[0].removeprefix("llamactl: error: ")
    assert json.loads(outcome.stdout) == {"schema": 1, "error": {"message": message, "code": 1}}


def test_json_documents_carry_a_schema(model: Path) -> None:
    info = json.loads(run_cli("info", str(model), "--json").stdout)
    assert info["schema"] == 1
    line = run_cli("generate", str(model), "hi", "-n", "2", "--seed", "1", "--json").stdout.splitlines()[0]
    assert json.loads(line)["schema"] == 1
