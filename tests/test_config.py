from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamactl.config import PRESETS, ModelArgs, args_from_hf_config, args_from_params, get_preset, hf_config_from_args
from llamactl.errors import ConfigError, UsageError


@pytest.mark.parametrize(("name", "hidden", "kv_heads"), [("7b", 11008, 32), ("13b", 13824, 40), ("70b", 28672, 8)])
def test_presets_have_meta_ffn_widths(name: str, hidden: int, kv_heads: int) -> None:
    for preset in (name, f"{name}-chat"):
        args = get_preset(preset)
        assert args.hidden_dim == hidden
        assert args.kv_heads == kv_heads


def test_70b_shape_is_published_one() -> None:
    args = PRESETS["70b"]
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.head_dim) == (8192, 80, 64, 8, 128)
    assert args.attention_kind == "GQA"


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(UsageError, match="7b, 13b, 70b"):
        get_preset("8b")


@pytest.mark.parametrize("name", ["7b", "13b", "70b"])
def test_hf_config_round_trip_recovers_ffn_recipe(name: str) -> None:
    args = get_preset(name)
    back = args_from_hf_config(hf_config_from_args(args, "float16"), Path("config.json"))
    assert back.hidden_dim == args.hidden_dim
    assert (back.dim, back.n_layers, back.n_heads, back.kv_heads) == (
        args.dim,
        args.n_layers,
        args.n_heads,
        args.kv_heads,
    )


def test_odd_intermediate_size_found_or_refused() -> None:
    data = hf_config_from_args(ModelArgs(dim=64, n_layers=1, n_heads=8, multiple_of=4), "float32")
    assert args_from_hf_config(data, Path("c.json")).hidden_dim == 172  # stories260K's width
    data["intermediate_size"] = 171
    args = args_from_hf_config(data, Path("c.json"))
    assert args.hidden_dim == 171


def test_params_json_with_vocab_minus_one(tmp_path: Path) -> None:
    data = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    args = args_from_params(data, tmp_path / "params.json")
    assert args.vocab_size == -1 and args.hidden_dim == 11008


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"n_layers": 2, "n_heads": 4}, "missing required field 'dim'"),
        ({"dim": "64", "n_layers": 2, "n_heads": 4}, "'dim' should be a number"),
        ({"dim": 64, "n_layers": 2, "n_heads": 5}, "not divisible by n_heads"),
        ({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 3}, "not a multiple of n_kv_heads"),
    ],
)
def test_bad_params_name_the_file_and_field(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        args_from_params(data, tmp_path / "params.json")
    assert "params.json" in str(err.value)


def test_non_llama_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a Llama checkpoint"):
        args_from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, Path("config.json"))


def test_params_dump_is_accepted_by_meta_model_args() -> None:
    # Meta's reference ModelArgs(max_seq_len=..., **params) must accept what we write.
    from llamactl.checkpoint.meta import meta_params

    params = meta_params(get_preset("70b"))
    meta_fields = {
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "multiple_of",
        "ffn_dim_multiplier",
        "norm_eps",
        "max_batch_size",
    }
    assert set(params) <= meta_fields
    assert json.loads(json.dumps(params))["ffn_dim_multiplier"] == 1.3
