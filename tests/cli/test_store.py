"""`llamactl list / show / rm / import / pull` driven through the real app."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl import pull
from llamactl.home import models_home
from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint
from tests._store_util import FakeHub, dir_files
from tests.cli._run import assert_one_line_error, run_cli, tree_digest


@pytest.fixture
def meta_dir(tmp_path: Path, tiny_tokenizer: Path) -> Path:
    args = tiny_args()
    return write_meta_checkpoint(tmp_path / "src" / "meta", args, random_meta_state(args), tokenizer=tiny_tokenizer)


def test_empty_store() -> None:
    out = run_cli("list")
    assert out.exit_code == 0 and out.stdout == "" and "no models in" in out.stderr
    assert json.loads(run_cli("list", "--json").stdout) == []


def test_import_list_show_rm(meta_dir: Path) -> None:
    before = tree_digest(meta_dir)
    out = run_cli("import", str(meta_dir), "tiny")
    assert out.exit_code == 0 and out.stdout.startswith(f"copied {meta_dir.resolve()} into the store as tiny")
    assert tree_digest(meta_dir) == before  # a default import leaves the source as it was
    human = run_cli("list").stdout.splitlines()
    assert human[0].split() == ["NAME", "FORMAT", "PARAMS", "DTYPE", "SIZE", "PATH"]
    params = sum(t.numel() for t in random_meta_state(tiny_args()).values())
    assert human[1].split()[:4] == ["tiny", "meta", f"{params / 1e3:.3g}K", "float32"]
    [entry] = json.loads(run_cli("list", "--json").stdout)
    assert entry["params"] == params and entry["path"] == str(models_home() / "tiny")

    shown = json.loads(run_cli("show", "tiny", "--json").stdout)
    root = models_home() / "tiny"
    assert {f["path"]: f["sha256"] for f in shown["files"]} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()
    }
    text = run_cli("show", "tiny").stdout
    assert "format" in text and "llama-2-chat" in text and "consolidated.00.pth" in text

    refused = run_cli("rm", "tiny")  # stdin is not a terminal under the test runner
    assert_one_line_error(refused, "tiny", "--yes", code=2)
    assert root.exists()
    out = run_cli("rm", "tiny", "--yes")
    assert out.exit_code == 0 and out.stdout == "removed tiny\n" and not root.exists()


def test_import_link_and_rm_keep_the_source(meta_dir: Path) -> None:
    before = tree_digest(meta_dir)
    assert run_cli("import", str(meta_dir), "linked", "--link").exit_code == 0
    [entry] = json.loads(run_cli("list", "--json").stdout)
    assert entry["linked_to"] == str(meta_dir.resolve())
    assert run_cli("rm", "linked", "-y").exit_code == 0
    assert tree_digest(meta_dir) == before


def test_bad_input_is_one_line(meta_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("show", "nope"), "nope")
    assert_one_line_error(run_cli("rm", "nope", "--yes"), "nope", "no such model")
    assert_one_line_error(run_cli("import", str(tmp_path / "missing"), "x"), "missing")
    assert_one_line_error(run_cli("import", str(meta_dir), "bad/name"), "not a valid model name", code=2)
    assert run_cli("import", str(meta_dir), "tiny", "--link").exit_code == 0
    assert_one_line_error(run_cli("import", str(meta_dir), "tiny"), "already in the store")
    assert_one_line_error(run_cli("pull", "a/b/c"), "not a Hugging Face repository id", code=2)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, meta_dir: Path) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(pull, "_RETRY_WAIT", 0.0)
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.add_repo("meta-llama/Llama-2-tiny", dir_files(meta_dir), lfs={"consolidated.00.pth", "tokenizer.model"})
        server.add_repo("meta-llama/Llama-2-gated", dir_files(meta_dir), token="s3cret")
        yield server


def test_pull_then_use_by_name(hub: FakeHub, meta_dir: Path) -> None:
    hub.fault("consolidated.00.pth", "corrupt")
    out = run_cli("pull", "meta-llama/Llama-2-tiny")
    assert out.exit_code == 0, out.stderr
    assert out.stdout.startswith("pulled meta-llama/Llama-2-tiny@") and "as tiny" in out.stdout
    assert "mismatch" in out.stderr  # the corrupt first download was noticed and fetched again
    pulled = tree_digest(models_home() / "tiny")
    assert pulled.pop(".llamactl-source.json") and pulled == tree_digest(meta_dir)
    shown = json.loads(run_cli("show", "tiny", "--json").stdout)
    assert shown["source"]["repo_id"] == "meta-llama/Llama-2-tiny" and shown["info"]["format"] == "meta"
    again = json.loads(
        run_cli("pull", "meta-llama/Llama-2-tiny", "--name", "tiny2", "--include", "*.json", "--json").stdout
    )
    assert again["name"] == "tiny2" and again["files"] == 1


def test_pull_gated_without_token(hub: FakeHub) -> None:
    out = run_cli("pull", "meta-llama/Llama-2-gated")
    assert_one_line_error(out, "meta-llama/Llama-2-gated", "401", "gated", "HF_TOKEN", "hf auth login")
    assert not (models_home() / "gated").exists()
