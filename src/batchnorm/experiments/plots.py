"""Figures, drawn from the records only (``records.json``/``explain.json``), never from a run.

Each ``plot_*`` function takes the directory an experiment wrote, reads its records, writes PNG
files next to them and returns their paths. matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import read_json

__all__ = [
    "plot_explain",
    "plot_ioffe",
    "plot_moments",
    "plot_landscape",
    "plot_reparam",
    "PLOTTERS",
]

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
        ax.grid(False)
    axes[0].set_ylabel("dl/dx index l")  # one label: the panels share their rows
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
        for values, label, style in ((high_q, f"{q[2]}th", "--"), (low_q, f"{q[0]}th", ":")):
            ax.plot(steps, _arr(values), color=COLORS[variant], lw=1.2, ls=style, label=label)
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
    # One legend, where (b) leaves room early in training (the styles are the same in (c)).
    axes[1].legend(loc="lower left", fontsize=7, title="percentile", title_fontsize=7)
    seeds = config["seeds"]
    fig.suptitle(
        f"Ioffe & Szegedy 2015, Figure 1 on {config['data']['name']}: "
        f"accuracy: mean of {seeds} seeds, band = min..max",
        fontsize=10,
    )
    return [_save(fig, directory / "ioffe.png")]


# ------------------------------------------------------------------------------------ moments


def plot_moments(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    record = read_json(directory / "records.json")
    plt = _pyplot()
    written = []

    minimal = record["minimal_case"]
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.2))
    shift_keys = (
        ("shift/moment as constant", COLORS["no mean grad"], "-", 2.4),
        ("shift/true gradient", COLORS["full"], "--", 1.4),
    )
    for key, color, style, width in shift_keys:
        label = key.split("/")[1]
        loss = _arr(minimal[key]["loss"])
        axes[0].plot(minimal[key]["param"], color=color, ls=style, lw=width, label=label)
        axes[1].plot(loss - loss[0], color=color, ls=style, lw=width, label=label)
    worst = max(minimal[k]["max_loss_change"] for k, *_ in shift_keys)
    axes[0].set(title="x = u + b, x̂ = x - E[x]: the bias b", xlabel="SGD step", ylabel="b")
    axes[1].set(
        title=f"... the shift's loss: change from step 0 (≤ {worst:.0e})",
        xlabel="SGD step",
        ylabel="loss - loss at step 0",
    )
    axes[1].set_ylim(-1e-15, 1e-15)
    axes[0].legend()
    axes[1].legend(loc="upper right")
    for key, color, style, width in (
        ("scale/moment as constant", COLORS["no var grad"], "-", 2.4),
        ("scale/true gradient", COLORS["full"], "--", 1.4),
    ):
        axes[2].plot(
            minimal[key]["param"], color=color, ls=style, lw=width, label=key.split("/")[1]
        )
    axes[2].set(title="x = c·u, x̂ = x / std(x): the scale c", xlabel="SGD step", ylabel="c")
    axes[2].legend()
    fig.suptitle(
        "Section 2 of the paper: with the moment treated as a constant the parameter "
        "drifts while the loss does not move",
        fontsize=10,
    )
    written.append(_save(fig, directory / "moments_minimal.png"))

    curves = record["curves"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.3))
    panels = (
        ("test_accuracy", "test accuracy"),
        ("train_loss", "training loss (mini-batch)"),
        ("bias_norm", "‖pre-BN biases‖"),
        ("weight_norm", "‖pre-BN weights‖"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for variant in record["variants"]:
            c = curves[variant]
            steps, stats = c["step"], c[key]
            if key == "train_loss":  # the row at step 0 has no mini-batch loss yet
                steps, stats = steps[1:], {k: v[1:] for k, v in stats.items()}
            _band(ax, steps, stats, COLORS[variant], variant)
        ax.set(title=title, xlabel="training step")
    axes[0].legend()
    fig.suptitle(
        "The same network trained with the full BN gradient and without the gradient "
        "through the mean / the variance / both",
        fontsize=10,
    )
    written.append(_save(fig, directory / "moments_ablation.png"))

    check = record["gradient_check"]
    variants = list(record["variants"])
    errors = [check["overall_rel_error"][v] for v in variants]
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    ax.bar(
        [v.replace(" grad", "\ngrad") for v in variants],
        errors,
        color=[COLORS[v] for v in variants],
    )
    ax.set_yscale("log")
    for i, value in enumerate(errors):
        ax.text(i, value, f"{value:.1e}", ha="center", va="bottom", fontsize=8)
    ax.set(title="gradient vs float64 finite differences", ylabel="‖g - fd‖ / ‖fd‖")
    written.append(_save(fig, directory / "moments_gradcheck.png"))
    return written


# ---------------------------------------------------------------------------------- landscape


def plot_landscape(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    record = read_json(directory / "records.json")
    curves = record["curves"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.3))
    colors = {"plain": COLORS["plain"], "bn": COLORS["bn"], "noisy-bn": COLORS["noisy"]}
    for variant, label in record["variants"].items():
        c, color = curves[variant], colors[variant]
        steps = c["step"]
        for ax, low, high in (
            (axes[0], "loss_min", "loss_max"),
            (axes[1], "grad_change_min", "grad_change_max"),
        ):
            ax.fill_between(
                steps,
                _arr(c[low]["mean"]),
                _arr(c[high]["mean"]),
                color=color,
                alpha=0.3,
                linewidth=0,
                label=label,
            )
            ax.plot(steps, _arr(c[high]["mean"]), color=color, lw=0.8)
        axes[2].plot(steps, _arr(c["beta"]["mean"]), color=color, label=label, lw=1.0)
        _band(axes[3], c["eval_step"], c["test_accuracy"], color, label)
    lo, hi = record["config"]["eta_range"]
    axes[0].set(
        title=f"(a) loss along -g, step {lo:g}..{hi:g} × lr",
        xlabel="training step",
        ylabel="loss along the step (min..max)",
    )
    axes[1].set(
        title="(b) gradient predictiveness",
        xlabel="training step",
        ylabel="‖∇l(θ - η g) - ∇l(θ)‖ (min..max)",
    )
    axes[2].set(
        title="(c) effective β-smoothness",
        xlabel="training step",
        ylabel="max over η of ‖Δ∇l‖ / ‖Δθ‖",
    )
    axes[3].set(title="test accuracy", xlabel="training step", ylim=(0, 1))
    for ax in axes[:2]:
        ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(
        "Santurkar et al. 2018, Figure 4: the loss and its gradient along each step, "
        "without BN, with BN and with noise after BN",
        fontsize=10,
    )
    return [_save(fig, directory / "landscape.png")]


# ------------------------------------------------------------------------------------- reparam


def plot_reparam(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    record = read_json(directory / "records.json")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.3))
    sample = record["sample"]
    bn, reparam = _arr(sample["bn"]), _arr(sample["reparam"])
    axes[0].scatter(reparam, bn, s=6, color=COLORS["bn"])
    span = [np.nanmin(bn), np.nanmax(bn)]
    axes[0].plot(span, span, color="#444444", lw=0.8, ls="--")
    axes[0].set(
        title=f"BN(xᵀw) vs γ xᵀw/‖w‖_S + β  (max |diff| {record['summary']['max_abs_error']:.0e})",
        xlabel="γ xᵀw / ‖w‖_S + β",
        ylabel="BN(xᵀw), population stats",
    )
    variants = record["orthogonality"]["variants"]
    names = list(variants)
    values = [max(variants[n]["max_abs_cosine_w_grad"], 1e-17) for n in names]
    axes[1].bar(
        [n.replace(" grad", "\ngrad") for n in names], values, color=[COLORS[n] for n in names]
    )
    axes[1].set_yscale("log")
    axes[1].set(title="|cos(w, ∂l/∂w)|: scale invariance in the gradient", ylabel="max over units")
    for i, value in enumerate(values):
        axes[1].text(i, value, f"{value:.0e}", ha="center", va="bottom", fontsize=8)
    return [_save(fig, directory / "reparam.png")]


def plot_precise(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    record = read_json(directory / "records.json")
    curves = record["curves"]
    steps = _arr(curves["step"])
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.3))
    _band(axes[0], steps, curves["ema"], COLORS["plain"], "EMA running statistics")
    _band(axes[0], steps, curves["precise"], COLORS["bn"], "PreciseBN statistics")
    settings = record["settings"]
    axes[0].set(
        title=f"test accuracy (lr {settings['lr']:g}, BN momentum {settings['bn_momentum']:g})",
        xlabel="SGD step",
        ylabel="test accuracy, eval mode",
    )
    axes[0].legend(fontsize=8)
    _band(axes[1], steps, curves["gap"], COLORS["noisy"], "PreciseBN − EMA")
    axes[1].axhline(0, color="#444444", lw=0.8, ls="--")
    axes[1].set(
        title=f"the gap, {settings['seeds']} seeds (band: min to max)",
        xlabel="SGD step",
        ylabel="accuracy difference",
    )
    return [_save(fig, directory / "precise.png")]


def plot_small_batch(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    record = read_json(directory / "records.json")
    sizes = _arr(record["sizes"])
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.3))
    styles = {
        "bn": (COLORS["bn"], "batch norm"),
        "renorm": (COLORS["no mean grad"], "Batch Renorm"),
        "ghost": (COLORS["noisy"], f"Ghost (batches of {record['settings']['ghost_batch']})"),
        "group": (COLORS["plain"], "GroupNorm (no batch)"),
    }
    for name, (color, label) in styles.items():
        _band(axes[0], sizes, record["curves"][name], color, label)
    axes[0].set_xscale("log", base=2)
    axes[0].set(
        title=f"test accuracy, {record['settings']['seeds']} seeds",
        xlabel="samples per batch (Ghost: per virtual batch)",
        ylabel="test accuracy",
    )
    axes[0].legend(fontsize=8)
    pad = record["padding"]
    x = [r["padding"] for r in pad]
    axes[1].plot(x, [r["plain_drift"] for r in pad], color=COLORS["plain"], label="plain BN")
    axes[1].plot(x, [r["masked_drift"] for r in pad], color=COLORS["bn"], label="masked BN",
                 ls="--")  # fmt: skip
    axes[1].set(
        title="padding moves plain BN's real outputs",
        xlabel="padding length (zeros)",
        ylabel="max |change| at real positions",
    )
    axes[1].legend(fontsize=8)
    return [_save(fig, directory / "small_batch.png")]


PLOTTERS: dict[str, Any] = {
    "explain": plot_explain,
    "ioffe": plot_ioffe,
    "moments": plot_moments,
    "landscape": plot_landscape,
    "reparam": plot_reparam,
    "precise": plot_precise,
    "small-batch": plot_small_batch,
}
