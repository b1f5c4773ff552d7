"""`llamactl convert`: Meta <-> HF <-> GGUF, merging and re-splitting shards."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llamactl.cli import _complete
from llamactl.cli._common import byte_progress, cli_command, human_bytes, print_json, stdout, warn
from llamactl.plugins import hookimpl

if TYPE_CHECKING:
    from llamactl.convert import ConvertPlan


def convert(
    src: Annotated[
        str,
        typer.Argument(help="Source checkpoint: a directory or a model name.", autocompletion=_complete.model_names),
    ],
    dst: Annotated[
        Path, typer.Argument(help="Destination directory, or OUT.gguf for --to gguf (must not exist unless --force).")
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to", help="Target format: hf, meta or gguf (or a plugin's).", autocompletion=_complete.writable_formats
        ),
    ],
    dtype: Annotated[
        str | None,
        typer.Option(help="Cast weights to fp32, fp16 or bf16 (default: keep).", autocompletion=_complete.float_dtypes),
    ] = None,
    gguf_type: Annotated[
        str | None,
        typer.Option("--gguf-type", help="--to gguf: store the block projections as q8_0 or q4_0 (others at --dtype)."),
    ] = None,
    shards: Annotated[
        int | None, typer.Option(help="Model-parallel shards for --to meta (default: as source).")
    ] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors file for --to hf, e.g. 5GB, 500MB.")] = "5GB",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan / result as JSON.")] = False,
) -> None:
    """Convert a checkpoint between formats, merging or re-splitting shards, streaming tensor by tensor."""
    from llamactl.checkpoint.sharding import parse_size
    from llamactl.cli.store import ensure_model
    from llamactl.convert import plan_convert, run_convert

    ensure_model(src, offer=False)
    plan = plan_convert(
        src,
        dst,
        to,
        dtype=dtype,
        shards=shards,
        max_shard_bytes=parse_size(max_shard_size),
        force=force,
        gguf_type=gguf_type,
    )
    if dry_run:
        _print_plan(plan, json_out)
        return
    with byte_progress(f"convert → {to}", plan.total_bytes, plan.tensor_count) as progress:
        task = progress.add_task(f"convert → {to}", total=plan.total_bytes, items=0)

        def advance(_name: str, nbytes: int) -> None:
            progress.update(
                task,
                advance=nbytes,
                items=progress.tasks[task].fields["items"] + 1,
            )

        run_convert(plan, on_tensor=advance, on_warning=warn)
    if json_out:
        print_json({"dst": str(plan.dst), **_plan_dict(plan)})
    else:
        stdout().print(f"wrote {plan.dst} ({to}, {len(plan.files)} weight file(s), {human_bytes(plan.total_bytes)})")


def _plan_dict(plan: ConvertPlan) -> dict[str, object]:
    return {
        "src": str(plan.reader.path),
        "src_format": plan.reader.format,
        "format": plan.target.name,
        "bytes": plan.total_bytes,
        "files": [
            {
                "name": name,
                "bytes": sum(i.nbytes for i in infos),
                "tensors": [
                    {"name": i.name, "shape": list(i.shape), "dtype": i.scheme or str(i.dtype).removeprefix("torch.")}
                    for i in infos
                ],
            }
            for name, infos in plan.files
        ],
    }


def _print_plan(plan: ConvertPlan, json_out: bool) -> None:
    if json_out:
        print_json({"dst": str(plan.dst), "dry_run": True, **_plan_dict(plan)})
        return
    out = stdout()
    out.print(f"plan: {plan.reader.path} ({plan.reader.format}) → {plan.dst} ({plan.target.name}); nothing written")
    for name, infos in plan.files:
        out.print(f"{name}  {len(infos)} tensors  {human_bytes(sum(i.nbytes for i in infos))}")
        for info in infos:
            dt = info.scheme or str(info.dtype).removeprefix("torch.")
            out.print(f"  {info.name}  {list(info.shape)}  {dt}  {human_bytes(info.nbytes)}")
    out.print(f"total {human_bytes(plan.total_bytes)}")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("convert")(cli_command(convert))
