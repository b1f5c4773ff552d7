"""tokenizer.json directories written by transformers itself, the reference the HF tokenizer tests use.

`byte_level_dir` trains a small byte-level BPE (GPT-2 style, as SmolLM2 and Llama 3 use) with
the `tokenizers` library and saves it through transformers' own `save_pretrained`, so the files
are exactly what a transformers 5 checkpoint carries (tokenizer.json, tokenizer_config.json,
chat_template.jinja). `sentencepiece_dir` is transformers' conversion of a tokenizer.model.
"""

from __future__ import annotations

from pathlib import Path

from tests.tokenizer._util import TEXTS

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a little girl.",
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.",
] * 20 + TEXTS * 5


def byte_level_dir(directory: Path, chat_template: str | None = CHATML, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json (+ config, template) as transformers saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
    return directory


def sentencepiece_dir(tokenizer_model: Path, directory: Path) -> Path:
    """transformers' own tokenizer.json for a SentencePiece tokenizer.model (Metaspace + byte fallback)."""
    import json

    from transformers import AutoTokenizer

    source = directory.with_name(directory.name + "-src")
    source.mkdir(parents=True, exist_ok=True)
    (source / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config |= {"add_bos_token": True, "add_eos_token": False, "legacy": True}
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(directory))
    assert (directory / "tokenizer.json").is_file()
    (directory / "tokenizer.model").unlink(missing_ok=True)  # the tokenizer.json alone, as transformers 5 writes
    return directory
