"""Typer options shared by `generate` and `chat` (`tokenize` reuses a few), and the step
from their values to library objects: sampling parameters, a chat template, a loaded model.

Errors the library words without flag names are reworded here with the flag that caused them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llamactl.cli._common import loading_status
from llamactl.dtypes import parse_float_dtype
from llamactl.errors import TokenizerError, UsageError
from llamactl.loading import LoadedModel, load_for_generation
from llamactl.sampling import SamplingParams
from llamactl.templates import ChatTemplate, UnknownTemplateError, get_template
from llamactl.tokenizer import MissingTokenizerError, Tokenizer

ModelArg = Annotated[
    str, typer.Argument(help="A model directory (Meta or Hugging Face) or a name under the models home.")
]
Temperature = Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[
    float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep tokens up to this mass.")
]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Keep only the k most likely tokens (0: off).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed (default: a fresh one, reported with --json).")]
MaxNew = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens", "-n", min=1, help="Stop after this many new tokens (default: EOS or context end)."
    ),
]
Device = Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda when available).")]
Bits = Annotated[
    int | None,
    typer.Option("--bits", help="Quantize on load with bitsandbytes: 8 (LLM.int8) or 4 (nf4); writes nothing."),
]
DType = Annotated[str | None, typer.Option("--dtype", help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU).")]
TokenizerOpt = Annotated[
    Path | None, typer.Option("--tokenizer", help="tokenizer.model to use instead of the model's.")
]
Ctx = Annotated[int | None, typer.Option("--ctx", min=2, help="Context length in tokens (default: the model's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per answer instead of text.")]


def sampling_from(
    temperature: float, top_p: float, top_k: int, seed: int | None, max_new_tokens: int | None
) -> SamplingParams:
    if top_p <= 0:
        raise UsageError("--top-p must be greater than 0")
    return SamplingParams(temperature, top_p, top_k, seed, max_new_tokens).validate()


def sampling_dict(sampling: SamplingParams) -> dict[str, Any]:
    """The sampling settings as --json reports them."""
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
    }


def template_from(name: str) -> ChatTemplate:
    """The chat template `--template NAME` names."""
    try:
        return get_template(name)
    except UnknownTemplateError as exc:
        raise UsageError(f"--template {name}: unknown chat template; choose one of: {', '.join(exc.choices)}") from None


def load_from_options(
    model: str, tokenizer: Path | None, device: str | None, dtype: str | None, ctx: int | None, bits: int | None
) -> tuple[LoadedModel, Tokenizer]:
    """The model and tokenizer the options name, with a spinner on a terminal."""
    try:
        with loading_status(model):
            return load_for_generation(model, tokenizer, device, parse_float_dtype(dtype), ctx, bits)
    except MissingTokenizerError as exc:
        raise TokenizerError(
            f"{exc.model_path}: no tokenizer.model next to the weights; pass --tokenizer FILE"
        ) from None
