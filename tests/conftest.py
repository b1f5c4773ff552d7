"""Shared fixtures: tiny checkpoints in every layout, the real fixtures, a tiny tokenizer."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests._chat_util import FIXTURES, LLAMA2_TOKENIZER, STORIES, need, train_tiny_tokenizer
from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint

__all__ = ["FIXTURES", "need"]


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Path:
    return need(LLAMA2_TOKENIZER)


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return need(STORIES)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320-piece SentencePiece BPE model with byte fallback, trained here."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def _kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _kernel_cache: Path) -> None:
    """Never touch the user's real model store; load no installed plugins unless a test asks."""
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "llamactl-home"))
    # The native decode kernels, built once for the whole run (not once per test's home and process).
    monkeypatch.setenv("LLAMACTL_KERNEL_CACHE", str(_kernel_cache))
    monkeypatch.setenv("LLAMACTL_LOAD_PLUGINS", "")
    # The README's first command installs the demo package into the same venv the tests run in:
    # its `smollm2` source would show up in every `list` and name lookup. Tests of sources ask.
    monkeypatch.setenv("LLAMACTL_MODEL_SOURCES", "")
    # Compiling a 16-bit CPU model's decode step (the default) takes tens of seconds per model;
    # tests/engine/test_compiled.py covers that step and the default choice.
    monkeypatch.setenv("LLAMACTL_COMPILE", "0")


@pytest.fixture
def meta_gqa_mp2(tmp_path: Path, tiny_tokenizer: Path) -> Path:
    """A GQA model in Meta layout split over 2 model-parallel shards, with a tokenizer."""
    args = tiny_args(gqa=True)
    return write_meta_checkpoint(
        tmp_path / "meta-gqa-mp2", args, random_meta_state(args), mp=2, tokenizer=tiny_tokenizer
    )


@pytest.fixture
def hf_gqa(tmp_path: Path, tiny_tokenizer: Path) -> Path:
    """A GQA model written by transformers' save_pretrained, with a tokenizer."""
    args = tiny_args(gqa=True)
    path = write_hf_checkpoint(tmp_path / "hf-gqa", args, random_meta_state(args, seed=1))
    (path / "tokenizer.model").write_bytes(tiny_tokenizer.read_bytes())
    return path


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# A suite started as a background job (`cmd &` in a script) inherits SIGINT ignored, and so would
# every child process it starts, which then shrug off the Ctrl-C the signal tests send.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
