"""The loss landscape along the gradient (Santurkar, Tsipras, Ilyas & Madry 2018, section 3).

At regular steps of training, on that step's mini-batch, with g = dl/dtheta at the current
parameters theta, probe theta - eta*lr*g for eta in [0.5, 4] and record

* **loss landscape**: the range (min, max) of the loss over those points — how far a step of
  that size can be trusted (their Figure 4a);
* **gradient predictiveness**: the range of ||dl/dtheta(theta - eta*lr*g) - g|| — how much the
  gradient changes along the step (Figure 4b);
* **effective beta-smoothness**: max over eta of that change divided by the distance moved,
  ||eta*lr*g|| — a local Lipschitz constant of the gradient (Figure 4c).

For a 3 x 100 MLP without BN, with BN (ours), and with "noisy BN" (Santurkar et al.'s section 2:
a random per-unit scale and shift injected after every BN, redrawn every step, so the layer
inputs' distribution keeps moving). Their finding: BN makes the landscape smoother, and noisy BN
keeps most of that benefit although its "internal covariate shift" is large.

The MLP here uses ReLU and He (kaiming) initialisation, as Santurkar et al.'s VGG networks do,
rather than the ``ioffe`` sigmoid net: that net without BN barely moves at these learning rates
(vanishing gradients), so its landscape is flat for the wrong reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    Timer,
    curves_over_seeds,
    mean_and_spread,
    resolve_settings,
    seed_runs,
    write_records,
)

__all__ = ["probe", "run", "VARIANTS", "DEFAULTS", "QUICK"]

VARIANTS = {"plain": "no BN", "bn": "BN", "noisy-bn": "noisy BN"}
NORM_OF = {"plain": "none", "bn": "bn", "noisy-bn": "noisy-bn"}
DEFAULTS = {
    "steps": 2000,
    "probe_every": 20,
    "etas": 8,
    "seeds": 2,
    "eval_every": 250,
    "population_batches": 20,
}
QUICK = {
    "steps": 400,
    "probe_every": 20,
    "etas": 6,
    "seeds": 1,
    "eval_every": 200,
    "population_batches": 10,
}
ETA_RANGE = (0.5, 4.0)


def probe(model: Any, xb: Any, yb: Any, *, lr: float, etas: np.ndarray) -> dict[str, float]:
    """Santurkar et al.'s three measures at the current parameters; parameters are restored."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grad() -> tuple[float, list[torch.Tensor]]:
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        return loss.item(), list(torch.autograd.grad(loss, params))

    loss0, grad0 = loss_and_grad()
    grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad0)))
    start = [p.detach().clone() for p in params]
    losses, changes, betas = [], [], []
    try:
        for eta in etas:
            step = float(eta) * lr
            with torch.no_grad():
                for p, p0, g in zip(params, start, grad0, strict=True):
                    p.copy_(p0 - step * g)
            loss, grad = loss_and_grad()
            change = float(
                torch.sqrt(
                    sum(((a - b).double() ** 2).sum() for a, b in zip(grad, grad0, strict=True))
                )
            )
            losses.append(loss)
            changes.append(change)
            betas.append(change / (step * grad_norm) if grad_norm > 0 else float("nan"))
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
    return {
        "loss": loss0,
        "loss_min": min(losses),
        "loss_max": max(losses),
        "grad_change_min": min(changes),
        "grad_change_max": max(changes),
        "beta": max(betas),
        "grad_norm": grad_norm,
    }


def run(
    out: str | Path,
    *,
    data: str = "mnist1d",
    seed: int = 0,
    seeds: int | None = None,
    steps: int | None = None,
    lr: float = 0.5,
    init_std: float | str = "kaiming",
    activation: str = "relu",
    batch_size: int = 60,
    noise: tuple[float, float] = (0.5, 1.5),
    quick: bool = False,
    backend: str = "auto",
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    from .models import MLP, TrainConfig, load_tensors, train

    settings = resolve_settings(
        DEFAULTS,
        QUICK,
        quick=quick,
        steps=steps,
        seeds=seeds,
        intervals={"probe_every": 20, "eval_every": 5},
    )
    etas = np.linspace(*ETA_RANGE, settings["etas"])
    dataset, tensors = load_tensors(data)
    runs, rows = [], []
    with Timer() as timer:
        for variant, _, run_seed in seed_runs(VARIANTS, settings["seeds"], seed):
            model = MLP(
                dataset.num_features,
                dataset.num_classes,
                norm=NORM_OF[variant],
                init_std=init_std,
                activation=activation,
                seed=run_seed,
                backend=backend,
                noise=noise,
            )
            probes: list[dict[str, Any]] = []

            def before_step(step: int, model: Any, xb: Any, yb: Any, probes: list = probes) -> None:
                if step == 1 or step % settings["probe_every"] == 0:
                    probes.append({"step": step, **probe(model, xb, yb, lr=lr, etas=etas)})

            history = train(
                model,
                tensors,
                TrainConfig.from_settings(settings, lr=lr, batch_size=batch_size, seed=run_seed),
                before_step=before_step,
                desc=f"landscape {variant} seed {run_seed}",
                show_progress=progress,
            )
            runs.append(
                {"variant": variant, "seed": run_seed, "probes": probes, "history": history}
            )
            rows += [{"variant": variant, "seed": run_seed, **p} for p in probes]

    curves: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    keys = ("loss", "loss_min", "loss_max", "grad_change_min", "grad_change_max", "beta")
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        curves[variant] = {
            **curves_over_seeds(mine, keys, series="probes"),
            "eval_step": [row["step"] for row in mine[0]["history"]],
            "test_accuracy": mean_and_spread(
                [[row["test_accuracy"] for row in r["history"]] for r in mine]
            ),
        }
        all_probes = [p for r in mine for p in r["probes"]]
        summary[variant] = {
            "mean_loss_range": float(np.mean([p["loss_max"] - p["loss_min"] for p in all_probes])),
            "mean_grad_change_max": float(np.mean([p["grad_change_max"] for p in all_probes])),
            "median_beta": float(np.nanmedian([p["beta"] for p in all_probes])),
            "max_beta": float(np.nanmax([p["beta"] for p in all_probes])),
            "final_test_accuracy": float(
                np.mean([r["history"][-1]["test_accuracy"] for r in mine])
            ),
        }
    record = {
        "experiment": "landscape",
        "config": {
            "data": dataset.describe(),
            "lr": lr,
            "init_std": init_std,
            "batch_size": batch_size,
            "hidden": [100, 100, 100],
            "activation": activation,
            "eta_range": list(ETA_RANGE),
            "etas": etas,
            "noise_shift_range": noise[0],
            "noise_scale_range": noise[1],
            "seed": seed,
            "quick": quick,
            "backend": backend,
            **settings,
        },
        "variants": VARIANTS,
        "summary": summary,
        "curves": curves,
        "runs": runs,
        "seconds": timer.seconds,
    }
    out = write_records(out, record, {"probes.csv": rows})
    if plot:
        from .plots import plot_landscape

        plot_landscape(out)
    return record
