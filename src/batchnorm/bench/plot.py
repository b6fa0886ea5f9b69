"""The record as a chart: speed-up over PyTorch eager (top row) and time as a multiple of the
copy time (bottom row), one column per op, one bar per peer and problem."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import machine
from .record import FUSED_OPS, MODEL_BYTES, OPS
from .shapes import shape_str

__all__ = ["plot"]


def _cell(entry: dict[str, Any], peer: str, op: str, metric: str) -> float:
    cell = next((t for t in entry["timings"] if t["peer"] == peer and t["op"] == op), None)
    return math.nan if cell is None or cell[metric] is None else cell[metric]


def plot(record: dict[str, Any], path: Path) -> Path | None:
    """Write the PNG; None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return None
    entries = record["results"]
    ran = {(t["peer"], t["op"]) for e in entries for t in e["timings"]}
    peers = [p for p in record["settings"]["peers"] if any(p == q for q, _ in ran)]
    ops = [op for op in OPS + FUSED_OPS if any(op == o for _, o in ran)]
    labels = [f"{shape_str(e['shape'])}\n{e['layout']} {e['dtype']}\n{e['kind']}" for e in entries]
    fig, axes = plt.subplots(2, len(ops), figsize=(4.8 * len(ops), 8.4), squeeze=False)
    width = 0.8 / max(len(peers), 1)
    for col, op in enumerate(ops):
        for row, metric in enumerate(("speedup", "x_copy")):
            ax = axes[row][col]
            shown = []
            for i, peer in enumerate(peers):
                values = [_cell(e, peer, op, metric) for e in entries]
                xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(entries))]
                bars = ax.bar(xs, values, width, label=peer)
                # The value on each bar: a log axis spanning less than a decade has few ticks.
                ax.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
                shown += [v for v in values if math.isfinite(v) and v > 0]
            ax.set_yscale("log")
            if shown:  # room above the tallest bar for its label
                ax.set_ylim(min(min(shown), 1.0) / 1.6, max(max(shown), 1.0) * 1.8)
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.tick_params(axis="y", which="both", labelsize=9)
            ax.set_xticks(range(len(entries)))
            ax.set_xticklabels(labels, fontsize=7)
            if metric == "speedup":
                ax.axhline(1.0, color="black", lw=0.8)
                ax.set_title(f"{op}: speed-up over PyTorch eager", fontsize=10)
                ax.set_ylabel("speed-up (x, log scale)", fontsize=9)
            else:
                ax.axhline(MODEL_BYTES[op] / MODEL_BYTES["copy"], color="black", lw=0.8, ls="--")
                ax.set_title(f"{op}: time / copy time (-- bytes model)", fontsize=10)
                ax.set_ylabel("time / copy time (log scale)", fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", ncol=len(peers), fontsize=9)
    m = record["machine"]
    fig.suptitle(
        f"batchnorm bench, {record['settings']['device']}: {machine.label(m)}, "
        f"torch {m.get('torch')}, numba {m.get('numba')}, triton {m.get('triton')}",
        fontsize=10,
        x=0.4,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
