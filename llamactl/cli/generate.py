"""`llamactl generate`: plain text completion, streamed to stdout.

The sampling, device and tokenizer options defined here are shared with `llamactl chat`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from llamactl.cli._common import cli_command, stderr
from llamactl.dtypes import parse_float_dtype
from llamactl.errors import UsageError
from llamactl.generate import Completion, SamplingParams, load_for_generation
from llamactl.plugins import hookimpl

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


def loading_status(model: str) -> contextlib.AbstractContextManager[object]:
    """A transient spinner on stderr while weights load (nothing when stderr is not a terminal)."""
    if stderr.is_terminal:
        return stderr.status(f"loading {model}…", spinner="dots")
    return contextlib.nullcontext()


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_stats(run: Any, prompt_tokens: int, seconds: float) -> dict[str, Any]:
    tps = run.tokens_per_second
    return {
        "tokens_in": prompt_tokens,
        "tokens_out": len(run.produced),
        "tokens_per_second": round(tps, 2) if tps else None,
        "time_to_first_token_s": round(run.ttft, 4) if run.ttft is not None else None,
        "seconds": round(seconds, 4),
        "stop_reason": run.stop_reason,
    }


def generate(
    model: ModelArg,
    prompt: Annotated[
        str | None, typer.Argument(help='Text to continue; read from stdin when omitted. "" starts from BOS alone.')
    ] = None,
    temperature: Temperature = 0.6,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    seed: Seed = None,
    max_new_tokens: MaxNew = None,
    device: Device = None,
    dtype: DType = None,
    bits: Bits = None,
    tokenizer: TokenizerOpt = None,
    ctx: Ctx = None,
    json_out: JsonOpt = False,
) -> None:
    """Continue PROMPT with the model (no chat template), streaming the new text to stdout."""
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError('give a PROMPT argument or pipe one on stdin ("" starts from BOS alone)')
        prompt = sys.stdin.read().removesuffix("\n")  # `echo text |` adds one
    sampling = sampling_from(temperature, top_p, top_k, seed, max_new_tokens)
    with loading_status(model):
        loaded, tok = load_for_generation(model, tokenizer, device, parse_float_dtype(dtype), ctx, bits)
    completion = Completion(loaded.model, tok, prompt, sampling)
    start = time.perf_counter()
    for piece in completion:
        if not json_out:
            write(piece)
    seconds = time.perf_counter() - start
    if json_out:
        import json

        record = {
            "content": completion.text,
            **run_stats(completion.run, len(completion.prompt_ids), seconds),
            "seed": completion.seed,
            "sampling": _sampling_dict(sampling),
            "template": "none (plain completion)",
            "model": str(loaded.reader.path),
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
        }
        write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        write("\n")


def _sampling_dict(sampling: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
    }


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("generate")(cli_command(generate))
