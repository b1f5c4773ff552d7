#!/usr/bin/env python3
"""`llamactl convert` throughput against `cp -r` of the same bytes, interleaved, medians.

Each round copies SRC with `cp -r`, then converts it (to hf by default) twice: once timed
inside a child process around the library call alone (`plan_convert` + `run_convert`: the
conversion's own throughput, without interpreter start and the torch import), once as the
whole `llamactl convert` command. Outputs are deleted between runs; the source stays in the
page cache for all of them (the first, warming round is not counted). Make SRC with
`benchmarks/make_meta_checkpoint.py` (a 7B-shaped fp16 Meta checkpoint, MP=2).

    OMP_NUM_THREADS=1 python benchmarks/convert_vs_cp.py /work/bench-data/meta7b-3l-mp2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

_TIMED = """
import json, sys, time
from llamactl.convert import plan_convert, run_convert
start = time.perf_counter()
run_convert(plan_convert(sys.argv[1], sys.argv[2], sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def library_seconds(src: Path, dst: Path, to: str) -> float:
    out = subprocess.run([sys.executable, "-c", _TIMED, str(src), str(dst), to], check=True, capture_output=True)
    return float(json.loads(out.stdout)["seconds"])


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()  # write-back of the last output must not land in the next run's time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("--to", default="hf")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, help="where outputs go (default: beside SRC)")
    opts = parser.parse_args()
    work = opts.work or opts.src.parent
    dst = work / f"{opts.src.name}.out" if opts.to != "gguf" else work / f"{opts.src.name}.gguf"
    size = sum(p.stat().st_size for p in opts.src.iterdir() if p.is_file())
    llamactl = [sys.executable, "-m", "llamactl", "convert", str(opts.src), str(dst), "--to", opts.to]
    runs: dict[str, list[float]] = {"cp -r": [], "convert (library)": [], "llamactl convert": []}
    for round_ in range(opts.rounds + 1):
        times = {
            "cp -r": timed(["cp", "-r", str(opts.src), str(dst)]),
        }
        remove(dst)
        times["convert (library)"] = library_seconds(opts.src, dst, opts.to)
        remove(dst)
        times["llamactl convert"] = timed(llamactl)
        remove(dst)
        if round_:  # round 0 warms the page cache and the interpreter
            for key, value in times.items():
                runs[key].append(value)
        print(f"round {round_}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), file=sys.stderr)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{opts.src} ({size / 1e9:.2f} GB) -> {opts.to}; OMP_NUM_THREADS={threads}; medians of {opts.rounds} rounds")
    cp = statistics.median(runs["cp -r"])
    for key, values in runs.items():
        median = statistics.median(values)
        print(f"  {key:18s} {median:6.2f} s  {size / median / 1e9:5.2f} GB/s  {cp / median:5.2f} x cp")


if __name__ == "__main__":
    main()
