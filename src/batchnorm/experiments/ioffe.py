"""Ioffe & Szegedy 2015, section 4.1 ("Activations over time"), on MNIST-1D by default.

Three fully-connected hidden layers of 100 sigmoid units, weights initialised to small random
Gaussian values, mini-batches of 60, plain SGD, trained with and without batch norm (ours, before
each sigmoid). At test time the BN network uses Algorithm 2's population statistics. Recorded,
for several seeds: test accuracy over training (the paper's Figure 1a) and the 15th/50th/85th
percentiles of the input to one sigmoid of the last hidden layer over the test set (Figure 1b,c).

Reference point (MNIST-1D, lr 0.1, init std 0.1, 5000 steps, 5 seeds): about 0.68 test
accuracy with BN (0.66-0.71 by seed), about 0.31 without (docs/experiments.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    Timer,
    curves_over_seeds,
    resolve_settings,
    seed_runs,
    write_records,
)

__all__ = ["run", "DEFAULTS", "QUICK"]

DEFAULTS = {"steps": 5000, "eval_every": 100, "seeds": 5, "population_batches": 20}
QUICK = {"steps": 1500, "eval_every": 150, "seeds": 3, "population_batches": 10}
PERCENTILES = (15, 50, 85)
VARIANTS = {"bn": "with batch norm", "plain": "without batch norm"}


def run(
    out: str | Path,
    *,
    data: str = "mnist1d",
    seed: int = 0,
    seeds: int | None = None,
    steps: int | None = None,
    lr: float = 0.1,
    init_std: float = 0.1,
    batch_size: int = 60,
    unit: int = 0,
    quick: bool = False,
    backend: str = "auto",
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    import torch

    from .models import MLP, TrainConfig, load_tensors, train

    settings = resolve_settings(DEFAULTS, QUICK, quick=quick, steps=steps, seeds=seeds)
    dataset, tensors = load_tensors(data)
    if not 0 <= unit < 100:
        raise ValueError(f"unit must be in [0, 100), got {unit}")
    x_test = tensors["x_test"]
    runs, rows = [], []
    with Timer() as timer:

        def percentiles(step: int, model: Any) -> dict[str, Any]:
            model.eval()
            with torch.no_grad():
                _, pre = model(x_test, return_preactivations=True)
            model.train()
            values = pre[-1][:, unit].double().numpy()
            return {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}

        for variant, _, run_seed in seed_runs(VARIANTS, settings["seeds"], seed):
            model = MLP(
                dataset.num_features,
                dataset.num_classes,
                norm=("bn" if variant == "bn" else "none"),
                init_std=init_std,
                seed=run_seed,
                backend=backend,
            )
            history = train(
                model,
                tensors,
                TrainConfig.from_settings(settings, lr=lr, batch_size=batch_size, seed=run_seed),
                on_eval=percentiles,
                desc=f"ioffe {variant} seed {run_seed}",
                show_progress=progress,
            )
            runs.append({"variant": variant, "seed": run_seed, "history": history})
            rows += [{"variant": variant, "seed": run_seed, **row} for row in history]

    summary: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        curves[variant] = curves_over_seeds(
            mine, ("test_accuracy", "test_loss", "train_loss", *[f"p{q}" for q in PERCENTILES])
        )
        finals = [r["history"][-1]["test_accuracy"] for r in mine]
        summary[variant] = {
            "final_test_accuracy_mean": float(np.mean(finals)),
            "final_test_accuracy_min": float(np.min(finals)),
            "final_test_accuracy_max": float(np.max(finals)),
            "final_test_accuracy": finals,
        }
    summary["accuracy_gap"] = (
        summary["bn"]["final_test_accuracy_mean"] - summary["plain"]["final_test_accuracy_mean"]
    )
    record = {
        "experiment": "ioffe",
        "config": {
            "data": dataset.describe(),
            "lr": lr,
            "init_std": init_std,
            "batch_size": batch_size,
            "hidden": [100, 100, 100],
            "activation": "sigmoid",
            "unit": unit,
            "seed": seed,
            "quick": quick,
            "backend": backend,
            "percentiles": list(PERCENTILES),
            **settings,
        },
        "variants": VARIANTS,
        "summary": summary,
        "curves": curves,
        "runs": runs,
        "seconds": timer.seconds,
    }
    out = write_records(out, record, {"curves.csv": rows})
    if plot:
        from .plots import plot_ioffe

        plot_ioffe(out)
    return record
