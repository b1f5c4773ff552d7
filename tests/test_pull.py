"""`pull_model` against a local imitation of the Hub: success, resume, corrupt files, auth errors."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llamactl import pull
from llamactl.checkpoint import list_model_names, open_checkpoint
from llamactl.errors import CheckpointError, DestinationError, ModelNotFoundError, UsageError
from llamactl.home import models_home
from llamactl.pull import HubError, RemoteFile, pull_model, select_files, short_name
from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint
from tests._store_util import FakeHub, dir_files, git_blob_sha1

REPO = "meta-llama/Llama-2-tiny-hf"
LFS = {"model.safetensors", "tokenizer.model"}


@pytest.fixture(scope="session")
def hf_repo_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path) -> Path:
    """A tiny HF checkpoint as transformers writes it, plus a README and a redundant .bin."""
    path = write_hf_checkpoint(tmp_path_factory.mktemp("repo") / "tiny", tiny_args(), random_meta_state(tiny_args()))
    shutil.copy(tiny_tokenizer, path / "tokenizer.model")
    (path / "README.md").write_text("# tiny\n")
    (path / "pytorch_model.bin").write_bytes(b"not needed when safetensors exist")
    return path


class Recorder:
    def __init__(self) -> None:
        self.notes: list[str] = []
        self.total = self.done = self.advanced = 0

    def start(self, total: int, done: int, files: int) -> None:
        self.total, self.done = total, done

    def advance(self, nbytes: int) -> None:
        self.advanced += nbytes

    def note(self, message: str) -> None:
        self.notes.append(message)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """The fake Hub as HF_ENDPOINT, with no token from the developer's environment."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(pull, "_RETRY_WAIT", 0.0)
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def repo(hub: FakeHub, hf_repo_dir: Path) -> dict[str, bytes]:
    files = dir_files(hf_repo_dir)
    hub.add_repo(REPO, files, lfs=LFS)
    return files


def test_git_blob_id_matches_git(tmp_path: Path) -> None:
    """The fake Hub's ids for non-LFS files are git's own blob ids."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    file = tmp_path / "x.json"
    file.write_bytes(b'{"a": 1}\n')
    assert subprocess.check_output([git, "hash-object", str(file)], text=True).strip() == git_blob_sha1(
        file.read_bytes()
    )


@pytest.mark.parametrize(
    ("repo_id", "name"),
    [
        ("meta-llama/Llama-2-7b-chat-hf", "7b-chat"),
        ("meta-llama/Llama-2-13b-hf", "13b"),
        ("meta-llama/Llama-2-70b-chat", "70b-chat"),
        ("TheBloke/Llama-2-7B-Chat-GPTQ", "7b-chat-gptq"),
        ("karpathy/tinyllamas", "tinyllamas"),
        ("gpt2", "gpt2"),
    ],
)
def test_short_name(repo_id: str, name: str) -> None:
    assert short_name(repo_id) == name


def test_select_files_skips_redundant_weights_only_beside_safetensors() -> None:
    files = [RemoteFile(p, 1) for p in ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.model")]
    assert [f.path for f in select_files(files, None)] == ["config.json", "model.safetensors", "tokenizer.model"]
    meta = [RemoteFile(p, 1) for p in ("params.json", "consolidated.00.pth", "tokenizer.model")]
    assert select_files(meta, None) == meta
    assert [f.path for f in select_files(files, ["*.json", "tok*"])] == ["config.json", "tokenizer.model"]


def test_pull_downloads_verifies_and_opens(hub: FakeHub, repo: dict[str, bytes]) -> None:
    rec = Recorder()
    result = pull_model(REPO, progress=rec)
    assert result.name == "tiny" and result.path == models_home() / "tiny"
    assert result.commit == hub.repos[REPO].commit
    got = dir_files(result.path)
    assert got.pop(".llamactl-source.json")
    expected = {k: v for k, v in repo.items() if k != "pytorch_model.bin"}
    assert got == expected
    assert hub.gets("pytorch_model.bin") == []
    assert rec.total == rec.advanced == sum(map(len, expected.values()))
    assert list_model_names() == ["tiny"]  # no staging folder left visible
    assert not any(p.name.startswith(".partial") for p in models_home().iterdir())
    # The pulled model opens by name, with the weights the repository holds.
    reader = open_checkpoint("tiny")
    state = random_meta_state(tiny_args())
    tensors = dict(reader.iter_tensors())
    assert tensors.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensors[name], tensor, rtol=0, atol=0)


def test_pull_refuses_an_existing_name_before_downloading(hub: FakeHub, repo: dict[str, bytes]) -> None:
    (models_home() / "tiny").mkdir(parents=True)
    with pytest.raises(DestinationError, match="already in the store"):
        pull_model(REPO)
    assert hub.seen == []
    pull_model(REPO, name="tiny-2", include=["*.json"])
    assert sorted(p.name for p in (models_home() / "tiny-2").iterdir()) == [
        ".llamactl-source.json",
        "config.json",
        "generation_config.json",
    ]


def test_interrupted_pull_resumes_with_a_range_request(hub: FakeHub, repo: dict[str, bytes]) -> None:
    size = len(repo["model.safetensors"])
    hub.fault("model.safetensors", "drop")
    with pytest.raises(HubError, match=r"interrupted at .* run the same pull again to resume"):
        pull_model(REPO, retries=0)
    assert list_model_names() == []
    part = models_home() / ".partial-tiny" / "model.safetensors.incomplete"
    assert part.stat().st_size == size // 2
    rec = Recorder()
    result = pull_model(REPO, progress=rec)
    gets = hub.gets("model.safetensors")
    assert [g.range for g in gets] == [None, f"bytes={size // 2}-"]
    assert rec.done >= size // 2  # the bar starts where the last run stopped
    assert (result.path / "model.safetensors").read_bytes() == repo["model.safetensors"]
    # Files finished by the first run were verified then and are not fetched again.
    assert len(hub.gets("config.json")) == 1


def test_dropped_connection_resumes_within_one_run(hub: FakeHub, repo: dict[str, bytes]) -> None:
    hub.fault("model.safetensors", "drop", times=2)
    rec = Recorder()
    result = pull_model(REPO, progress=rec, retries=3)
    ranges = [g.range for g in hub.gets("model.safetensors")]
    assert ranges[0] is None and all(r is not None and r.startswith("bytes=") for r in ranges[1:])
    assert len(ranges) == 3 and any("connection lost" in n for n in rec.notes)
    assert (
        hashlib.sha256((result.path / "model.safetensors").read_bytes()).hexdigest()
        == hashlib.sha256(repo["model.safetensors"]).hexdigest()
    )


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json"])  # LFS sha256 and git blob sha1
def test_corrupt_download_is_detected_and_fetched_again(hub: FakeHub, repo: dict[str, bytes], victim: str) -> None:
    hub.fault(victim, "corrupt")
    rec = Recorder()
    result = pull_model(REPO, progress=rec)
    assert (result.path / victim).read_bytes() == repo[victim]
    assert len(hub.gets(victim)) == 2
    assert any("mismatch" in n and victim in n for n in rec.notes)


def test_persistently_corrupt_file_fails_and_leaves_nothing(hub: FakeHub, repo: dict[str, bytes]) -> None:
    hub.fault("model.safetensors", "corrupt", times=2)
    with pytest.raises(CheckpointError, match=r"sha256 .* does not match"):
        pull_model(REPO)
    assert list_model_names() == []
    staging = models_home() / ".partial-tiny"
    assert not (staging / "model.safetensors").exists()
    assert not (staging / "model.safetensors.incomplete").exists()


def test_corrupt_partial_from_an_earlier_run_is_replaced(hub: FakeHub, repo: dict[str, bytes]) -> None:
    hub.fault("model.safetensors", "drop")
    with pytest.raises(HubError):
        pull_model(REPO, retries=0)
    part = models_home() / ".partial-tiny" / "model.safetensors.incomplete"
    data = bytearray(part.read_bytes())
    data[10] ^= 0x55  # bit rot in the kept half
    part.write_bytes(bytes(data))
    result = pull_model(REPO)
    assert (result.path / "model.safetensors").read_bytes() == repo["model.safetensors"]
    assert [g.range for g in hub.gets("model.safetensors")][-1] is None  # re-fetched from scratch


def test_gated_repo_without_token_explains_tokens(hub: FakeHub, hf_repo_dir: Path) -> None:
    hub.add_repo(REPO, dir_files(hf_repo_dir), lfs=LFS, token="s3cret")
    with pytest.raises(HubError) as err:
        pull_model(REPO)
    message = str(err.value)
    assert "401" in message and "HF_TOKEN" in message and "gated" in message and "no token was found" in message
    assert "\n" not in message
    assert not models_home().exists() or list_model_names() == []


def test_gated_repo_with_a_wrong_token_is_403(hub: FakeHub, hf_repo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, dir_files(hf_repo_dir), lfs=LFS, token="s3cret")
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(HubError, match=r"access denied .*refused.*HF_TOKEN"):
        pull_model(REPO)


def test_gated_repo_with_token_from_env(hub: FakeHub, hf_repo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, dir_files(hf_repo_dir), lfs=LFS, token="s3cret")
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    pull_model(REPO, include=["*.json"])
    assert all(s.auth == "Bearer s3cret" for s in hub.seen)


def test_gated_repo_with_token_file(
    hub: FakeHub, hf_repo_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    hub.add_repo(REPO, dir_files(hf_repo_dir), lfs=LFS, token="s3cret")
    (tmp_path / "token").write_text("s3cret\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert pull_model(REPO, include=["config.json"]).files == 1


def test_unknown_repo_and_revision(hub: FakeHub, repo: dict[str, bytes]) -> None:
    with pytest.raises(ModelNotFoundError, match="repository not found"):
        pull_model("nobody/nothing")
    with pytest.raises(HubError, match="revision not found"):
        pull_model(REPO, revision="v9")
    with pytest.raises(UsageError, match="no files match"):
        pull_model(REPO, include=["*.gguf"])
    with pytest.raises(UsageError, match="not a Hugging Face repository id"):
        pull_model("a/b/c")
