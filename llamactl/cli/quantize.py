"""`llamactl quantize`: int8 / nf4 / fp4 checkpoints in bitsandbytes' own serialization."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from llamactl.cli._common import byte_progress, cli_command, human_bytes, print_json, stdout, warn
from llamactl.errors import UsageError
from llamactl.plugins import hookimpl
from llamactl.quantize import BUILTIN_SAMPLE, Quality, QuantSpec, QuantStats, quant_scheme
from llamactl.quantize_run import (
    QuantizePlan,
    eval_tokens,
    evaluate_quality,
    plan_quantize,
    read_eval_text,
    run_quantize,
)


def quantize(
    src: Annotated[str, typer.Argument(help="Source checkpoint (Meta or HF): a directory or a model name.")],
    dst: Annotated[
        Path, typer.Argument(help="Destination directory: an HF checkpoint (must not exist unless --force).")
    ],
    bits: Annotated[int | None, typer.Option("--bits", help="8 (LLM.int8) or 4 (nf4 / fp4).")] = None,
    scheme: Annotated[
        str | None,
        typer.Option("--scheme", help="A registered scheme instead of --bits: int8, nf4, fp4 or a plugin's."),
    ] = None,
    quant_type: Annotated[str | None, typer.Option(help="4-bit data type: nf4 (default) or fp4.")] = None,
    double_quant: Annotated[
        bool | None,
        typer.Option("--double-quant/--no-double-quant", help="Quantize the 4-bit scales too (default: on)."),
    ] = None,
    blocksize: Annotated[int | None, typer.Option(help="4-bit block size (default 64).")] = None,
    compute_dtype: Annotated[
        str | None, typer.Option(help="4-bit compute dtype: bf16 (default), fp16 or fp32.")
    ] = None,
    int8_threshold: Annotated[float, typer.Option(help="LLM.int8 activation outlier threshold.")] = 6.0,
    skip: Annotated[
        list[str] | None,
        typer.Option("--skip", help="Leave matching projections unquantized (glob on Meta or HF names; repeatable)."),
    ] = None,
    eval_file: Annotated[
        Path | None,
        typer.Option("--eval", help="Text to measure quality on (default: a short built-in English sample)."),
    ] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the quality comparison.")] = False,
    device: Annotated[
        str | None, typer.Option(help="Device to quantize and evaluate on (default: cuda if available).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Quantize a checkpoint with bitsandbytes (LLM.int8 or 4-bit nf4/fp4) and report the cost."""
    if (bits is None) == (scheme is None):
        raise UsageError("give exactly one of --bits 8|4 or --scheme NAME")
    if scheme is not None:
        spec = quant_scheme(scheme)
    else:
        spec = _spec(bits, quant_type, double_quant, blocksize, compute_dtype, int8_threshold)
    if no_eval and eval_file is not None:
        raise UsageError("--eval and --no-eval contradict each other")
    plan = plan_quantize(src, dst, spec, skip=skip or (), force=force, device=device)
    for pattern in plan.unmatched_skip:
        warn(f"--skip {pattern}: matches no quantizable tensor")
    tokens = None if no_eval else eval_tokens(plan.reader, read_eval_text(eval_file) if eval_file else BUILTIN_SAMPLE)
    with byte_progress(f"quantize → {spec.scheme}", plan.total_bytes, plan.tensor_count) as progress:
        task = progress.add_task(f"quantize → {spec.scheme}", total=plan.total_bytes, items=0)

        def advance(_name: str, nbytes: int) -> None:
            progress.update(task, advance=nbytes, items=progress.tasks[task].fields["items"] + 1)

        stats = run_quantize(plan, on_tensor=advance)
    quality = None if tokens is None else evaluate_quality(plan.reader.path, plan.dst, tokens, device=device)
    if json_out:
        print_json(_report(plan, stats, quality))
    else:
        _print_table(plan, stats, quality)


def _spec(
    bits: int,
    quant_type: str | None,
    double_quant: bool | None,
    blocksize: int | None,
    compute_dtype: str | None,
    threshold: float,
) -> QuantSpec:
    four_bit_only = {
        "--quant-type": quant_type,
        "--double-quant": double_quant,
        "--blocksize": blocksize,
        "--compute-dtype": compute_dtype,
    }
    if bits == 8:
        given = [name for name, value in four_bit_only.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} applies to --bits 4 only")
    spec = QuantSpec(
        bits=bits,
        quant_type=quant_type or "nf4",
        double_quant=True if double_quant is None else double_quant,
        blocksize=blocksize or 64,
        compute_dtype=compute_dtype or "bf16",
        threshold=threshold,
    )
    return spec.validate()


def _report(plan: QuantizePlan, stats: QuantStats, quality: Quality | None) -> dict[str, Any]:
    return {
        "src": str(plan.reader.path),
        "dst": str(plan.dst),
        "scheme": plan.spec.scheme,
        "description": plan.spec.describe(),
        "quantization_config": plan.spec.to_hf_config(plan.skip_modules),
        "unmatched_skip": plan.unmatched_skip,
        **stats.to_dict(),
        "quality": quality.to_dict() if quality else None,
    }


def _print_table(plan: QuantizePlan, stats: QuantStats, quality: Quality | None) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    rows = [
        ("wrote", str(plan.dst)),
        ("scheme", f"bitsandbytes {plan.spec.describe()}"),
        (
            "tensors quantized",
            f"{stats.tensors_quantized} of {stats.tensors_total}"
            + (f" ({len(stats.skipped)} skipped by --skip)" if stats.skipped else ""),
        ),
        ("parameters quantized", f"{stats.params_quantized:,} of {stats.params_total:,}"),
        (
            "bytes",
            f"{human_bytes(stats.bytes_before)} → {human_bytes(stats.bytes_after)} "
            f"({stats.bytes_before / max(stats.bytes_after, 1):.2f}x smaller)",
        ),
        (
            "bits per weight",
            f"{stats.bits_per_weight:.3f} quantized tensors (scales included), "
            f"{stats.model_bits_per_weight:.3f} whole model",
        ),
    ]
    if quality is not None:
        rows += [
            (
                "perplexity",
                f"{quality.perplexity_before:.4f} → {quality.perplexity_after:.4f} on {quality.tokens} predictions",
            ),
            ("top-1 agreement", f"{100 * quality.top1_agreement:.2f}%"),
            ("mean KL", f"{quality.mean_kl:.6f} nats"),
        ]
    for key, value in rows:
        table.add_row(key, value)
    stdout().print(table)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("quantize")(cli_command(quantize))
