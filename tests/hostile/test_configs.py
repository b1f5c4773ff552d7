"""Hostile params.json / config.json: every lie is one line naming the file, before anything is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint
from tests.cli._run import run_cli
from tests.hostile._contract import TIME_LIMIT_S, assert_refused, snapshot

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tiny_args()
    return write_meta_checkpoint(tmp_path_factory.mktemp("meta") / "m", args, random_meta_state(args))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tiny_args()
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "h", args, random_meta_state(args))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


PARAMS = [
    ({"n_heads": 0}, "dim, n_layers and n_heads must be positive"),
    ({"n_layers": 10**9}, "n_layers 1000000000 > 4096"),
    ({"max_seq_len": 10**12}, "max_seq_len 1000000000000 > 2097152"),
    ({"norm_eps": float("nan")}, "norm_eps must be positive"),
    ({"norm_eps": -1e-5}, "norm_eps must be positive"),
    ({"rope_theta": 0}, "rope_theta must be positive"),
    ({"dim": "64"}, "field 'dim' should be a number"),
    ({"ffn_dim_multiplier": 1e400}, "ffn_dim_multiplier"),
]


@pytest.mark.parametrize(("change", "why"), PARAMS, ids=[f"params-{next(iter(c))}" for c, _ in PARAMS])
def test_lying_params_json(meta_dir: Path, tmp_path: Path, change: dict[str, object], why: str) -> None:
    src = _copy(meta_dir, tmp_path / "src")
    params = json.loads((src / "params.json").read_text()) | change
    (src / "params.json").write_text(json.dumps(params))  # NaN and 1e400 are written as NaN / Infinity
    before = snapshot(tmp_path)
    for command in (("info", str(src)), ("convert", str(src), str(tmp_path / "out"), "--to", "hf")):
        assert_refused(run_cli(*command), "params.json", why, root=tmp_path, before=before)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"dim": 1' + "0" * 5000 + "}", "malformed JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"dim": 64', "malformed JSON"),
        ('"just a string"', "expected a JSON object"),
    ],
    ids=["5000-digits", "deep-nesting", "truncated", "not-an-object"],
)
def test_unparsable_params_json(meta_dir: Path, tmp_path: Path, text: str, why: str) -> None:
    src = _copy(meta_dir, tmp_path / "src")
    (src / "params.json").write_text(text)
    before = snapshot(tmp_path)
    assert_refused(run_cli("info", str(src)), "params.json", why, root=tmp_path, before=before)


CONFIGS = [
    ({"rope_theta": "abc"}, "field 'rope_theta' should be a number"),
    ({"architectures": 5}, "field 'architectures' should be a list"),
    ({"quantization_config": "bnb"}, "quantization_config must be an object"),
    ({"num_hidden_layers": 10**9}, "n_layers 1000000000 > 4096"),
    ({"head_dim": "x"}, "field 'head_dim' should be a number"),
    ({"model_type": "gpt2\x1b[31m", "architectures": []}, "not a Llama checkpoint"),
]


@pytest.mark.parametrize(("change", "why"), CONFIGS, ids=[f"config-{next(iter(c))}" for c, _ in CONFIGS])
def test_lying_config_json(hf_dir: Path, tmp_path: Path, change: dict[str, object], why: str) -> None:
    src = _copy(hf_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text()) | change
    (src / "config.json").write_text(json.dumps(config))
    before = snapshot(tmp_path)
    assert_refused(run_cli("info", str(src)), "config.json", why, root=tmp_path, before=before)


def test_llm_int8_threshold_that_is_not_a_number(hf_dir: Path, tmp_path: Path) -> None:
    from llamactl.quantize import QuantSpec

    src = _copy(hf_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QuantSpec("int8").to_hf_config() | {"llm_int8_threshold": "abc"}
    (src / "config.json").write_text(json.dumps(config))
    assert_refused(run_cli("info", str(src)), "config.json", "bad quantization_config")


def test_tokenizer_that_is_a_git_lfs_pointer(meta_dir: Path, tmp_path: Path) -> None:
    src = _copy(meta_dir, tmp_path / "src")
    (src / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 499723\n")
    before = snapshot(tmp_path)
    outcome = run_cli("convert", str(src), str(tmp_path / "out"), "--to", "hf")
    assert_refused(outcome, "tokenizer.model", "Git LFS pointer", root=tmp_path, before=before)


def test_embedding_with_more_rows_than_the_tokenizer(tmp_path: Path, tiny_tokenizer: Path) -> None:
    args = tiny_args(vocab_size=400)  # the tiny tokenizer has 320 pieces
    src = write_meta_checkpoint(tmp_path / "src", args, random_meta_state(args), tokenizer=tiny_tokenizer)
    before = snapshot(tmp_path)
    outcome = run_cli("convert", str(src), str(tmp_path / "out"), "--to", "hf")
    assert_refused(
        outcome, "tokenizer.model", "320 pieces but the embedding has 400 rows", root=tmp_path, before=before
    )


def test_index_whose_total_size_lies(hf_dir: Path, tmp_path: Path) -> None:
    args = tiny_args()
    src = write_hf_checkpoint(tmp_path / "src", args, random_meta_state(args), max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 1
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(run_cli("info", str(src)), "model.safetensors.index.json", "total_size")


def test_nan_weights_are_converted_with_a_warning(tmp_path: Path) -> None:
    import torch

    args = tiny_args()
    state = random_meta_state(args)
    state["layers.1.feed_forward.w2.weight"][0, 0] = float("nan")
    src = write_meta_checkpoint(tmp_path / "src", args, state)
    outcome = run_cli("convert", str(src), str(tmp_path / "out"), "--to", "hf")
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stderr.strip().splitlines() == [
        f"llamactl: warning: {src}: tensor layers.1.feed_forward.w2.weight holds NaN or Inf values"
    ]
    assert torch.isnan(torch.load(src / "consolidated.00.pth")["layers.1.feed_forward.w2.weight"][0, 0])
