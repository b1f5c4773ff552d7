"""llamactl plugin for llama2.c checkpoints: a `llama2c` format and `llamactl llama2c-export`.

Registered through the `llamactl.plugins` entry point (see pyproject.toml); llamactl calls
the two hooks below. Reading gives the canonical Meta layout, so every llamactl command
(`info`, `convert --to meta|hf`, `chat`...) works on a llama2.c directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from llamactl.plugins import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_formats(register: Any) -> None:
    from llamactl.checkpoint.formats import CheckpointFormat
    from llamactl_llama2c.format import Llama2cReader, detect

    register(
        CheckpointFormat(
            "llama2c", detect, Llama2cReader.open, description="llama2.c legacy (v0) .bin checkpoint (read only)"
        )
    )


def llama2c_export(
    model: Annotated[str, typer.Argument(help="A model name or checkpoint directory (any format llamactl reads).")],
    out: Annotated[Path, typer.Argument(help="The .bin file to write (llama2.c legacy v0, fp32).")],
    max_seq_len: Annotated[
        int | None, typer.Option(min=1, help="Context for the header and RoPE tables (default: the model's).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Export a model as a llama2.c legacy (v0) .bin that llama2.c's `run` can load."""
    from llamactl.checkpoint import open_checkpoint
    from llamactl.errors import DestinationError
    from llamactl_llama2c.format import export_v0

    if out.exists() and not force:
        raise DestinationError(f"{out}: already exists (pass --force to overwrite)")
    if not out.parent.is_dir():
        raise DestinationError(f"{out.parent}: no such directory")
    reader = open_checkpoint(model)
    if max_seq_len is not None:
        reader.args = dataclasses.replace(reader.args, max_seq_len=max_seq_len)
    export_v0(reader, out)
    print(f"wrote {out}")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    from llamactl.cli._common import cli_command

    examples = [
        "llamactl llama2c-export stories stories260K.bin",
        "llamactl llama2c-export 7b out.bin --max-seq-len 2048",
    ]
    epilog = "Examples:\n\n" + "\n\n".join(f"  {line}" for line in examples)
    app.command("llama2c-export", epilog=epilog)(cli_command(llama2c_export))
