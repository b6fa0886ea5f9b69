"""Figures, drawn from the records only (``records.json``/``explain.json``), never from a run.

Each ``plot_*`` function takes the directory an experiment wrote, reads its records, writes PNG
files next to them and returns their paths. matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import read_json

__all__ = ["plot_explain", "plot_ioffe", "PLOTTERS"]

COLORS = {
    "bn": "#1f77b4",
    "plain": "#d62728",
    "noisy": "#2ca02c",
    "full": "#1f77b4",
    "no mean grad": "#ff7f0e",
    "no var grad": "#9467bd",
    "neither": "#d62728",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 110,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "legend.frameon": False,
        }
    )
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _arr(values: Any) -> np.ndarray:
    """JSON lists (None for NaN) back to a float array."""
    return np.array(
        [
            [np.nan if v is None else v for v in row]
            if isinstance(row, list)
            else (np.nan if row is None else row)
            for row in values
        ],
        dtype=float,
    )


def _band(ax, steps, stats: dict[str, Any], color: str, label: str, linestyle: str = "-"):
    ax.plot(steps, _arr(stats["mean"]), color=color, label=label, linestyle=linestyle, lw=1.6)
    ax.fill_between(
        steps, _arr(stats["min"]), _arr(stats["max"]), color=color, alpha=0.18, linewidth=0
    )


# ------------------------------------------------------------------------------------ explain


def plot_explain(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    record = read_json(directory / "explain.json")["backprop_matrices"]
    plt = _pyplot()
    names = list(record["matrices"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.3))
    matrices = [_arr(record["matrices"][n]["M"]) for n in names]
    limit = max(np.nanmax(np.abs(mat)) for mat in matrices)
    for ax, name, mat in zip(axes, names, matrices, strict=True):
        image = ax.imshow(mat, cmap="RdBu_r", vmin=-limit, vmax=limit)
        info = record["matrices"][name]
        ax.set_title(
            f"{name}\nmoves batch mean ≤ {info['shift_leak']:.0e}\n"
            f"rescales batch ≤ {info['scale_leak']:.0e}",
            fontsize=9,
        )
        ax.set_xlabel("dl/dy index i")
        ax.set_ylabel("dl/dx index l")
        ax.grid(False)
    fig.colorbar(image, ax=axes, shrink=0.8, label="M[l, i]  (dl/dx = M dl/dy)")
    fig.suptitle(f"What backprop multiplies dl/dy by, one channel, m = {record['m']}", y=1.0)
    fig.savefig(directory / "jacobian.png", bbox_inches="tight")
    plt.close(fig)
    return [directory / "jacobian.png"]


# -------------------------------------------------------------------------------------- ioffe


def plot_ioffe(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    record = read_json(directory / "records.json")
    curves, config = record["curves"], record["config"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.4))
    for variant, color in (("bn", COLORS["bn"]), ("plain", COLORS["plain"])):
        c = curves[variant]
        _band(axes[0], c["step"], c["test_accuracy"], color, record["variants"][variant])
    axes[0].set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy", ylim=(0, 1))
    axes[0].legend(loc="lower right")
    q = config["percentiles"]
    first = {r["variant"]: r for r in reversed(record["runs"])}  # the first seed of each
    shared = []
    for ax, variant, title in (
        (axes[1], "plain", "(b) without BN"),
        (axes[2], "bn", "(c) with BN"),
    ):
        history = first[variant]["history"]
        steps = [row["step"] for row in history]
        low_q, mid_q, high_q = ([row[f"p{p}"] for row in history] for p in q)
        ax.fill_between(
            steps, _arr(low_q), _arr(high_q), color=COLORS[variant], alpha=0.18, linewidth=0
        )
        ax.plot(steps, _arr(mid_q), color=COLORS[variant], lw=1.6, label=f"{q[1]}th")
        for values, label in ((low_q, f"{q[0]}th"), (high_q, f"{q[2]}th")):
            ax.plot(steps, _arr(values), color=COLORS[variant], lw=1.0, ls="--", label=label)
        ax.set(
            title=f"{title}: input to one last-layer sigmoid",
            xlabel=f"training step (seed {first[variant]['seed']})",
        )
        shared.append(ax)
    values = [row[f"p{p}"] for r in first.values() for row in r["history"] for p in q]
    low, high = np.nanmin(_arr(values)), np.nanmax(_arr(values))
    for ax in shared:
        ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    axes[1].set_ylabel("percentiles over the test set")
    axes[2].legend(loc="upper right", fontsize=7)
    seeds = config["seeds"]
    fig.suptitle(
        f"Ioffe & Szegedy 2015, Figure 1 on {config['data']['name']}: "
        f"accuracy: mean of {seeds} seeds, band = min..max",
        fontsize=10,
    )
    return [_save(fig, directory / "ioffe.png")]


PLOTTERS: dict[str, Any] = {"explain": plot_explain, "ioffe": plot_ioffe}
