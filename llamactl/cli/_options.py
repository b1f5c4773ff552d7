"""Typer options several commands share (generate, chat, tokenize, quantize, bench), and the
step from their values to library objects: sampling parameters, a quantization spec, a chat
template, a loaded model. Defined once so their names and help agree everywhere.

Errors the library words without flag names are reworded here with the flag that caused them.
Library modules are imported inside the functions: building the app for `--help` must not
import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llamactl.cli import _complete
from llamactl.cli._common import loading_status, warn
from llamactl.errors import TokenizerError, UsageError

if TYPE_CHECKING:
    from llamactl.loading import LoadedModel
    from llamactl.quantize import QuantSpec
    from llamactl.sampling import SamplingParams
    from llamactl.templates import ChatTemplate
    from llamactl.tokenizer import Tokenizer

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A model directory (Meta or Hugging Face) or a name under the models home.",
        autocompletion=_complete.model_names,
    ),
]
Temperature = Annotated[
    float, typer.Option("--temperature", "--temp", "-t", min=0.0, help="Sampling temperature; 0 is greedy.")
]
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
DType = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU).",
        autocompletion=_complete.float_dtypes,
    ),
]
TokenizerOpt = Annotated[
    Path | None, typer.Option("--tokenizer", help="tokenizer.model or tokenizer.json to use instead of the model's.")
]
Ctx = Annotated[int | None, typer.Option("--ctx", min=2, help="Context length in tokens (default: the model's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per answer instead of text.")]
Stop = Annotated[
    list[str] | None,
    typer.Option("--stop", metavar="TEXT", help="End the answer before this text (never printed; repeatable)."),
]
RepeatPenalty = Annotated[
    float,
    typer.Option(
        "--repeat-penalty", min=0.0, help="Penalise tokens seen in the last --repeat-last-n (1.0: off; 1.1 typical)."
    ),
]
RepeatLastN = Annotated[
    int, typer.Option("--repeat-last-n", min=0, help="How many recent tokens --repeat-penalty looks at.")
]
MinP = Annotated[
    float,
    typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens less likely than this times the top one (0: off)."),
]
Logprobs = Annotated[
    int,
    typer.Option(
        "--logprobs", min=0, max=20, help="With --json: log-probabilities of the N most likely tokens at each step."
    ),
]
TensorParallel = Annotated[
    int,
    typer.Option(
        "--tp",
        min=1,
        help="Tensor parallel over N ranks (N GPUs, or N CPU processes); starts its own ranks, or joins torchrun's.",
    ),
]
PullYes = Annotated[
    bool,
    typer.Option(
        "--yes",
        "-y",
        help="A known name (7b-chat ...) missing from the store is pulled without asking "
        "(without --yes: asked on a terminal, an error elsewhere).",
    ),
]


def sampling_from(
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    max_new_tokens: int | None,
    *,
    stop: list[str] | None = None,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    min_p: float = 0.0,
    logprobs: int = 0,
) -> SamplingParams:
    from llamactl.sampling import SamplingParams

    if top_p <= 0:
        raise UsageError("--top-p must be greater than 0")
    if repeat_penalty <= 0:
        raise UsageError("--repeat-penalty must be greater than 0")
    if stop and not all(stop):
        raise UsageError('--stop "": a stop string must not be empty')
    return SamplingParams(
        temperature,
        top_p,
        top_k,
        seed,
        max_new_tokens,
        repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n,
        min_p=min_p,
        stop=tuple(stop or ()),
        logprobs=logprobs,
    ).validate()


def sampling_dict(sampling: SamplingParams) -> dict[str, Any]:
    """The sampling settings as --json reports them."""
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
        "repeat_last_n": sampling.repeat_last_n,
        "stop": list(sampling.stop),
        "max_new_tokens": sampling.max_new_tokens,
    }


def logprobs_json(tokenizer: Tokenizer, ids: list[int], steps: list[tuple[float, list[tuple[int, float]]]]) -> list:
    """--logprobs as JSON: per generated token its id, text, logprob and the top alternatives."""

    def piece(i: int) -> str:
        return tokenizer.piece(i)

    return [
        {
            "id": token,
            "token": piece(token),
            "logprob": round(lp, 6),
            "top_logprobs": [{"id": i, "token": piece(i), "logprob": round(v, 6)} for i, v in top],
        }
        for token, (lp, top) in zip(ids, steps, strict=False)
    ]


TemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--template",
        help="Chat template: llama-2-chat, chatml, checkpoint (the model's own) or a plugin's "
        "(default: the model's own, else llama-2-chat).",
    ),
]


def template_from(name: str, own: str | None = None, where: str = "model") -> ChatTemplate:
    """The chat template `--template NAME` names (`checkpoint`: the model's own, `own`)."""
    from llamactl.templates import UnknownTemplateError, choose_template

    try:
        return choose_template(name, own, where)
    except UnknownTemplateError as exc:
        raise UsageError(
            f"--template {name}: unknown chat template; choose one of: {', '.join([*exc.choices, 'checkpoint'])}"
        ) from None


def check_template_name(name: str | None) -> None:
    """Refuse an unknown --template before anything is loaded."""
    from llamactl.templates import OWN

    if name is not None and name != OWN:
        template_from(name)


def model_template(name: str | None, reader: Any, tokenizer: Any = None) -> ChatTemplate:
    """The template a loaded model runs with: --template, else the checkpoint's own, else Llama 2's."""
    own = getattr(reader, "chat_template", None) if reader is not None else None
    where = str(reader.path) if reader is not None else "tokenizer"
    if own is None and tokenizer is not None:
        own = getattr(tokenizer, "chat_template", None)
        where = str(getattr(tokenizer, "path", where))
    if name is not None:
        return template_from(name, own, where)
    from llamactl.templates import choose_template

    return choose_template(None, own, where)


def load_from_options(
    model: str,
    tokenizer: Path | None,
    device: str | None,
    dtype: str | None,
    ctx: int | None,
    quant: QuantSpec | None = None,
    yes: bool = False,
    tp: int = 1,
) -> tuple[LoadedModel, Tokenizer]:
    """The model and tokenizer the options name, with a spinner on a terminal; a known name not
    in the store is offered for pulling first (`ensure_model`).

    With `tp` > 1 the result holds the other ranks: use it as a context manager (`with
    loaded:`), which ends them with the command's exit code.
    """
    from llamactl.cli.store import ensure_model
    from llamactl.dtypes import parse_float_dtype
    from llamactl.loading import load_for_generation
    from llamactl.tokenizer import MissingTokenizerError

    ensure_model(model, yes)
    try:
        with loading_status(model):
            loaded, tok = load_for_generation(model, tokenizer, device, parse_float_dtype(dtype), ctx, quant, tp)
    except MissingTokenizerError as exc:
        raise TokenizerError(
            f"{exc.model_path}: no tokenizer.model or tokenizer.json next to the weights; pass --tokenizer FILE"
        ) from None
    loaded.watch_context(
        lambda pos, trained: warn(
            f"position {pos} is past the trained context of {trained} tokens ({loaded.reader.path}): "
            "output from here on may degrade (a --ctx of at most that keeps within it)"
        )
    )
    return loaded, tok


# ---------------------------------------------------------------- quantization (quantize, chat, generate, bench)

Bits = Annotated[
    int | None,
    typer.Option(
        "--bits", help="Quantize the block projections to 8 or 4 bits (default schemes: q8, q4; torch's own kernels)."
    ),
]
Scheme = Annotated[
    str | None,
    typer.Option(
        "--scheme",
        help="A registered quantization scheme instead of --bits: q8, q4 (GGUF Q8_0/Q4_0 blocks), "
        "int8, nf4, fp4 (bitsandbytes, transformers loads them) or a plugin's.",
    ),
]
QuantType = Annotated[
    str | None, typer.Option("--quant-type", help="bitsandbytes 4-bit data type with --bits 4: nf4 or fp4.")
]
GroupSize = Annotated[
    int | None,
    typer.Option("--group-size", help="q8/q4 weights per fp16 scale: 32 (default; GGUF Q8_0/Q4_0), 64 or 128."),
]
DoubleQuant = Annotated[
    bool | None,
    typer.Option("--double-quant/--no-double-quant", help="Quantize the 4-bit scales too (default: on)."),
]
Blocksize = Annotated[int | None, typer.Option("--blocksize", help="nf4/fp4 block size (default 64).")]
ComputeDtype = Annotated[
    str | None, typer.Option("--compute-dtype", help="q8/q4/nf4/fp4 compute dtype: bf16 (default), fp16 or fp32.")
]
Int8Threshold = Annotated[
    float | None, typer.Option("--int8-threshold", help="LLM.int8 activation outlier threshold (default 6.0).")
]


def quant_from_options(
    bits: int | None,
    scheme: str | None,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    compute_dtype: str | None = None,
    threshold: float | None = None,
    group_size: int | None = None,
) -> QuantSpec | None:
    """The QuantSpec the quantization options describe (None: unquantized)."""
    from llamactl.quantize import get_scheme, parse_spec

    named = get_scheme(scheme) if scheme is not None else None
    return parse_spec(
        bits,
        named,
        quant_type=quant_type,
        double_quant=double_quant,
        blocksize=blocksize,
        compute_dtype=compute_dtype,
        threshold=threshold,
        group_size=group_size,
    )
