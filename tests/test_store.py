"""The model store: import (copy / move / link), list, show with cached sha256, rm."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from llamactl import store
from llamactl.checkpoint import list_model_names
from llamactl.errors import CheckpointError, DestinationError, ModelNotFoundError, UsageError
from llamactl.home import models_home
from llamactl.store import file_hashes, import_model, list_models, remove_model, show_model, validate_name
from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint
from tests.cli._run import tree_digest


@pytest.fixture
def meta_dir(tmp_path: Path, tiny_tokenizer: Path) -> Path:
    args = tiny_args()
    return write_meta_checkpoint(tmp_path / "src" / "meta", args, random_meta_state(args), tokenizer=tiny_tokenizer)


def _disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_models_home_follows_llamactl_home(tmp_path: Path) -> None:
    assert models_home() == tmp_path / "llamactl-home" / "models"


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "../x", "x y", "-x"])
def test_validate_name_rejects_paths_and_oddities(bad: str) -> None:
    with pytest.raises(UsageError):
        validate_name(bad)


def test_import_copies_by_default_and_list_describes(meta_dir: Path) -> None:
    size = _disk_size(meta_dir)
    before = tree_digest(meta_dir)
    result = import_model(meta_dir, "tiny")
    dest = result.path
    assert dest == models_home() / "tiny" and tree_digest(meta_dir) == before == tree_digest(dest)
    assert result.mode == "copy" and result.how in ("reflink", "hardlink", "copy")
    [entry] = list_models()
    state = random_meta_state(tiny_args())
    assert entry.name == "tiny" and entry.format == "meta" and entry.error is None
    assert entry.params == sum(t.numel() for t in state.values())
    assert entry.dtype == "float32" and entry.quantization is None
    assert entry.size == size and entry.path == str(dest) and entry.linked_to is None


def test_import_link_keeps_source_and_rm_only_unlinks(meta_dir: Path) -> None:
    before = tree_digest(meta_dir)
    dest = import_model(meta_dir, "linked", mode="link").path
    assert dest.is_symlink() and Path(os.readlink(dest)) == meta_dir.resolve()
    assert list_models()[0].linked_to == str(meta_dir.resolve())
    remove_model("linked")
    assert not dest.exists() and not dest.is_symlink()
    assert tree_digest(meta_dir) == before


def test_import_refuses_non_checkpoints_and_taken_names(meta_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError):
        import_model(junk, "junk")
    assert (junk / "notes.txt").read_text() == "hello" and list_model_names() == []
    with pytest.raises(ModelNotFoundError, match="is a file"):
        import_model(junk / "notes.txt", "junk")
    with pytest.raises(ModelNotFoundError):
        import_model(tmp_path / "missing", "x")
    import_model(meta_dir, "tiny", mode="link")
    with pytest.raises(DestinationError, match="already in the store"):
        import_model(meta_dir, "tiny")
    with pytest.raises(DestinationError, match="inside the store"):
        import_model(models_home() / "tiny", "again")


def test_import_move_takes_the_source(meta_dir: Path) -> None:
    before = tree_digest(meta_dir)
    result = import_model(meta_dir, "moved", mode="move")
    assert not meta_dir.exists() and result.how == "rename" and tree_digest(result.path) == before


def test_import_ctx_records_a_meta_models_trained_context(meta_dir: Path) -> None:
    from llamactl.checkpoint import open_checkpoint
    from llamactl.checkpoint.base import trained_context

    assert trained_context(open_checkpoint(meta_dir)) is None  # params.json says nothing
    assert import_model(meta_dir, "tiny", ctx=256).trained_context == 256
    reader = open_checkpoint("tiny")
    assert trained_context(reader) == 256 and reader.args.max_seq_len == 256
    assert trained_context(open_checkpoint(meta_dir)) is None  # the source is untouched
    with pytest.raises(UsageError, match="--link would write into"):
        import_model(meta_dir, "linked", mode="link", ctx=256)


def test_show_hashes_files_once(meta_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import_model(meta_dir, "tiny")
    data = show_model("tiny")
    root = models_home() / "tiny"
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}
    assert {f["path"]: f["sha256"] for f in data["files"]} == expected
    assert {f["path"]: f["size"] for f in data["files"]} == {p.name: p.stat().st_size for p in root.iterdir()}
    assert data["info"]["format"] == "meta" and data["info"]["n_layers"] == 2
    assert data["config"]["dim"] == 64 and data["info"]["tokenizer"].endswith("tokenizer.model")
    assert data["chat_template"] == "llama-2-chat"

    calls: list[Path] = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p, progress=None: calls.append(p) or real(p, progress))
    show_model("tiny")
    assert calls == []  # served from the cache
    params = root / "params.json"
    params.write_text(params.read_text() + " ")  # size and mtime change: hash again
    files = sorted(root.iterdir())
    assert file_hashes(files)[params] == hashlib.sha256(params.read_bytes()).hexdigest()
    assert calls == [params]


def test_show_accepts_a_path(meta_dir: Path) -> None:
    assert show_model(str(meta_dir))["info"]["format"] == "meta"


def test_rm_removes_and_unknown_names_list_what_exists(meta_dir: Path) -> None:
    import_model(meta_dir, "tiny")
    with pytest.raises(ModelNotFoundError, match="models: tiny"):
        remove_model("other")
    with pytest.raises(UsageError):
        remove_model("../src")
    remove_model("tiny")
    assert list_model_names() == [] and list(models_home().iterdir()) == []


def test_list_reports_a_broken_model_without_failing(meta_dir: Path) -> None:
    import_model(meta_dir, "good")
    broken = models_home() / "broken"
    broken.mkdir()
    (broken / "params.json").write_text("{not json")
    entries = {e.name: e for e in list_models()}
    assert entries["good"].error is None
    assert entries["broken"].error and "params.json" in entries["broken"].error
