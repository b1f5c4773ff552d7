"""convert streams: its peak memory stays far below the checkpoint's size.

The conversion runs in a child process that reports its resident set before converting
(torch imported, nothing loaded) and its peak (ru_maxrss) after, so the figure is the
memory the conversion itself added.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint

# VmHWM (peak RSS of this address space) rather than ru_maxrss, which after fork+exec still
# carries the parent's peak.
_CHILD = """
import json, re, sys
import psutil, torch
from llamactl.convert import convert
before = psutil.Process().memory_info().rss
convert(sys.argv[1], sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
status = open("/proc/self/status").read()
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
print(json.dumps({"before": before, "peak": peak}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_convert_peak_rss_is_well_below_checkpoint_size(tmp_path: Path) -> None:
    # ~700 MB in fp32 over 2 model-parallel shards; each layer is ~37 MB.
    args = tiny_args(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=8000, multiple_of=256)
    src = write_meta_checkpoint(tmp_path / "big", args, random_meta_state(args), mp=2)
    size = sum(p.stat().st_size for p in src.glob("*.pth"))
    assert size > 600e6
    root = Path(__file__).resolve().parents[1]
    results = {}
    for to, options in (("hf", {}), ("meta", {"shards": 1}), ("gguf", {})):
        dst = tmp_path / (f"out-{to}" if to != "gguf" else "out.gguf")
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(src), str(dst), to, json.dumps(options)],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        )
        results[to] = json.loads(proc.stdout)
        added = results[to]["peak"] - results[to]["before"]
        # Whole-model loading would add >= size; streaming adds a few layers' worth.
        assert added < size / 3, (to, added, size)
    print(
        {to: round((r["peak"] - r["before"]) / 1e6) for to, r in results.items()},
        "MB added for",
        round(size / 1e6),
        "MB",
    )
