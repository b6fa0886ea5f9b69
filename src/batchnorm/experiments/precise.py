"""When the moving average lags the weights: EMA statistics against PreciseBN, and the running
statistics of torch.nn's layers and ours under checkpointing and gradient accumulation.

Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm", section 3) observe that the exponential
moving average (EMA) of batch statistics estimates the population statistics of *past* weights:
with a large learning rate, or a small BN momentum, eval-mode accuracy suffers. PreciseBN
(``batchnorm.torch.recompute_stats``) recomputes them with the weights fixed.

``curves``: a small 1-D CNN (Conv1d -> BN -> ReLU, twice, then a linear classifier) trained with
SGD and momentum; every ``eval_every`` steps the test accuracy with the EMA statistics, and with
PreciseBN statistics from ``precise_samples`` training samples (on a copy of the model), for
several seeds. ``lifecycle``: one small layer trained a few steps three ways (plain,
checkpointed, accumulated over micro-batches), the running statistics of ``torch.nn``'s layer
and ours against the exact values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from .common import Timer, curves_over_seeds, resolve_settings, seed_runs, write_records

__all__ = ["run", "DEFAULTS", "QUICK", "lifecycle_table"]

DEFAULTS = {"steps": 1500, "eval_every": 100, "seeds": 3, "precise_samples": 500}
QUICK = {"steps": 300, "eval_every": 50, "seeds": 2, "precise_samples": 200}
VARIANTS = {"ema": "EMA running statistics", "precise": "PreciseBN statistics"}


def _cnn(length: int, classes: int, bn_momentum: float, backend: str) -> Any:
    import torch
    from torch import nn

    from ..torch import BatchNorm1d

    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, 16, 5, padding=2),
        BatchNorm1d(16, momentum=bn_momentum, backend=backend),
        nn.ReLU(),
        nn.Conv1d(16, 32, 5, padding=2, stride=2),
        BatchNorm1d(32, momentum=bn_momentum, backend=backend),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(4),
        nn.Flatten(),
        nn.Linear(128, classes),
    ).to(torch.float32)


def _accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).double().mean().item()
    model.train()
    return accuracy


def _one_run(tensors: dict[str, Any], settings: dict[str, Any], *, seed: int, lr: float,
             momentum: float, bn_momentum: float, batch_size: int, backend: str,
             show: bool) -> list[dict[str, Any]]:  # fmt: skip
    import torch

    from ..torch import recompute_stats
    from .common import progress
    from .models import batches

    torch.manual_seed(seed)
    x_train, y_train = tensors["x_train"], tensors["y_train"]
    model = _cnn(x_train.shape[1], int(y_train.max()) + 1, bn_momentum, backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    stream = batches(x_train.shape[0], batch_size, np.random.default_rng(seed))
    rows = []
    for step in progress(range(settings["steps"] + 1), desc=f"precise seed {seed}",
                         enabled=show):  # fmt: skip
        if step % settings["eval_every"] == 0 or step == settings["steps"]:
            ema = _accuracy(model, tensors["x_test"], tensors["y_test"])
            fixed = copy.deepcopy(model)
            order = np.random.default_rng((seed, step)).permutation(x_train.shape[0])
            chosen = torch.as_tensor(order[: settings["precise_samples"]])
            recompute_stats(fixed, x_train[chosen].split(batch_size), progress=False)
            precise = _accuracy(fixed, tensors["x_test"], tensors["y_test"])
            rows.append({"step": step, "ema": ema, "precise": precise, "gap": precise - ema})
        if step == settings["steps"]:
            break
        index = torch.as_tensor(next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x_train[index]), y_train[index])
        loss.backward()
        optimizer.step()
    return rows


def lifecycle_table(steps: int = 4, micro: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Running statistics after ``steps`` training steps of one BatchNorm1d(3): torch.nn's and
    ours, checkpointed (reentrant) and accumulated over ``micro`` micro-batches per step,
    against the exact values (an un-checkpointed layer; one forward of the whole batch)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from ..torch import BatchNorm1d, accumulate_stats

    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(8 * micro, 3, generator=g, dtype=torch.float64) * 2 + 1
            for _ in range(steps)]  # fmt: skip
    rows = []
    for case in ("checkpointing", "accumulation"):
        exact = BatchNorm1d(3, backend="reference").double()
        for x in data:
            exact(x)
        for who, cls in (("torch.nn", torch.nn.BatchNorm1d), ("batchnorm", BatchNorm1d)):
            layer = cls(3).double()
            for x in data:
                if case == "checkpointing":
                    x = x.clone().requires_grad_()
                    checkpoint(layer, x, use_reentrant=True).sum().backward()
                elif who == "batchnorm":
                    with accumulate_stats(layer):
                        for part in x.chunk(micro):
                            layer(part)
                else:  # what a torch.nn layer does under accumulation: k updates
                    for part in x.chunk(micro):
                        layer(part)
            rows.append({
                "case": case,
                "layer": who,
                "num_batches_tracked": int(layer.num_batches_tracked),
                "exact_num_batches_tracked": int(exact.num_batches_tracked),
                "running_mean_error": float((layer.running_mean - exact.running_mean).abs().max()),
                "running_var_error": float((layer.running_var - exact.running_var).abs().max()),
            })  # fmt: skip
    return rows


def run(
    out: str | Path,
    *,
    data: str = "mnist1d",
    seed: int = 0,
    seeds: int | None = None,
    steps: int | None = None,
    lr: float = 0.5,
    momentum: float = 0.9,
    bn_momentum: float = 0.01,
    batch_size: int = 32,
    quick: bool = False,
    backend: str = "auto",
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    from .models import load_tensors

    settings = resolve_settings(DEFAULTS, QUICK, quick=quick, steps=steps, seeds=seeds)
    for name, value in (("momentum", momentum), ("bn_momentum", bn_momentum)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    dataset, tensors = load_tensors(data)
    runs = []
    with Timer() as timer:
        for _, _, run_seed in seed_runs(["cnn"], settings["seeds"], seed):
            history = _one_run(
                tensors, settings, seed=run_seed, lr=lr, momentum=momentum,
                bn_momentum=bn_momentum, batch_size=batch_size, backend=backend, show=progress,
            )  # fmt: skip
            runs.append({"seed": run_seed, "history": history})
        table = lifecycle_table(seed=seed)
    curves = curves_over_seeds(runs, ["ema", "precise", "gap"])
    gaps = [row["gap"] for r in runs for row in r["history"][1:]]
    finals = [r["history"][-1] for r in runs]
    summary = {
        "final_ema_accuracy": float(np.mean([f["ema"] for f in finals])),
        "final_precise_accuracy": float(np.mean([f["precise"] for f in finals])),
        "mean_gap": float(np.mean(gaps)),
        "max_gap": float(np.max(gaps)),
        "precise_better_fraction": float(np.mean([g > 0 for g in gaps])),
        "torch_nn_checkpoint_batches": next(
            r["num_batches_tracked"] for r in table
            if r["case"] == "checkpointing" and r["layer"] == "torch.nn"
        ),
        "seconds": timer.seconds,
    }  # fmt: skip
    record = {
        "experiment": "precise",
        "data": dataset.name,
        "settings": {**settings, "lr": lr, "momentum": momentum, "bn_momentum": bn_momentum,
                     "batch_size": batch_size, "backend": backend, "seed": seed},
        "curves": curves,
        "runs": runs,
        "lifecycle": table,
        "summary": summary,
    }  # fmt: skip
    rows = [{"seed": r["seed"], **row} for r in runs for row in r["history"]]
    write_records(out, record, {"precise.csv": rows, "lifecycle.csv": table})
    if plot:
        from .plots import plot_precise

        plot_precise(out)
    return record
