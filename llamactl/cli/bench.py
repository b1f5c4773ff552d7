"""`llamactl bench`: prefill/decode tokens/s, KV-cache and weight memory, MHA vs GQA vs MQA.

Parses the options (comma lists form a cross product, like llama-bench), calls
`llamactl.bench.run_bench` and prints the report as a table, markdown, csv, json or jsonl.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from llamactl.bench import (
    CPU_DEFAULTS,
    FIELDS,
    GPU_DEFAULTS,
    BenchOptions,
    BenchPlan,
    BenchReport,
    BenchRow,
    plan_bench,
    run_bench,
)
from llamactl.cli import _complete
from llamactl.cli._common import cli_command, stderr, stdout
from llamactl.cli._options import Compile, Threads, threads_from
from llamactl.errors import UsageError
from llamactl.plugins import hookimpl

FORMATS = ("table", "md", "csv", "json", "jsonl")
_MIB = 1 << 20


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("bench")(cli_command(bench))


def _ints(flag: str, text: str) -> list[int]:
    values = []
    for part in text.split(","):
        try:
            values.append(int(part.strip()))
        except ValueError:
            raise UsageError(f"{flag} {text}: {part.strip()!r} is not an integer") from None
    return values


def _words(flag: str, text: str) -> list[str]:
    values = [part.strip().lower() for part in text.split(",")]
    if not all(values):
        raise UsageError(f"{flag} {text}: empty item in the list")
    return values


def bench(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint directory or installed model name; omit to benchmark --preset.",
            autocompletion=_complete.model_names,
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(help="Preset shape(s) built with random weights: 7b,13b,70b.", autocompletion=_complete.presets),
    ] = "7b",
    ctx: Annotated[str, typer.Option(help="Context length(s) the KV cache holds; decode runs filled to it.")] = "4096",
    prompt_tokens: Annotated[str, typer.Option(help="Prompt length(s) for the prefill test (pp).")] = "512",
    gen_tokens: Annotated[
        str | None,
        typer.Option(
            help=f"Tokens generated in the decode test (tg) (default {GPU_DEFAULTS.gen_tokens}; CPU {CPU_DEFAULTS.gen_tokens})."
        ),
    ] = None,
    batch: Annotated[str, typer.Option(help="Batch size(s).")] = "1",
    attn: Annotated[
        str | None,
        typer.Option(help="Attention variant(s) of the same shape: mha,gqa,mqa (default: the preset's own).."),
    ] = None,
    kv_heads: Annotated[str, typer.Option(help="KV heads for --attn gqa (comma list).")] = "8",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="bf16, fp16 or fp32 (comma list; default CUDA bf16, CPU fp32).", autocompletion=_complete.float_dtypes
        ),
    ] = None,
    bits: Annotated[str, typer.Option(help="Weight bits: 16, 8 (q8) or 4 (q4) (comma list).")] = "16",
    scheme: Annotated[
        str | None,
        typer.Option(help="Quantization schemes to run too, after --bits: q8,q4,int8,nf4,fp4 (comma list)."),
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help=f"Keep only N layers of the preset (default all; CPU {CPU_DEFAULTS.layers}).")
    ] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs before the repeats.")] = 1,
    repeat: Annotated[
        int | None,
        typer.Option(help=f"Timed repeats per test (default {GPU_DEFAULTS.repeat}; CPU {CPU_DEFAULTS.repeat})."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default cuda when available).")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table, md, csv, json or jsonl.")] = "table",
    json_output: Annotated[bool, typer.Option("--json", help="Same as -o json.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Also draw tokens/s and KV memory against context to FILE.png.")
    ] = None,
    vs: Annotated[
        str | None, typer.Option(help="Compare with 'transformers' (LlamaForCausalLM, same weights, interleaved).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for random weights and tokens.")] = 0,
    tp: Annotated[
        int | None,
        typer.Option(
            "--tp",
            min=1,
            help="Tensor parallel over N ranks: speed, memory per rank, collective share (--tp 1: same method, one process).",
        ),
    ] = None,
    threads: Threads = None,
    compile_: Compile = None,
) -> None:
    """Benchmark prefill and decode speed and memory (like llama-bench, plus KV cache and bandwidth)."""
    fmt = "json" if json_output else output.lower()
    if fmt not in FORMATS:
        raise UsageError(f"--output {output}: expected one of {', '.join(FORMATS)}")
    if tp is not None:
        if model is None:
            raise UsageError("--tp needs a MODEL checkpoint: each rank loads its own share of it")
        if bits != "16" or scheme or vs or plot or attn or layers:
            raise UsageError(
                "--tp benchmarks the checkpoint as stored: --bits, --scheme, --vs, --plot, --attn and --layers do not apply"
            )
        _tp_bench(model, tp, ctx, prompt_tokens, gen_tokens, repeat, warmup, device, dtype, seed, fmt)
        return
    opts = BenchOptions(
        model=model,
        presets=_words("--preset", preset),
        ctx=_ints("--ctx", ctx),
        prompt_tokens=_ints("--prompt-tokens", prompt_tokens),
        gen_tokens=_ints("--gen-tokens", gen_tokens) if gen_tokens is not None else None,
        batch=_ints("--batch", batch),
        attn=_words("--attn", attn) if attn is not None else ["native"],
        kv_heads=_ints("--kv-heads", kv_heads),
        dtypes=_words("--dtype", dtype) if dtype is not None else None,
        bits=_ints("--bits", bits),
        schemes=_words("--scheme", scheme) if scheme is not None else [],
        layers=[*_ints("--layers", layers)] if layers is not None else None,
        warmup=warmup,
        repeat=repeat,
        device=device,
        vs=vs.lower() if vs else None,
        seed=seed,
        threads=threads,
        compile=compile_,
    )
    threads_from(threads)  # before the environment is described: n_threads reports it
    if plot is not None:
        from llamactl.cli.plot import check_plot_path

        check_plot_path(plot)
    plan = plan_bench(opts)  # device defaults and every check, before the (long) run
    if plan.cpu_fallback:
        print(f"llamactl: no CUDA GPU found; benchmarking on the CPU{_cpu_note(opts)}", file=sys.stderr)
    try:
        report = _run(plan)
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: the rows measured so far are still results
        partial = getattr(exc, "partial_report", None)
        if partial is not None and partial.rows:
            _print(partial, fmt)
        raise
    _print(report, fmt)
    if plot is not None:
        from llamactl.cli.plot import plot_report

        plot_report(report, plot)
        stderr.print(f"plot written to {plot}")


def _tp_bench(
    model: str,
    tp: int,
    ctx: str,
    prompt_tokens: str,
    gen_tokens: str | None,
    repeat: int | None,
    warmup: int,
    device: str | None,
    dtype: str | None,
    seed: int,
    fmt: str,
) -> None:
    from llamactl.bench.tp import run_tp_bench

    def one(flag: str, text: str) -> int:
        values = _ints(flag, text)
        if len(values) != 1:
            raise UsageError(f"{flag} {text}: --tp runs one configuration; give one value")
        return values[0]

    report = run_tp_bench(
        model,
        tp,
        ctx=one("--ctx", ctx),
        n_prompt=one("--prompt-tokens", prompt_tokens),
        n_gen=one("--gen-tokens", gen_tokens) if gen_tokens is not None else 32,
        repeat=repeat or 3,
        warmup=warmup,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    if fmt in ("json", "jsonl"):
        sys.stdout.write(json.dumps(report.to_dict(), indent=2 if fmt == "json" else None) + "\n")
        return
    if fmt != "table":
        raise UsageError(f"--output {fmt}: --tp prints table or json")
    mib = _MIB
    lines = [
        f"llamactl bench --tp {report.tp}: {report.model}",
        f"{report.backend} on {report.device}, {report.dtype}, ctx {report.n_ctx}, "
        f"{report.threads_per_rank or '-'} threads per rank, {report.repeat} repeats",
        f"pp{report.n_prompt}: {report.pp_ts:.2f} t/s   tg{report.n_gen}: {report.tg_ts:.2f} t/s   "
        f"collectives: {report.comm_share_decode:.1%} of decode time ({report.comm_calls_per_token:g} per token)",
        f"per rank   weights MiB (formula; --tp 1 formula {report.weight_bytes_tp1_formula / mib:,.2f})   "
        f"KV MiB (formula; --tp 1 formula {report.kv_bytes_tp1_formula / mib:,.2f})",
    ]
    for rank, (w, kv) in enumerate(zip(report.weight_bytes, report.kv_bytes)):
        lines.append(
            f"rank {rank}     {w / mib:,.2f} ({report.weight_bytes_formula / mib:,.2f})"
            f"   {kv / mib:,.2f} ({report.kv_bytes_formula / mib:,.2f})"
        )
    lines += [f"note: {note}" for note in report.notes]
    sys.stdout.write("\n".join(lines) + "\n")


def _cpu_note(opts: BenchOptions) -> str:
    """Which CPU defaults apply (only those the user did not set)."""
    parts = []
    if opts.layers is None and opts.model is None:
        parts.append(f"--layers {CPU_DEFAULTS.layers}")
    if opts.gen_tokens is None:
        parts.append(f"--gen-tokens {CPU_DEFAULTS.gen_tokens}")
    if opts.repeat is None:
        parts.append(f"--repeat {CPU_DEFAULTS.repeat}")
    if opts.dtypes is None:
        parts.append(f"--dtype {CPU_DEFAULTS.dtype}")
    return f" with {' '.join(parts)} (pass them to change)" if parts else ""


def _run(plan: BenchPlan) -> BenchReport:
    if not stderr.is_terminal:
        return run_bench(plan)
    with stderr.status("benchmarking") as status:
        return run_bench(plan, progress=lambda msg: status.update(msg))


# --------------------------------------------------------------------------- output


def _print(report: BenchReport, fmt: str) -> None:
    if fmt == "json":
        # Rows keep llama-bench's field set exactly (its parsers read them): no "schema" key.
        sys.stdout.write(json.dumps(report.records(), indent=2) + "\n")
    elif fmt == "jsonl":
        for record in report.records():
            sys.stdout.write(json.dumps(record) + "\n")
    elif fmt == "csv":
        sys.stdout.write(_csv(report))
    elif fmt == "md":
        sys.stdout.write("\n".join([*_header_lines(report), "", *_markdown(report), "", *legend(report)]) + "\n")
    else:
        console = stdout()  # plain text at its natural width when piped
        for line in _header_lines(report):
            console.print(line, markup=False)
        console.print(_table(report, ascii_only=not console.is_terminal))
        for line in legend(report):
            console.print(line, markup=False)


def _csv(report: BenchReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FIELDS), lineterminator="\n")
    writer.writeheader()
    for record in report.records():
        writer.writerow({k: ";".join(str(x) for x in v) if isinstance(v, list) else v for k, v in record.items()})
    return buffer.getvalue()


def _gib(n: int | None) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n else "?"


def _header_lines(report: BenchReport) -> list[str]:
    env = report.environment
    device = f"{env.gpu_info} ({_gib(env.gpu_memory_bytes)})" if env.gpu_info else "CPU"
    cuda = f", CUDA {env.cuda_version}" if env.cuda_version else ""
    commit = f" ({env.build_commit})" if env.build_commit else ""
    lines = [
        f"llamactl {env.llamactl_version}{commit}, torch {env.torch_version}{cuda}",
        f"device: {device}; peak bandwidth {env.peak_bandwidth_gbs:.0f} GB/s ({_peak_source(env.peak_bandwidth_source)})",
        f"cpu: {env.cpu_info}, {env.cpu_cores} cores / {env.cpu_threads} threads, "
        f"{env.n_threads} torch threads, RAM {_gib(env.ram_bytes)}, OpenMP wait {env.omp_wait_policy}"
        + (f" ({env.busy_cores_at_start} core(s) busy at start)" if env.busy_cores_at_start else ""),
    ]
    reduced = sorted({(r.n_layer, r.n_layer_model) for r in report.rows if r.n_layer != r.n_layer_model})
    if reduced:
        why = "CPU default, " if env.cpu_fallback and report.options.layers == [CPU_DEFAULTS.layers] else ""
        shown = ", ".join(f"{n} of {full}" for n, full in reduced)
        lines.append(
            f"layers: {shown} ({why}--layers to change); sizes and speeds are for these layers, "
            "rows marked (estimate) scale them to all"
        )
    if env.backends == "CPU":
        lines.append("memory: peak = process RSS high-water mark; KV measured = cache tensor storage")
    return lines


def _peak_source(source: str) -> str:
    if source == "decode":
        return "the fastest decode below: faster than the bandwidth probe's best run"
    return source.removeprefix("probe: ")


def legend(report: BenchReport) -> list[str]:
    """What the test names and columns mean, for the tests this report has (table and md footer)."""
    lines = []
    pp = next((r for r in report.rows if r.n_prompt), None)
    tg = next((r for r in report.rows if r.n_gen), None)
    if pp is not None:
        lines.append(f"{pp.test}: prefill of a {pp.n_prompt}-token prompt (llama-bench's name)")
    if tg is not None:
        lines.append(
            f"{tg.test}: {tg.n_gen} tokens decoded one at a time after {tg.n_depth} already in the KV cache, "
            f"which ends full at {tg.n_ctx} (llama-bench's name)"
        )
    lines.append(
        f"t/s: tokens per second, mean ± sd over {report.options.repeat} runs; median: their median; "
        "GB/s: bytes a decode step reads (weights + KV) × steps per second; "
        "% peak: that ÷ the peak bandwidth in the header"
    )
    estimates = report.estimates
    if estimates:
        lines.append(
            f"estimate: the full {estimates[0].n_layer}-layer model scaled from the rows measured with fewer "
            "layers (time per token × layers; weights and KV cache by formula); not measured, "
            "so not in json/jsonl/csv"
        )
    return lines


def _columns(report: BenchReport) -> list[str]:
    cols = [
        "model",
        "layers",
        "attn",
        "kv heads",
        "dtype",
        "bits",
        "batch",
        "test",
        "t/s",
        "median",
        "ms/tok",
        "KV MiB",
        "weights MiB",
        "peak MiB",
        "GB/s",
        "% peak",
    ]
    if any(r.vs for r in report.rows):
        cols += ["transformers median", "speedup"]
    return cols


def _cells(row: BenchRow, with_vs: bool) -> list[str]:
    def mib(n: int | None) -> str:
        return f"{n / _MIB:,.1f}" if n is not None else ""

    def num(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else ""

    kv = mib(row.kv_bytes)
    if row.kv_bytes is not None and row.kv_bytes != row.kv_bytes_formula:
        kv += f" (formula {mib(row.kv_bytes_formula)})"
    if row.avg_ts is None:
        speed = row.status.upper()
    elif row.status == "estimate":
        speed = f"~{row.avg_ts:.2f}"
    else:
        speed = f"{row.avg_ts:.2f} ± {row.stddev_ts:.2f}"
    cells = [
        row.model_type,
        f"{row.n_layer}/{row.n_layer_model}" + (" (estimate)" if row.status == "estimate" else ""),
        row.attn,
        str(row.n_kv_head),
        row.type_w,
        f"{row.bits} ({row.scheme})" if row.scheme else str(row.bits),
        str(row.n_batch),
        row.test,
        speed,
        num(row.median_ts, ".2f"),
        num(row.ms_per_token, ".2f"),
        kv if row.status == "ok" else mib(row.kv_bytes_formula),  # oom, estimate: the formula
        mib(row.model_size),
        mib(row.peak_bytes),
        num(row.bandwidth_gbs, ".1f"),
        num(row.bandwidth_frac * 100 if row.bandwidth_frac is not None else None, ".0f"),
    ]
    if with_vs:
        vs = f"{row.vs_median_ts:.2f}" if row.vs_median_ts is not None else ""
        cells += [vs, f"{row.speedup:.2f}x" if row.speedup is not None else ""]
    return cells


def _table(report: BenchReport, ascii_only: bool = False) -> Table:
    cols = _columns(report)
    table = Table(*cols, title="llamactl bench", box=box.ASCII if ascii_only else box.HEAVY_HEAD)
    for col in table.columns[8:]:
        col.justify = "right"
    for row in [*report.rows, *report.estimates]:
        table.add_row(*_cells(row, "speedup" in cols))
    return table


def _markdown(report: BenchReport) -> list[str]:
    cols = _columns(report)
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if i >= 8 else "---" for i in range(len(cols))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row, "speedup" in cols)) + " |" for row in [*report.rows, *report.estimates]]
    return lines
