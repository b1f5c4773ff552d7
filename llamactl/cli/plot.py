"""Charts of a bench report: decode tokens/s and KV-cache memory against context, per attention variant.

matplotlib is an optional extra (`pip install 'llamactl[plot]'`), imported only here and
only when a plot is asked for.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from llamactl.bench import BenchReport, BenchRow
from llamactl.errors import DestinationError, MissingDependencyError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "--plot: matplotlib is not installed; install it with: pip install 'llamactl[plot]'"
        ) from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: Path) -> None:
    """Fail before the (long) benchmark when the plot could not be written."""
    _pyplot()
    if path.suffix.lower() != ".png":
        raise DestinationError(f"{path}: the plot file must end in .png")
    if not path.parent.is_dir():
        raise DestinationError(f"{path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise DestinationError(f"{path}: is a directory")


def _series(rows: list[BenchRow]) -> dict[str, list[BenchRow]]:
    """Decode rows grouped by everything but the context, sorted by context."""
    groups: dict[str, list[BenchRow]] = defaultdict(list)
    for row in rows:
        if row.n_gen and row.status == "ok":
            label = f"{row.model_type} {row.attn} kv{row.n_kv_head} {row.type_w}"
            label += f" {row.scheme}" if row.scheme else f" int{row.bits}" if row.bits < 16 else ""
            label += f" b{row.n_batch}" if row.n_batch != 1 else ""
            groups[label].append(row)
    return {k: sorted(v, key=lambda r: r.n_ctx) for k, v in groups.items()}


def plot_report(report: BenchReport, path: Path) -> None:
    """Write a PNG with decode tokens/s (left) and KV MiB (right) against context."""
    plt = _pyplot()
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, rows in _series(report.rows).items():
        ctx = [r.n_ctx for r in rows]
        speed.errorbar(
            ctx, [r.avg_ts for r in rows], yerr=[r.stddev_ts for r in rows], marker="o", label=label, capsize=3
        )
        memory.plot(ctx, [(r.kv_bytes or 0) / (1 << 20) for r in rows], marker="o", label=label)
    speed.set(xlabel="context (tokens in cache)", ylabel="decode tokens/s", title="Decode speed")
    memory.set(xlabel="context (tokens in cache)", ylabel="KV cache MiB", title="KV-cache memory")
    for ax in (speed, memory):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    env = report.environment
    fig.suptitle(f"llamactl bench on {env.gpu_info or env.cpu_info}", fontsize=10)
    fig.tight_layout()
    # Write next to the target, then rename: no half-written PNG if anything fails.
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
