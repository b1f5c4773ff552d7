"""`llamactl quantize`: convert with a quantization scheme, then report what it cost.

q8 / q4 are written as native checkpoints (GGUF Q8_0 / Q4_0 blocks in safetensors; llamactl
loads them without re-quantizing); int8 / nf4 / fp4 in bitsandbytes' own serialization
(transformers loads them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llamactl.cli import _complete
from llamactl.cli._common import byte_progress, cli_command, human_bytes, print_json, print_pairs, warn
from llamactl.cli._options import (
    Bits,
    Blocksize,
    ComputeDtype,
    DoubleQuant,
    GroupSize,
    Int8Threshold,
    QuantType,
    Scheme,
    Threads,
    quant_from_options,
    threads_from,
)
from llamactl.errors import UsageError
from llamactl.plugins import hookimpl


def quantize(
    src: Annotated[
        str,
        typer.Argument(
            help="Source checkpoint (any format): a directory or a model name.", autocompletion=_complete.model_names
        ),
    ],
    dst: Annotated[
        Path | None,
        typer.Argument(
            help="Destination directory (must not exist unless --force). Default: the store, "
            "as SRC-<scheme> (7b-chat-q4), which chat and generate then find by that name."
        ),
    ] = None,
    bits: Bits = None,
    scheme: Scheme = None,
    quant_type: QuantType = None,
    double_quant: DoubleQuant = None,
    blocksize: Blocksize = None,
    compute_dtype: ComputeDtype = None,
    int8_threshold: Int8Threshold = None,
    group_size: GroupSize = None,
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
    threads: Threads = None,
) -> None:
    """Quantize a checkpoint (q8/q4 native, or bitsandbytes int8/nf4/fp4) and report the cost."""
    from llamactl.checkpoint import open_checkpoint
    from llamactl.convert import plan_convert, run_convert
    from llamactl.evaluate import eval_tokens, evaluate_quality, read_eval_text
    from llamactl.quantize.quality import BUILTIN_SAMPLE, QuantStats

    if (bits is None) == (scheme is None):
        raise UsageError("give exactly one of --bits 8|4 or --scheme NAME")
    threads_from(threads)
    spec = quant_from_options(
        bits, scheme, quant_type, double_quant, blocksize, compute_dtype, int8_threshold, group_size
    )
    if no_eval and eval_file is not None:
        raise UsageError("--eval and --no-eval contradict each other")
    assert spec is not None  # one of --bits / --scheme was given
    from llamactl.cli.store import ensure_model

    ensure_model(src)
    if dst is None:
        from llamactl.store import derived_entry

        dst = derived_entry(src, spec.scheme)
    plan = plan_convert(src, dst, quant=spec, skip=skip or (), force=force, device=device)
    view = plan.quantized
    assert spec is not None and view is not None
    for pattern in view.unmatched_skip:
        warn(f"--skip {pattern}: matches no quantizable tensor")
    if view.unfit:
        warn(
            f"{len(view.unfit)} projections left unquantized: their shape does not fit {spec.scheme} "
            f"(e.g. {view.unfit[0]}: input features not a multiple of the group size {spec.group_size})"
        )
    tokens = None if no_eval else eval_tokens(plan.source, read_eval_text(eval_file) if eval_file else BUILTIN_SAMPLE)
    with byte_progress(f"quantize → {spec.scheme}", plan.total_bytes, plan.tensor_count) as progress:
        task = progress.add_task(f"quantize → {spec.scheme}", total=plan.total_bytes, items=0)

        def advance(_name: str, nbytes: int) -> None:
            progress.update(task, advance=nbytes, items=progress.tasks[task].fields["items"] + 1)

        run_convert(plan, on_tensor=advance, on_warning=warn)
    written = open_checkpoint(plan.dst)
    stats = QuantStats.compare(plan.source.tensor_infos(), written.tensor_infos(), view.skipped)
    quality = None if tokens is None else evaluate_quality(plan.source.path, plan.dst, tokens, device=device)
    report = _report(plan.source.path, plan.dst, spec, stats, quality, written, view.unmatched_skip, view.unfit)
    if json_out:
        print_json(report)
    else:
        _print_table(report, stats, quality)


def _report(
    src: Path,
    dst: Path,
    spec: Any,
    stats: Any,
    quality: Any,
    written: Any,
    unmatched: list[str],
    unfit: list[str],
) -> dict[str, Any]:
    from llamactl.checkpoint.hf_quantized import unquantized_modules

    kept = unquantized_modules(written)
    return {
        "src": str(src),
        "dst": str(dst),
        "scheme": spec.scheme,
        "method": spec.method,
        "description": spec.describe(),
        "quantization_config": spec.to_hf_config(kept),
        "unmatched_skip": unmatched,
        "unfit": unfit,
        **stats.to_dict(),
        "quality": quality.to_dict() if quality else None,
    }


def _print_table(report: dict[str, Any], stats: Any, quality: Any) -> None:
    rows: list[tuple[str, object]] = [
        ("wrote", report["dst"]),
        ("scheme", f"{report['method']} {report['description']}"),
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
    print_pairs(rows)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("quantize")(cli_command(quantize))
