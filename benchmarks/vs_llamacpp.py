#!/usr/bin/env python3
"""llamactl vs llama.cpp on the same weights at each width: F32, BF16, Q8_0 / q8, Q4_0 / q4.

One 110M-shape Llama (dim 768, 12 layers, 12 heads, FFN 2048, vocab 32000; random weights,
seeded) is written once as an fp32 HF checkpoint, then:

* llama.cpp: `convert_hf_to_gguf.py --outtype f32|bf16`, and `llama-quantize` of the F32 file
  to Q8_0 / Q4_0 with the output head and embeddings kept in BF16, as llamactl keeps them
  (`--output-tensor-type bf16 --token-embedding-type bf16`: equal width for every tensor;
  `--llamacpp-default-mix` keeps llama.cpp's own choice, Q6_K / Q8_0 heads, instead);
  timed by `llama-bench -t T -p 256 -n 128 -d 256 -r 1`.
* llamactl: the same fp32 checkpoint at --dtype fp32 / bf16, and `llamactl quantize --scheme
  q8|q4` of it (for Q8_0 / Q4_0 these are the very bytes llama-quantize writes); timed by
  `llamactl bench --ctx 384 --prompt-tokens 256 --gen-tokens 128 --repeat 1` (tg128 runs at
  depth 256 like llama-bench's -d 256; llamactl's pp256 runs at depth 0).

Runs are interleaved (each round runs every width on both engines in turn) and the table
reports medians over rounds, with ratios llamactl / llama.cpp and llamactl / llamactl-bf16.

    LLAMACPP_DIR=/path/to/llama.cpp python benchmarks/vs_llamacpp.py --rounds 3 --threads 2

LLAMACPP_DIR is llama.cpp's source directory (with build/bin/llama-bench, build/bin/
llama-quantize and convert_hf_to_gguf.py) or its build/bin directory; without it, the
binaries are looked up on PATH. When llama.cpp is not found the script says so and exits 0
(nothing to compare against). The tokenizer (a Llama-2 sentencepiece model: convert_hf_to_gguf
needs one) comes from --tokenizer or ../shared/fixtures/llama2-tokenizer.model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer.model"
SHAPE = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256, max_seq_len=1024)
# width -> (llama.cpp GGUF type, llamactl --dtype, llamactl scheme or None)
WIDTHS = {
    "F32": ("f32", "fp32", None),
    "BF16": ("bf16", "bf16", None),
    "Q8_0": ("Q8_0", "bf16", "q8"),
    "Q4_0": ("Q4_0", "bf16", "q4"),
}


def find_llamacpp() -> tuple[Path, Path, Path] | None:
    """(llama-bench, llama-quantize, convert_hf_to_gguf.py) or None."""
    env = os.environ.get("LLAMACPP_DIR")
    candidates = []
    if env:
        base = Path(env).expanduser()
        candidates += [(base / "build" / "bin", base), (base, base.parent.parent)]
    else:
        found = shutil.which("llama-bench")
        if found:
            bindir = Path(found).resolve().parent
            candidates.append((bindir, bindir.parent.parent))
    for bindir, src in candidates:
        bench, quant, conv = bindir / "llama-bench", bindir / "llama-quantize", src / "convert_hf_to_gguf.py"
        if bench.is_file() and quant.is_file() and conv.is_file():
            return bench, quant, conv
    return None


def run(cmd: list[str], **kwargs: object) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}\n{done.stderr[-2000:]}")
    return done.stdout


def write_source(out: Path, tokenizer: Path, seed: int) -> Path:
    """The fp32 HF checkpoint every width is made from (llamactl's own writer)."""
    import torch

    from llamactl.bench.models import build_random_model
    from llamactl.checkpoint.hf import write_hf_config, write_tokenizer_files
    from llamactl.config import ModelArgs
    from llamactl.layout import meta_to_hf, rotary_heads
    from llamactl.rotary import permute_for_hf

    args = ModelArgs(**SHAPE)  # type: ignore[arg-type]
    model = build_random_model(args, torch.device("cpu"), torch.float32, seed)
    state = {}
    for name, tensor in model.state_dict().items():
        heads = rotary_heads(name, args)
        state[meta_to_hf(name)] = (permute_for_hf(tensor, heads) if heads else tensor).contiguous()
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    write_hf_config(out, args, "float32")
    write_tokenizer_files(out, tokenizer, args)
    return out


def make_ggufs(src: Path, work: Path, quantize: Path, convert: Path, default_mix: bool) -> dict[str, Path]:
    files = {}
    for width, outtype in (("F32", "f32"), ("BF16", "bf16")):
        files[width] = work / f"model-{outtype}.gguf"
        if not files[width].is_file():
            run([sys.executable, str(convert), str(src), "--outtype", outtype, "--outfile", str(files[width])])
    keep = [] if default_mix else ["--output-tensor-type", "bf16", "--token-embedding-type", "bf16"]
    for width in ("Q8_0", "Q4_0"):
        files[width] = work / f"model-{width}{'-mix' if default_mix else ''}.gguf"
        if not files[width].is_file():
            run([str(quantize), *keep, str(files["F32"]), str(files[width]), width])
    return files


def make_llamactl(src: Path, work: Path) -> dict[str, Path]:
    dirs = {"F32": src, "BF16": src}
    for width, (_, _, scheme) in WIDTHS.items():
        if scheme:
            dirs[width] = work / f"llamactl-{scheme}"
            if not dirs[width].is_dir():
                run(
                    [
                        sys.executable,
                        "-m",
                        "llamactl",
                        "quantize",
                        str(src),
                        str(dirs[width]),
                        "--scheme",
                        scheme,
                        "--no-eval",
                    ]
                )
    return dirs


def llamacpp_round(bench: Path, gguf: Path, threads: int) -> dict[str, float]:
    out = run(
        [
            str(bench),
            "-m",
            str(gguf),
            "-t",
            str(threads),
            "-p",
            "256",
            "-n",
            "128",
            "-d",
            "256",
            "-r",
            "1",
            "-o",
            "json",
        ]
    )
    rows = json.loads(out)
    return {("pp" if r["n_prompt"] else "tg"): float(r["avg_ts"]) for r in rows}


def llamactl_round(model: Path, dtype: str, threads: int) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "llamactl", "bench", str(model), "--device", "cpu", "--dtype", dtype]
    cmd += ["--ctx", "384", "--prompt-tokens", "256", "--gen-tokens", "128", "--repeat", "1", "-o", "json"]
    rows = json.loads(run(cmd, env=env))
    return {("pp" if r["n_prompt"] else "tg"): float(r["median_ts"]) for r in rows if r["status"] == "ok"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--widths", default=",".join(WIDTHS), help="comma list of F32,BF16,Q8_0,Q4_0")
    parser.add_argument("--llamacpp-default-mix", action="store_true", help="let llama-quantize pick head types")
    parser.add_argument("--keep", type=Path, help="write the models here and keep them (default: a temp dir)")
    opts = parser.parse_args()
    tools = find_llamacpp()
    if tools is None:
        print("llama.cpp not found (set LLAMACPP_DIR to its source or build/bin directory); nothing to compare")
        return 0
    if not opts.tokenizer.is_file():
        print(f"{opts.tokenizer}: no Llama-2 tokenizer.model (give --tokenizer); skipping")
        return 0
    bench, quantize, convert = tools
    widths = [w.strip().upper() for w in opts.widths.split(",")]
    work = opts.keep or Path(tempfile.mkdtemp(prefix="vs-llamacpp-"))
    try:
        src = work / "src-fp32"
        if not (src / "model.safetensors").is_file():  # --keep: reuse what an earlier run wrote
            write_source(src, opts.tokenizer, opts.seed)
        ggufs = make_ggufs(src, work, quantize, convert, opts.llamacpp_default_mix)
        ours = make_llamactl(src, work)
        samples: dict[tuple[str, str, str], list[float]] = {}
        for r in range(opts.rounds):
            for width in widths:
                theirs = llamacpp_round(bench, ggufs[width], opts.threads)
                mine = llamactl_round(ours[width], WIDTHS[width][1], opts.threads)
                for test in ("pp", "tg"):
                    samples.setdefault((width, "llama.cpp", test), []).append(theirs.get(test, float("nan")))
                    samples.setdefault((width, "llamactl", test), []).append(mine.get(test, float("nan")))
            print(f"round {r + 1}/{opts.rounds} done", file=sys.stderr)
        print_table(samples, widths, opts)
    finally:
        if opts.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(samples: dict[tuple[str, str, str], list[float]], widths: list[str], opts: argparse.Namespace) -> None:
    """Medians (the ratios use them) and, for a noisy shared host, the best round too."""
    med = {k: statistics.median(v) for k, v in samples.items()}
    best = {k: max(v) for k, v in samples.items()}
    mix = "llama.cpp's default head types" if opts.llamacpp_default_mix else "heads/embeddings BF16 on both"
    print(f"# 110M-shape Llama, {opts.threads} threads, medians of {opts.rounds} interleaved rounds ({mix})")
    print(
        "| width | llama.cpp tg128@256 | llamactl tg128@256 | ratio | vs llamactl BF16 | best: llama.cpp / llamactl"
        " | llama.cpp pp256 | llamactl pp256 | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = med.get(("BF16", "llamactl", "tg"))
    for w in widths:
        tg_c, tg_l = med[(w, "llama.cpp", "tg")], med[(w, "llamactl", "tg")]
        pp_c, pp_l = med[(w, "llama.cpp", "pp")], med[(w, "llamactl", "pp")]
        own = f"{tg_l / base:.2f}x" if base else ""
        top = f"{best[(w, 'llama.cpp', 'tg')]:.1f} / {best[(w, 'llamactl', 'tg')]:.1f}"
        print(
            f"| {w} | {tg_c:.1f} | {tg_l:.1f} | {tg_l / tg_c:.2f}x | {own} | {top} | {pp_c:.1f} | {pp_l:.1f} "
            f"| {pp_l / pp_c:.2f}x |"
        )
    print(
        "samples (tokens/s per round):", json.dumps({" ".join(k): [round(x, 1) for x in v] for k, v in samples.items()})
    )


if __name__ == "__main__":
    sys.exit(main())
