"""`llamactl tokenize`: show exactly which token ids the model reads for a text or a dialog."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llamactl.cli._common import cli_command, read_stdin
from llamactl.cli._options import TemplateOpt, check_template_name, model_template
from llamactl.errors import UsageError
from llamactl.plugins import hookimpl
from llamactl.templates import encode_with, load_dialog
from llamactl.tokenizer import Tokenizer, load_tokenizer, open_tokenizer


def _tokenizer(model: str | None, tokenizer: Path | None) -> tuple[Tokenizer, Any]:
    """The tokenizer, and the checkpoint it belongs to (None with --tokenizer)."""
    if (model is None) == (tokenizer is None):
        raise UsageError("give exactly one of --model MODEL or --tokenizer FILE")
    if tokenizer is not None:
        return load_tokenizer(tokenizer), None
    from llamactl.checkpoint import open_checkpoint

    reader = open_checkpoint(model)
    return open_tokenizer(None, reader.tokenizer_path, reader.path, reader.args.vocab_size), reader


def tokenize(
    text: Annotated[str | None, typer.Argument(help="Text to encode; read from stdin when omitted.")] = None,
    chat: Annotated[
        Path | None, typer.Option("--chat", help="Encode a messages JSON dialog with the model's chat template.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Use this model's tokenizer (name or directory).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", help="A tokenizer.model (SentencePiece) or tokenizer.json file.")
    ] = None,
    bos: Annotated[
        bool | None,
        typer.Option(
            "--bos/--no-bos", help="Prefix the BOS id to plain text (default: as generate does, per the tokenizer)."
        ),
    ] = None,
    template: TemplateOpt = None,
    pieces: Annotated[bool, typer.Option("--pieces", help="Show each id with its vocabulary piece.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """Print the token ids of TEXT (or of a chat dialog with --chat)."""
    if chat is not None and text is not None:
        raise UsageError("give either TEXT or --chat DIALOG.json, not both")
    check_template_name(template)
    tok, reader = _tokenizer(model, tokenizer)
    if chat is not None:
        ids = encode_with(model_template(template, reader, tok), tok, load_dialog(chat))
    else:
        if text is None:
            if sys.stdin.isatty():
                raise UsageError("give TEXT, --chat DIALOG.json, or pipe text on stdin")
            text = read_stdin().removesuffix("\n")
        ids = tok.encode(text, bos=getattr(tok, "add_bos", True) if bos is None else bos)
    if json_out:
        data = [{"id": i, "piece": tok.piece(i)} for i in ids] if pieces else ids
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    elif pieces:
        sys.stdout.write("".join(f"{i}\t{tok.piece(i)}\n" for i in ids))
    else:
        sys.stdout.write(" ".join(map(str, ids)) + "\n")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("tokenize")(cli_command(tokenize))
