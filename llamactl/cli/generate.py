"""`llamactl generate`: plain text completion, streamed to stdout."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llamactl.cli._common import cli_command, write
from llamactl.cli._options import (
    Bits,
    Compile,
    Ctx,
    Device,
    DType,
    JsonOpt,
    MaxNew,
    ModelArg,
    QuantType,
    Scheme,
    Seed,
    Temperature,
    Threads,
    TokenizerOpt,
    TopK,
    TopP,
    load_from_options,
    quant_from_options,
    sampling_dict,
    sampling_from,
)
from llamactl.errors import UsageError
from llamactl.plugins import hookimpl

if TYPE_CHECKING:
    from llamactl.generate import Generation


def run_stats(run: Generation, prompt_tokens: int, seconds: float) -> dict[str, Any]:
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
    threads: Threads = None,
    compile_: Compile = None,
    bits: Bits = None,
    scheme: Scheme = None,
    quant_type: QuantType = None,
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
    loaded, tok = load_from_options(
        model, tokenizer, device, dtype, ctx, quant_from_options(bits, scheme, quant_type), threads, compile_
    )
    from llamactl.generate import Completion

    completion = Completion(loaded.model, tok, prompt, sampling, step=loaded.step)
    start = time.perf_counter()
    for piece in completion:
        if not json_out:
            write(piece)
    seconds = time.perf_counter() - start
    if not json_out:
        write("\n")
        return
    record = {
        "content": completion.text,
        **run_stats(completion.run, len(completion.prompt_ids), seconds),
        "seed": completion.seed,
        "sampling": sampling_dict(sampling),
        "template": "none (plain completion)",
        "model": str(loaded.reader.path),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }
    write(json.dumps(record, ensure_ascii=False) + "\n")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("generate")(cli_command(generate))
