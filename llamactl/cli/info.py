"""`llamactl info`: shapes, size and the memory a model will need, before loading it."""

from __future__ import annotations

from typing import Annotated

import typer

from llamactl.checkpoint import open_checkpoint
from llamactl.cli import _complete
from llamactl.cli._common import cli_command, context_note, human_bytes, human_count, print_json, print_pairs
from llamactl.info import describe_storage, model_info
from llamactl.plugins import hookimpl


def info(
    model: Annotated[
        str,
        typer.Argument(help="A model directory or a name under the models home.", autocompletion=_complete.model_names),
    ],
    ctx: Annotated[
        int | None, typer.Option(min=1, help="Context length for the KV-cache estimate (default: the model's).")
    ] = None,
    tp: Annotated[
        int, typer.Option("--tp", min=1, help="Also show the memory per GPU for N tensor-parallel ranks.")
    ] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Describe a checkpoint: format, shapes, parameters, size and memory needs."""
    from llamactl.cli.store import ensure_model

    ensure_model(model, offer=False)
    report = model_info(open_checkpoint(model), ctx, tp)
    if json_out:
        print_json(report.to_dict())
        return
    rows: list[tuple[str, object]] = [
        ("path", report.path),
        (
            "format",
            report.format,
        ),
        (
            "attention",
            f"{report.attention}: {report.n_heads} heads, {report.n_kv_heads} KV heads, head dim {report.head_dim}",
        ),
        ("shape", f"dim {report.dim}, {report.n_layers} layers, FFN {report.hidden_dim}, vocab {report.vocab_size}"),
        ("context", f"{report.max_seq_len} ({context_note(report.trained_context)}, rope theta {report.rope_theta:g})"),
        ("dtype", report.dtype),
        ("parameters", f"{report.parameters:,} ({human_count(report.parameters)})"),
        (
            "on disk",
            f"{human_bytes(report.bytes_on_disk)} in {report.files} file(s) "
            f"(weights {human_bytes(report.weight_bytes_on_disk)} in {report.weight_files})",
        ),
        ("tokenizer", report.tokenizer or "none"),
        ("chat template", report.chat_template_source),
        ("weights fp16/bf16", human_bytes(report.memory["weights_fp16"])),
        ("weights int8", human_bytes(report.memory["weights_int8"])),
        ("weights nf4", human_bytes(report.memory["weights_nf4"])),
        ("KV cache / token", f"{human_bytes(report.memory['kv_cache_per_token'])} (fp16)"),
        (f"KV cache @ {report.ctx}", human_bytes(report.memory["kv_cache_at_ctx"])),
    ]
    if report.memory_per_rank:
        per = report.memory_per_rank
        weights = " · ".join(f"{k} {human_bytes(per[f'weights_{k}'])}" for k in ("fp16", "int8", "nf4"))
        rows.append((f"per GPU, --tp {report.tp}", f"weights {weights}"))
        rows.append((f"KV per GPU @ {report.ctx}", human_bytes(per["kv_cache_at_ctx"])))
    for gpu, schemes in report.gpus.items():
        rows.append((f"on {gpu} GPUs", _gpus_line(schemes)))
    if report.storage:
        rows.insert(2, ("storage", describe_storage(report.storage)))
    if report.quantization:
        quant = report.quantization
        rows.insert(
            2, ("quantization", f"{quant['description']}, {quant['bits_per_weight']} bits per quantized weight")
        )
    print_pairs(rows)


def _gpus_line(schemes: dict[str, int | None]) -> str:
    """'fp16 --tp 2, int8 1 GPU, nf4 1 GPU': the fewest ranks whose share fits one GPU."""

    def one(tp: int | None) -> str:
        return "too big" if tp is None else "1 GPU" if tp == 1 else f"--tp {tp}"

    return ", ".join(f"{scheme} {one(tp)}" for scheme, tp in schemes.items())


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("info")(cli_command(info))
