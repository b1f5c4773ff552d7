"""`llamactl serve`: an OpenAI-compatible HTTP server for one model (llamactl.server).

stderr carries the address once the model is ready, a warning when it listens beyond this
machine without an API key, and one line per request (JSON with --json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llamactl.cli._common import cli_command, warn
from llamactl.cli._options import (
    Bits,
    Ctx,
    Device,
    DType,
    MaxNew,
    ModelArg,
    PullYes,
    QuantType,
    Scheme,
    Seed,
    Temperature,
    TemplateOpt,
    TensorParallel,
    Threads,
    TokenizerOpt,
    TopK,
    TopP,
    check_template_name,
    load_from_options,
    model_template,
    quant_from_options,
    sampling_from,
)
from llamactl.errors import UsageError
from llamactl.plugins import hookimpl

API_KEY_ENV = "LLAMACTL_API_KEY"


def serve(
    model: ModelArg,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network (use --api-key).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port; 0 picks a free one.")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar=API_KEY_ENV, help="Require `Authorization: Bearer KEY` on /v1 (401 without)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The model id clients send (default: MODEL's directory name).")
    ] = None,
    queue: Annotated[
        int, typer.Option("--queue", min=0, help="Requests that may wait while one runs; more get 429.")
    ] = 64,
    max_body: Annotated[
        int, typer.Option("--max-body", min=1, help="Largest request body in bytes; larger ones get 413.")
    ] = 1 << 20,
    temperature: Temperature = 0.6,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    seed: Seed = None,
    max_new_tokens: MaxNew = None,
    device: Device = None,
    dtype: DType = None,
    bits: Bits = None,
    scheme: Scheme = None,
    quant_type: QuantType = None,
    template: TemplateOpt = None,
    tokenizer: TokenizerOpt = None,
    ctx: Ctx = None,
    threads: Threads = None,
    tp: TensorParallel = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Log one JSON object per request on stderr.")] = False,
    yes: PullYes = False,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    Sampling options are the defaults for requests that leave them out.
    """
    from llamactl.server import require_dependencies
    from llamactl.server.run import bind, is_loopback

    require_dependencies()
    if api_key is not None and not api_key.strip():
        raise UsageError(f"--api-key (or {API_KEY_ENV}) is empty: give a key, or leave it out for an open server")
    if not is_loopback(host) and api_key is None:
        warn(f"--host {host}: anyone who can reach this address can use the model; set --api-key or {API_KEY_ENV}")
    sock = bind(host, port)  # first of all (torch is not imported yet): a taken port fails at once
    defaults = sampling_from(temperature, top_p, top_k, seed, max_new_tokens)
    check_template_name(template)
    quant = quant_from_options(bits, scheme, quant_type)
    # With --tp N this process is rank 0: its model mirrors every call to the other ranks, so the
    # worker thread drives them all; `with loaded` ends them when the server stops.
    loaded, tok = load_from_options(model, tokenizer, device, dtype, ctx, quant, yes=yes, threads=threads, tp=tp)
    with loaded:
        _serve(loaded, tok, model, name, template, queue, defaults, api_key, max_body, json_out, sock)


def _serve(
    loaded: Any,
    tok: Any,
    model: str,
    name: str | None,
    template: str | None,
    queue: int,
    defaults: Any,
    api_key: str | None,
    max_body: int,
    json_out: bool,
    sock: Any,
) -> None:
    """Serve one loaded model on the bound socket until SIGINT / SIGTERM."""
    from llamactl.server.run import run_server, url_of

    chat_template = model_template(template, loaded.reader, tok)
    from llamactl.server.app import ServedModel, ServerSettings, create_app
    from llamactl.server.worker import ModelWorker

    model_id = name or _default_name(model)
    served = ServedModel(
        id=model_id,
        worker=ModelWorker(loaded.model, tok, step=loaded.step, max_queue=queue),
        tokenizer=tok,
        template=chat_template,
        defaults=defaults,
        aliases=(model,) if model != model_id else (),
    )
    app = create_app([served], ServerSettings(api_key=api_key, max_body_bytes=max_body, log=_logger(json_out)))
    context = served.worker.context
    print(
        f"llamactl: serving {model_id} ({context}-token context, {loaded.device}) at {url_of(sock)}/v1",
        file=sys.stderr,
        flush=True,
    )
    cancelled: list[int] = []  # the signal handler only records; printing there could re-enter stderr
    try:
        run_server(app, sock, on_stop=lambda: cancelled.append(app.models.stop()))
    finally:
        if cancelled:
            print(f"llamactl: stopped serving; {cancelled[0]} request(s) in flight were cancelled", file=sys.stderr)


def _default_name(model: str) -> str:
    path = Path(model)
    return path.resolve().name if path.exists() else model


def _logger(json_out: bool) -> Any:
    def log(record: dict[str, Any]) -> None:
        print(json.dumps(record) if json_out else _plain(record), file=sys.stderr, flush=True)

    return log


def _plain(record: dict[str, Any]) -> str:
    head = f"llamactl: {record['method']} {record['path']} {record.get('status')}"
    if "tokens_in" not in record:
        return head + (f": {record['error']}" if "error" in record else "")
    tps = record["tokens_per_second"]
    ttft = record["time_to_first_token_s"]
    return (
        f"{head} {record['id']}: {record['tokens_in']} tokens in ({record['tokens_cached']} cached), "
        f"{record['tokens_out']} out, first after {ttft if ttft is not None else '-'} s, "
        f"{tps if tps is not None else '-'} tok/s, {record['finish_reason']}"
    )


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("serve")(cli_command(serve))
