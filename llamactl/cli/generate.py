"""`llamactl generate`: plain text completion, streamed to stdout."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llamactl.cli._common import cli_command, print_json_line, read_stdin, write
from llamactl.cli._options import (
    Bits,
    Ctx,
    Device,
    DType,
    JsonOpt,
    Logprobs,
    MaxNew,
    MinP,
    ModelArg,
    PullYes,
    QuantType,
    RepeatLastN,
    RepeatPenalty,
    Scheme,
    Seed,
    Stop,
    Temperature,
    TensorParallel,
    TokenizerOpt,
    TopK,
    TopP,
    check_template_name,
    load_from_options,
    logprobs_json,
    model_template,
    quant_from_options,
    sampling_dict,
    sampling_from,
)
from llamactl.errors import UsageError
from llamactl.plugins import hookimpl

if TYPE_CHECKING:
    from llamactl.generate import Completion, Generation
    from llamactl.loading import LoadedModel
    from llamactl.sampling import SamplingParams
    from llamactl.tokenizer import Tokenizer


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
    min_p: MinP = 0.0,
    repeat_penalty: RepeatPenalty = 1.0,
    repeat_last_n: RepeatLastN = 64,
    stop: Stop = None,
    seed: Seed = None,
    max_new_tokens: MaxNew = None,
    logprobs: Logprobs = 0,
    device: Device = None,
    dtype: DType = None,
    bits: Bits = None,
    scheme: Scheme = None,
    quant_type: QuantType = None,
    tokenizer: TokenizerOpt = None,
    ctx: Ctx = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Frame PROMPT as one user message with this chat template (checkpoint: the model's own); "
            "default: plain completion.",
        ),
    ] = None,
    tp: TensorParallel = 1,
    json_out: JsonOpt = False,
    yes: PullYes = False,
) -> None:
    """Continue PROMPT with the model (no chat template unless --template), streaming the new text."""
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError('give a PROMPT argument or pipe one on stdin ("" starts from BOS alone)')
        prompt = read_stdin().removesuffix("\n")  # `echo text |` adds one
    sampling = sampling_from(
        temperature,
        top_p,
        top_k,
        seed,
        max_new_tokens,
        stop=stop,
        repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n,
        min_p=min_p,
        logprobs=logprobs,
    )
    check_template_name(template)
    quant = quant_from_options(bits, scheme, quant_type)
    loaded, tok = load_from_options(model, tokenizer, device, dtype, ctx, quant, yes=yes, tp=tp)
    with loaded:  # ends the other tensor-parallel ranks, whatever happens
        _complete(loaded, tok, prompt, sampling, template, json_out)


def _complete(
    loaded: LoadedModel, tok: Tokenizer, prompt: str, sampling: SamplingParams, template: str | None, json_out: bool
) -> None:
    from llamactl.generate import Completion

    prompt_ids = None
    template_name = "none (plain completion)"
    if template is not None:
        from llamactl.templates import Message

        chat_template = model_template(template, loaded.reader, tok)
        prompt_ids = chat_template.encode(tok, [Message("user", prompt)])
        template_name = chat_template.name
    completion = Completion(loaded.model, tok, prompt, sampling, step=loaded.step, prompt_ids=prompt_ids)
    start = time.perf_counter()
    try:
        for piece in completion:
            if not json_out:
                write(piece)
    except KeyboardInterrupt:
        if json_out:  # the partial answer, marked cut, before exit 130
            completion.run.stop_reason = "interrupted"
            _write_record(completion, loaded, sampling, tok, template_name, time.perf_counter() - start, cut=True)
        raise
    if not json_out:
        write("\n")
        return
    _write_record(completion, loaded, sampling, tok, template_name, time.perf_counter() - start, cut=False)


def _write_record(
    completion: Completion,
    loaded: LoadedModel,
    sampling: SamplingParams,
    tok: Tokenizer,
    template_name: str,
    seconds: float,
    *,
    cut: bool,
) -> None:
    """The --json object of a completion (also of one cut by Ctrl-C)."""
    run = completion.run
    record = {
        "content": completion.text,
        "cut": cut,
        **run_stats(run, len(completion.prompt_ids), seconds),
        "tokens": list(run.produced),
        "seed": completion.seed,
        "sampling": sampling_dict(sampling),
        "template": template_name,
        "model": str(loaded.reader.path),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }
    if sampling.logprobs:
        record["logprobs"] = logprobs_json(tok, run.produced, run.logprobs)
    print_json_line(record)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("generate")(cli_command(generate))
