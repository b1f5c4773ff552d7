"""`llamactl chat`: the Llama 2 chat REPL, or one-shot answers for scripts.

Interactive when stdin is a terminal and no --prompt is given; otherwise stdout carries
only the answers (plain text, or one JSON object per answer with --json).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llamactl.cli._common import cli_command, warn, write
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
    template_from,
)
from llamactl.errors import UsageError
from llamactl.plugins import hookimpl
from llamactl.templates import DEFAULT_TEMPLATE, load_dialog

if TYPE_CHECKING:
    from llamactl.loading import LoadedModel
    from llamactl.session import ChatSession


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
    seed: Seed = None,
    max_new_tokens: MaxNew = None,
    overflow: Annotated[
        str, typer.Option("--overflow", help="When the context is full: drop (oldest exchanges) or error.")
    ] = "drop",
    device: Device = None,
    dtype: DType = None,
    threads: Threads = None,
    compile_: Compile = None,
    bits: Bits = None,
    scheme: Scheme = None,
    quant_type: QuantType = None,
    template: Annotated[
        str, typer.Option("--template", help="Chat template: llama-2-chat or one a plugin registers.")
    ] = DEFAULT_TEMPLATE,
    tokenizer: TokenizerOpt = None,
    ctx: Ctx = None,
    json_out: JsonOpt = False,
) -> None:
    """Chat with a Llama 2 chat model: a REPL on a terminal, plain answers in pipes."""
    if overflow not in ("drop", "error"):
        raise UsageError(f"--overflow {overflow}: choose drop or error")
    sampling = sampling_from(temperature, top_p, top_k, seed, max_new_tokens)
    chat_template = template_from(template)
    messages = load_dialog(dialog) if dialog is not None else []
    interactive = prompt is None and sys.stdin.isatty()
    inputs: list[str] = []
    if not interactive:
        inputs = _script_inputs(prompt, each_line)
    loaded, tok = load_from_options(
        model, tokenizer, device, dtype, ctx, quant_from_options(bits, scheme, quant_type), threads, compile_
    )
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
    text = sys.stdin.read()
    if each_line:
        return [line for line in text.splitlines() if line.strip()]
    return [text.strip()] if text.strip() else []


def _answer(session: ChatSession, start: Callable[[], Iterator[str]], json_out: bool, meta: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    stream = start()
    if session.last_dropped:
        warn(f"context full: dropped the {session.last_dropped} oldest exchange(s), system prompt kept")
    for piece in stream:
        if not json_out:
            write(piece)
    if not json_out:
        write("\n")
        return
    last, answer = session.last, session.messages[-1]
    assert last is not None
    record = {
        "content": answer.content,
        "cut": answer.cut,
        "tokens_in": last.prompt_tokens,
        "tokens_prefilled": last.prefilled_tokens,
        "tokens_out": last.new_tokens,
        "tokens_per_second": round(last.tokens_per_second, 2) if last.tokens_per_second else None,
        "time_to_first_token_s": round(last.ttft, 4) if last.ttft is not None else None,
        "seconds": round(time.perf_counter() - t0, 4),
        "stop_reason": last.stop_reason,
        "dropped_exchanges": last.dropped_exchanges,
        **meta,
    }
    write(json.dumps(record, ensure_ascii=False) + "\n")


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
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
    )
    history = chat_history_file()
    raise typer.Exit(Repl(session, info, history=history).run())


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("chat")(cli_command(chat))
