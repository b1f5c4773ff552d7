"""Helpers for the chat/generate tests: a tiny trained tokenizer, tiny random models, HF twins.

The Hugging Face twin comes from tests._ckpt.hf_reference_model, written from transformers'
own convert_llama_weights_to_hf.py rules independently of llamactl.checkpoint, so comparing
against LlamaForCausalLM checks our model and generation code rather than our converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamactl.config import ModelArgs
from llamactl.model import Transformer
from tests._ckpt import hf_reference_model

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
LLAMA2_TOKENIZER = FIXTURES / "llama2-tokenizer.model"
STORIES = FIXTURES / "stories260K"


def need(path: Path) -> Path:
    """The real fixture at path, or skip with THE reason (README: "Test fixtures")."""
    if not path.exists():
        import pytest

        pytest.skip(f"needs ../shared/fixtures/{path.relative_to(FIXTURES)} (not present; README: Test fixtures)")
    return path


TINY_VOCAB = 320
_CORPUS = [
    "Once upon a time there was a little robot who loved to read books about the sea.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "She said hello to her friends and they played in the park until the evening came.",
    "Numbers like 12 345 and 6789 appear in stories too, with names such as Lily and Tom.",
    "What is the answer? It is simple: be kind, be brave, and tell the truth every day.",
    "The weather was cold, so the children wore warm coats, hats and long red scarves.",
]


def train_tiny_tokenizer(directory: Path, vocab_size: int = TINY_VOCAB) -> Path:
    """A SentencePiece BPE model like Llama's (byte fallback, split digits), trained in a second."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def tiny_args(gqa: bool = False, vocab_size: int = TINY_VOCAB, max_seq_len: int = 256) -> ModelArgs:
    return ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2 if gqa else None,
        vocab_size=vocab_size,
        multiple_of=32,
        max_seq_len=max_seq_len,
    )


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """Seeded random weights, scaled up so logits are well separated (no near-ties for argmax)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5 if name in ("tok_embeddings.weight", "output.weight") else 0.15)
            else:
                p.uniform_(0.8, 1.2)
    return model.eval()


def write_meta_checkpoint(directory: Path, model: Transformer, tokenizer: Path | None) -> Path:
    """params.json + consolidated.00.pth (+ tokenizer.model): Meta's layout, MP=1."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(model.args.to_params()))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, directory / "consolidated.00.pth")
    if tokenizer is not None:
        (directory / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return directory


def hf_twin(model: Transformer):  # -> transformers.LlamaForCausalLM
    """The same weights in transformers' LlamaForCausalLM (fp32, eager attention)."""
    return hf_reference_model(model.args, {k: v.detach() for k, v in model.state_dict().items()})


def hf_greedy(hf, prompt: list[int], new_tokens: int, eos_id: int | None = 2) -> list[int]:
    """transformers' own greedy generate: the new ids, stopping at (and dropping) EOS."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    ids = out[0, len(prompt) :].tolist()
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def tiny_checkpoint(
    directory: Path, gqa: bool = True, max_seq_len: int = 256, seed: int = 11
) -> tuple[Path, Transformer]:
    """A tiny random model in Meta layout with a freshly trained tokenizer.model beside it."""
    tokenizer = train_tiny_tokenizer(directory / "tok")
    model = random_model(tiny_args(gqa=gqa, max_seq_len=max_seq_len), seed=seed)
    return write_meta_checkpoint(directory / "model", model, tokenizer), model


def has_no_ansi(text: str) -> bool:
    """True when text has no terminal escape sequences."""
    return "\x1b" not in text
