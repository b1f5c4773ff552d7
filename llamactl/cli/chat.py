"""`llamactl chat`: the Llama 2 chat REPL, or one-shot answers for scripts.

Interactive when stdin is a terminal and no --prompt is given; otherwise stdout carries
only the answers (plain text, or one JSON object per answer with --json).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llamactl.cli._common import cli_command, print_json_line, read_stdin, warn, write
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
    TemplateOpt,
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
from llamactl.templates import load_dialog

if TYPE_CHECKING:
    from llamactl.loading import LoadedModel
    from llamactl.sampling import SamplingParams
    from llamactl.session import ChatSession
    from llamactl.templates import ChatTemplate, Message
    from llamactl.tokenizer import Tokenizer


def chat(
    model: ModelArg,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Answer this message and exit (no REPL).")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt for the conversation.")] = None,
    dialog: Annotated[Path | None, typer.Option("--dialog", help="Start from a messages JSON dialog.")] = None,
    each_line: Annotated[
        bool, typer.Option("--each-line", help="Answer every stdin line in turn, in one conversation.")
    ] = False,
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
    overflow: Annotated[
        str, typer.Option("--overflow", help="When the context is full: drop (oldest exchanges) or error.")
    ] = "drop",
    device: Device = None,
    dtype: DType = None,
    bits: Bits = None,
    scheme: Scheme = None,
    quant_type: QuantType = None,
    template: TemplateOpt = None,
    tokenizer: TokenizerOpt = None,
    ctx: Ctx = None,
    tp: TensorParallel = 1,
    json_out: JsonOpt = False,
    yes: PullYes = False,
) -> None:
    """Chat with a model through its chat template: a REPL on a terminal, plain answers in pipes."""
    if overflow not in ("drop", "error"):
        raise UsageError(f"--overflow {overflow}: choose drop or error")
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
    messages = load_dialog(dialog) if dialog is not None else []
    interactive = prompt is None and sys.stdin.isatty()
    inputs: list[str] = []
    if not interactive:
        inputs = _script_inputs(prompt, each_line)
    quant = quant_from_options(bits, scheme, quant_type)
    loaded, tok = load_from_options(model, tokenizer, device, dtype, ctx, quant, yes=yes, tp=tp)
    with loaded:  # ends the other tensor-parallel ranks, whatever happens
        chat_template = model_template(template, loaded.reader, tok)
        _converse(
            loaded, tok, model, sampling, chat_template, messages, overflow, system, interactive, inputs, json_out
        )


def _converse(
    loaded: LoadedModel,
    tok: Tokenizer,
    model: str,
    sampling: SamplingParams,
    chat_template: ChatTemplate,
    messages: list[Message],
    overflow: str,
    system: str | None,
    interactive: bool,
    inputs: list[str],
    json_out: bool,
) -> None:
    from llamactl.session import ChatSession

    session = ChatSession(
        loaded.model,
        tok,
        sampling=sampling,
        messages=messages,
        overflow=overflow,
        context=loaded.args.max_seq_len,
        template=chat_template,
        step=loaded.step,
    )
    if system is not None:
        session.set_system(system)
    if interactive:
        _repl(session, loaded, model)
        return
    pending = bool(session.messages) and session.messages[-1].role == "user"
    if not inputs and not pending:
        raise UsageError(
            "nothing to answer: give --prompt TEXT, pipe a message on stdin, or a --dialog ending with a user message"
        )
    meta = {
        "seed": session.seed_used,
        "sampling": sampling_dict(sampling),
        "template": chat_template.name,
        "model": str(loaded.reader.path),
    }
    if pending:
        _answer(session, session.retry, json_out, meta)
    for text in inputs:
        _answer(session, lambda text=text: session.ask(text), json_out, meta)


def _script_inputs(prompt: str | None, each_line: bool) -> list[str]:
    if prompt is not None:
        if each_line:
            raise UsageError("--each-line reads stdin; it cannot be combined with --prompt")
        return [prompt] if prompt.strip() else []
    text = read_stdin()
    if each_line:
        return [line for line in text.splitlines() if line.strip()]
    return [text.strip()] if text.strip() else []


def _answer(session: ChatSession, start: Callable[[], Iterator[str]], json_out: bool, meta: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    stream = start()
    if session.last_dropped:
        warn(f"context full: dropped the {session.last_dropped} oldest exchange(s), system prompt kept")
    try:
        for piece in stream:
            if not json_out:
                write(piece)
    except KeyboardInterrupt:
        if json_out:  # the partial answer, marked cut, then exit 130 (cli_command)
            stream.close()  # the session records the partial answer and its stats
            _write_record(session, meta, t0, interrupted=True)
        raise
    if not json_out:
        write("\n")
        return
    _write_record(session, meta, t0)


def _write_record(session: ChatSession, meta: dict[str, Any], t0: float, interrupted: bool = False) -> None:
    """The --json object of the last answer; one cut by Ctrl-C says "cut": true, "stop_reason": "interrupted"."""
    last = session.last
    assert last is not None
    # Cut before its first token, an answer never joins the dialog: its content is empty.
    answer = None if interrupted and not last.new_tokens else session.messages[-1]
    record = {
        "content": answer.content if answer else "",
        "cut": answer.cut if answer else True,
        "tokens_in": last.prompt_tokens,
        "tokens_prefilled": last.prefilled_tokens,
        "tokens_out": last.new_tokens,
        "tokens_per_second": round(last.tokens_per_second, 2) if last.tokens_per_second else None,
        "time_to_first_token_s": round(last.ttft, 4) if last.ttft is not None else None,
        "seconds": round(time.perf_counter() - t0, 4),
        "stop_reason": last.stop_reason,
        "dropped_exchanges": last.dropped_exchanges,
        "tokens": last.ids,
        **meta,
    }
    if session.sampling.logprobs:
        record["logprobs"] = logprobs_json(session.tokenizer, last.ids, last.logprobs)
    print_json_line(record)


def _repl(session: ChatSession, loaded: LoadedModel, name: str) -> None:
    from llamactl.cli.repl import ModelInfo, Repl
    from llamactl.home import chat_history_file

    args = loaded.args
    info = ModelInfo(
        name=name,
        path=str(loaded.reader.path),
        format=loaded.reader.format,
        shape=f"{args.n_layers} layers, dim {args.dim}, {args.attention_kind} {args.n_heads}/{args.kv_heads} heads",
        context=session.context or args.max_seq_len,
        device=str(loaded.device) if loaded.tp == 1 else f"{loaded.device.type} × {loaded.tp} ranks (--tp)",
        dtype=str(loaded.dtype).removeprefix("torch."),
    )
    history = chat_history_file()
    raise typer.Exit(Repl(session, info, history=history).run())


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("chat")(cli_command(chat))
